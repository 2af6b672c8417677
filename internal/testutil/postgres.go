package testutil

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib"
)

var (
	pgOnce sync.Once
	pgDSN  string
	pgErr  error
	pgCmd  *exec.Cmd
	pgDir  string
	pgN    int
	pgMu   sync.Mutex
)

// pgBin finds a PostgreSQL server installation (Debian's postgresql package).
func pgBin() (string, error) {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	for i := len(dirs) - 1; i >= 0; i-- {
		if _, err := os.Stat(filepath.Join(dirs[i], "initdb")); err == nil {
			return dirs[i], nil
		}
	}
	return "", fmt.Errorf("no PostgreSQL server found under /usr/lib/postgresql: install the Debian package postgresql (make setup)")
}

// Postgres returns the DSN of a fresh, empty database on a PostgreSQL server private to
// this test binary: initdb in a temporary directory, listening on a Unix socket only,
// run as the postgres user (initdb refuses root). StopPostgres ends it; Finish checks
// that nothing of it is left.
func Postgres(t testing.TB) string {
	t.Helper()
	dsn, err := PostgresDB()
	if err != nil {
		t.Fatalf("PostgreSQL: %v", err)
	}
	return dsn
}

// PostgresDB is Postgres for callers without a testing.TB (the benchmarks).
func PostgresDB() (string, error) {
	pgOnce.Do(startPostgres)
	if pgErr != nil {
		return "", pgErr
	}
	pgMu.Lock()
	pgN++
	name := fmt.Sprintf("t%d", pgN)
	pgMu.Unlock()
	db, err := sql.Open("pgx", pgDSN+" dbname=postgres")
	if err != nil {
		return "", err
	}
	defer db.Close()
	if _, err := db.Exec("CREATE DATABASE " + name); err != nil {
		return "", fmt.Errorf("creating database %s: %w", name, err)
	}
	return "postgres:///" + name + "?host=" + pgDir + "&port=5432&user=postgres", nil
}

func startPostgres() {
	bin, err := pgBin()
	if err != nil {
		pgErr = err
		return
	}
	pgDir, err = os.MkdirTemp("", tempPrefix()+"pg-")
	if err != nil {
		pgErr = err
		return
	}
	os.Chmod(pgDir, 0o755)
	data := filepath.Join(pgDir, "data")
	asPG := func(args ...string) *exec.Cmd {
		if os.Getuid() == 0 {
			return exec.Command("runuser", append([]string{"-u", "postgres", "--"}, args...)...)
		}
		return exec.Command(args[0], args[1:]...)
	}
	if os.Getuid() == 0 {
		exec.Command("chown", "postgres:", pgDir).Run()
	}
	if out, err := asPG(filepath.Join(bin, "initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8").CombinedOutput(); err != nil {
		pgErr = fmt.Errorf("initdb: %v\n%s", err, out)
		return
	}
	pgCmd = asPG(filepath.Join(bin, "postgres"), "-D", data, "-k", pgDir, "-c", "listen_addresses=", "-c", "fsync=off", "-p", "5432")
	logf, _ := os.Create(filepath.Join(pgDir, "log"))
	pgCmd.Stdout, pgCmd.Stderr = logf, logf
	if err := pgCmd.Start(); err != nil {
		pgErr = err
		return
	}
	pgDSN = "host=" + pgDir + " port=5432 user=postgres"
	deadline := time.Now().Add(30 * time.Second)
	for {
		db, _ := sql.Open("pgx", pgDSN+" dbname=postgres")
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := db.PingContext(ctx)
		cancel()
		db.Close()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(filepath.Join(pgDir, "log"))
			pgErr = fmt.Errorf("PostgreSQL did not start: %v\n%s", err, strings.TrimSpace(string(b)))
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// StopPostgres stops the test binary's PostgreSQL server, if one was started.
func StopPostgres() {
	if pgCmd != nil && pgCmd.Process != nil {
		if bin, err := pgBin(); err == nil {
			stop := exec.Command(filepath.Join(bin, "pg_ctl"), "stop", "-D", filepath.Join(pgDir, "data"), "-m", "fast", "-w")
			if os.Getuid() == 0 {
				stop = exec.Command("runuser", append([]string{"-u", "postgres", "--"}, stop.Args...)...)
			}
			stop.Run()
		}
		done := make(chan struct{})
		go func() { pgCmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			KillProcessesNaming(pgDir)
		}
	}
	if pgDir != "" {
		os.RemoveAll(pgDir)
	}
}

// PostgresSocket is the Unix socket of the test PostgreSQL (after Postgres was called).
func PostgresSocket() string { return filepath.Join(pgDir, ".s.PGSQL.5432") }
