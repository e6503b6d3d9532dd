package builder

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"os"
	"testing"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/nixstore"
)

// dbNix is a fake Nix store that can install a generation's DB: on
// success every path of the generation and its root become valid.
type dbNix struct {
	*fakeNix
	empty      bool
	installErr error
	paths      []nixstore.PathInfo // what an install makes valid
	installed  []byte
}

func (n *dbNix) Empty(context.Context) (bool, error) { return n.empty, nil }

func (n *dbNix) InstallDB(_ context.Context, r io.Reader, want nixstore.DBFile) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	if n.installErr != nil {
		return n.installErr
	}
	n.installed = b
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, p := range n.paths {
		n.valid[p.Path] = p
	}
	n.valid[want.Root] = nixstore.PathInfo{Path: want.Root, References: pathsOf(n.paths)}
	return nil
}

// dbServer is a fake server that serves generation DBs.
type dbServer struct {
	*fakeServer
	d     api.NixDB
	err   error
	calls int
}

func (s *dbServer) NixDB(context.Context, uint64) (io.ReadCloser, api.NixDB, error) {
	s.calls++
	if s.err != nil {
		return nil, api.NixDB{}, s.err
	}
	return io.NopCloser(bytes.NewReader([]byte("sqlite"))), s.d, nil
}

// An empty builder installs the generation's DB instead of importing
// rows; everything that stops it (local paths, a Nix holding the store,
// an older server, a DB that is not the generation's) leaves the row
// import, which then registers every path.
func TestFirstStartInstallsDBOrImportsRows(t *testing.T) {
	for _, c := range []struct {
		name    string
		empty   bool
		srvErr  error
		instErr error
		edit    func(*api.NixDB)
		want    bool // installed
	}{
		{name: "installed", empty: true, want: true},
		{name: "local paths", empty: false},
		{name: "older server", empty: true, srvErr: &api.StatusError{Code: http.StatusNotFound, Message: "404 page not found"}},
		{name: "nix holds the store", empty: true, instErr: nixstore.ErrDBInUse},
		{name: "install fails", empty: true, instErr: os.ErrPermission},
		{name: "another root", empty: true, edit: func(d *api.NixDB) { d.Root = "/nix/store/00000000000000000000000000000000-strata-generation-1" }},
		{name: "path count", empty: true, edit: func(d *api.NixDB) { d.Paths++ }},
	} {
		t.Run(c.name, func(t *testing.T) {
			u := newUnitEnv(t)
			ps := []nixstore.PathInfo{info("a"), info("bb", info("a").Path)}
			g := u.srv.publish(ps...)
			nix := &dbNix{fakeNix: u.nix, empty: c.empty, installErr: c.instErr, paths: ps}
			d := api.NixDB{SHA256: "x", Size: 6, Paths: len(ps) + 1, Schema: 10, Root: nixstore.RootOf(u.cfg.logicalStoreDir(), g).Path}
			if c.edit != nil {
				c.edit(&d)
			}
			srv := &dbServer{fakeServer: u.srv, d: d, err: c.srvErr}
			a := u.agent(t, func(o *Options) { o.Server, o.Nix = srv, nix })
			if err := a.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			if got := nix.installed != nil; got != c.want {
				t.Fatalf("installed %v, want %v", got, c.want)
			}
			if c.want && nix.loads != 0 || !c.want && nix.loads == 0 {
				t.Fatalf("row imports: %d", nix.loads)
			}
			if c.empty != (srv.calls > 0) {
				t.Fatalf("server asked for the DB %d times (empty DB: %v)", srv.calls, c.empty)
			}
			for _, p := range ps {
				if !nix.isValid(p.Path) {
					t.Fatalf("%s not valid", p.Path)
				}
			}
			st := a.State()
			if st.String() != "idle(1)" || st.PathsImported != len(ps) || st.LastError != "" {
				t.Fatalf("state %+v", st)
			}
			if l, _ := os.Readlink(u.cfg.gcRootLink()); l != nixstore.RootOf(u.cfg.logicalStoreDir(), g).Path || !nix.isValid(l) {
				t.Fatalf("GC root link %q", l)
			}
		})
	}
}
