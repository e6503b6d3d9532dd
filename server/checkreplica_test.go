package server

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/apiserve"
)

// --check-config of a replica whose store.dir is not the store dir its
// primary's generations are named in says so (a WARNING: the start goes
// ahead, every sync is refused), as each sync would; with the primary's
// store dir it says nothing of it (found by a new user: a replica with
// store.dir /gnu/store was "configuration: ok" and then failed every sync).
func TestAskPrimaryStoreDir(t *testing.T) {
	prim := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/generations":
			apiserve.WriteJSON(w, http.StatusOK, api.GenerationList{Generations: []api.Generation{{ID: 3}}, StoreDir: "/nix/store", Backend: "btrfs"})
		case "/v1/token":
			w.WriteHeader(http.StatusNoContent)
		default:
			http.NotFound(w, r)
		}
	}))
	defer prim.Close()
	for _, tc := range []struct {
		storeDir string
		warn     bool
	}{{"/gnu/store", true}, {"/nix/store", false}} {
		cfg := Config{ReplicaOf: prim.URL, StoreDir: tc.storeDir, StateDir: t.TempDir(), ReplicaTokenFile: "/etc/strata/replica-token"}
		out := strings.Join(askPrimary(context.Background(), cfg, "tok"), "\n")
		want := "WARNING: primary " + prim.URL + " serves generations of store dir /nix/store, but this replica's store.dir is " + tc.storeDir
		if got := strings.Contains(out, want); got != tc.warn {
			t.Errorf("store.dir %s: warning %v, want %v:\n%s", tc.storeDir, got, tc.warn, out)
		}
		if !strings.Contains(out, "answers: 1 live generations, newest 3") {
			t.Errorf("store.dir %s: %s", tc.storeDir, out)
		}
	}
}
