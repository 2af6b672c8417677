package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/node"
	"github.com/kilnhq/kiln/internal/registry"
	"github.com/kilnhq/kiln/internal/server"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
)

// DefaultListen is where `kiln server` listens unless told otherwise.
const DefaultListen = "127.0.0.1:4280"

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// adminToken reads DATA_DIR/admin-token, creating it on first start.
func adminToken(dataDir string) (string, bool, error) {
	p := filepath.Join(dataDir, "admin-token")
	if b, err := os.ReadFile(p); err == nil && len(strings.TrimSpace(string(b))) > 0 {
		return strings.TrimSpace(string(b)), false, nil
	}
	var b [32]byte
	rand.Read(b[:])
	tok := hex.EncodeToString(b[:])
	if err := os.WriteFile(p, []byte(tok+"\n"), 0o600); err != nil {
		return "", false, err
	}
	return tok, true, nil
}

// rootfsCache is where converted images live; the server and `kiln vm run --image`
// share it.
func rootfsCache(dataDir string) image.Cache {
	return image.Cache{Dir: filepath.Join(dataDir, "images", "rootfs")}
}

func serverCmd(g *globals) *cobra.Command {
	var listen string
	c := &cobra.Command{
		Use:   "server",
		Short: "Run kiln's API and machines on this host (SQLite, local images)",
		Long: `Run the kiln server: the REST API (Fly Machines shapes) under /v1, the machines of
this host, and their stored logs. State lives in the data dir (--data-dir, KILN_DATA_DIR);
the admin token is written to DATA_DIR/admin-token on first start. Machines keep running
when the server stops or dies; the next start adopts them.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runServer(cmd.Context(), g.dataDir, listen) },
	}
	c.Flags().StringVar(&listen, "listen", envOr("KILN_LISTEN", DefaultListen), "address to serve the API on (env KILN_LISTEN)")
	return c
}

func runServer(ctx context.Context, dataDir, listen string) error {
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		return err
	}
	reap(ctx, dataDir)
	tok, created, err := adminToken(dataDir)
	if err != nil {
		return err
	}
	if created {
		fmt.Fprintf(os.Stderr, "kiln: created the admin token: %s\n", filepath.Join(dataDir, "admin-token"))
	} else {
		fmt.Fprintf(os.Stderr, "kiln: admin token: %s\n", filepath.Join(dataDir, "admin-token"))
	}
	db, err := sqlstore.Open(ctx, filepath.Join(dataDir, "kiln.db"))
	if err != nil {
		return err
	}
	defer db.Close()
	rt, accel, err := runtime(ctx, dataDir, "qemu", "", "", os.Stderr)
	if err != nil {
		return err
	}
	// Listen first: the built-in registry's address is where machines pull localhost/ images.
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("listening on %s: %w (another kiln server? choose one with --listen)", listen, err)
	}
	images := image.Registries{Local: ln.Addr().String(), Token: tok}
	reg := registry.Handler(ctx, filepath.Join(dataDir, "registry"), tok)
	mgr := node.New(db, rt, images, rootfsCache(dataDir), filepath.Join(dataDir, "machines"), os.Stderr)
	apiSrv := &server.Server{Store: db, Node: mgr, Images: images, Registry: reg, Token: tok}
	apiSrv.Recovering.Store(true)
	srv := &http.Server{Handler: apiSrv.Handler()}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	// Recovery may need images from the registry, so it runs once the server serves;
	// the API answers 503 until it is done.
	if err := mgr.Recover(ctx); err != nil {
		srv.Close()
		mgr.Close()
		return fmt.Errorf("recovering machines: %w", err)
	}
	apiSrv.Recovering.Store(false)
	fmt.Fprintf(os.Stderr, "kiln: serving the API and the image registry on http://%s (accelerator %s)\n", ln.Addr(), accel)
	select {
	case <-ctx.Done():
	case err := <-errc:
		mgr.Close()
		return err
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	srv.Shutdown(sctx)
	mgr.Close()
	fmt.Fprintln(os.Stderr, "kiln: stopped; machines keep running and are adopted at the next start")
	return nil
}
