package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/internal/auth/authtest"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/client"
	"github.com/kilnhq/kiln/internal/errdefs"
)

// Each error kind is answered with its own status, whatever wraps it; the body carries
// the message.
func TestEachKindGivesItsStatus(t *testing.T) {
	for _, c := range []struct {
		err  error
		want int
	}{
		{errdefs.Invalid("x"), 400},
		{errdefs.New(errdefs.ErrNotFound, "x"), 404},
		{errdefs.New(errdefs.ErrTimeout, "x"), 408},
		{errdefs.New(errdefs.ErrConflict, "x"), 409},
		{errdefs.New(errdefs.ErrNotImplemented, "x"), 501},
		{errdefs.Missing("qemu-img", "qemu-utils"), 501},
		{errdefs.New(errdefs.ErrProtocol, "x"), 502},
		{errdefs.New(errdefs.ErrUnavailable, "x"), 503},
		{errdefs.New(errdefs.ErrCapacity, "x"), 507},
		{fmt.Errorf("creating: %w", errdefs.New(errdefs.ErrCapacity, "x")), 507},
		// The outermost kind answers: a conflict caused by a missing thing is a conflict.
		{errdefs.Wrap(errdefs.ErrConflict, errdefs.New(errdefs.ErrNotFound, "x"), "y"), 409},
		{errors.New("disk on fire"), 500},
	} {
		w := httptest.NewRecorder()
		writeError(w, c.err)
		var body api.Error
		json.Unmarshal(w.Body.Bytes(), &body)
		if w.Code != c.want || body.Error != c.err.Error() {
			t.Errorf("%v: %d %q, want %d with the message", c.err, w.Code, body.Error, c.want)
		}
	}
	for _, k := range errdefs.Kinds {
		w := httptest.NewRecorder()
		writeError(w, errdefs.New(k, "x"))
		if w.Code == 500 {
			t.Errorf("kind %v has no status of its own", k)
		}
	}
}

// Error statuses are written by writeError alone, from errdefs' table, so that the
// client can read each back into its kind: no handler answers an error with a status
// of its own choosing. The one exception is the 401 of the auth check.
func TestErrorStatusesOnlyFromTheTable(t *testing.T) {
	files, _ := filepath.Glob("*.go")
	fset := token.NewFileSet()
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		file, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(file, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			name := ""
			switch fn := call.Fun.(type) {
			case *ast.Ident:
				name = fn.Name
			case *ast.SelectorExpr:
				name = fn.Sel.Name
			}
			var status ast.Expr
			switch {
			case name == "writeJSON" && len(call.Args) > 1:
				status = call.Args[1]
			case name == "WriteHeader" && len(call.Args) == 1:
				status = call.Args[0]
			case name == "Error" && len(call.Args) == 3: // http.Error
				status = call.Args[2]
			default:
				return true
			}
			switch s := status.(type) {
			case *ast.SelectorExpr: // http.StatusX
				switch s.Sel.Name {
				case "StatusOK", "StatusCreated", "StatusAccepted", "StatusNoContent", "StatusUnauthorized":
					return true
				}
			case *ast.Ident: // writeJSON's own WriteHeader(code)
				if s.Name == "code" && name == "WriteHeader" {
					return true
				}
			case *ast.CallExpr: // writeError's errdefs.HTTPStatus(err)
				if sel, ok := s.Fun.(*ast.SelectorExpr); ok && sel.Sel.Name == "HTTPStatus" {
					return true
				}
			}
			{
				t.Errorf("%s: %s writes a status outside writeError", fset.Position(call.Pos()), name)
			}
			return true
		})
	}
}

// The answers the handler gives before any route runs (still recovering, no such route)
// come from the same table, so the client reads them as the kinds they are.
func TestHandlersOwnAnswersHaveKinds(t *testing.T) {
	s := &Server{Auth: opAuth}
	s.Recovering.Store(true)
	srv := httptest.NewServer(s.Handler())
	defer srv.Close()
	cl := client.New(srv.URL, opToken)
	if _, err := cl.ListApps(t.Context()); !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "retry") {
		t.Errorf("while recovering: %v, want unavailable saying to retry", err)
	}
	resp, err := http.Get(srv.URL + "/v1/nothing")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 404 || resp.Header.Get("Content-Type") != "application/json" {
		t.Errorf("no route: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
}

// opAuth checks tokens; opToken is the operator's.
var opAuth, opToken = authtest.Operator()
