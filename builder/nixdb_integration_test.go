//go:build integration

package builder

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/nixstore"
)

// TestIntegrationLoadImportsRowsOrFallsBack: NixStore.Load on a real
// nix-bin store imports the central store's rows with their signatures; on
// a store whose Nix never ran (no DB yet) Nix first creates its DB and the
// rows are imported the same way; on a DB whose schema ImportDB does not
// know (a column Nix 2.8/2.26 lack) it falls back to `nix-store --load-db`,
// says so in the log, and every path is valid.
func TestIntegrationLoadImportsRowsOrFallsBack(t *testing.T) {
	testenv.RequireRoot(t)
	central := nixtest.New(t, filepath.Join(t.TempDir(), "central"))
	made := central.Fill(t)
	sk, _ := nixtest.GenerateKey(t, "central-1")
	central.Sign(t, sk, made...)
	rows, err := nixstore.ReadDBRows(context.Background(), filepath.Join(central.NixRoot(), "var", "nix", "db"))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name     string
		prepare  func(t *testing.T, root string)
		fallback bool
	}{
		{"known schema", func(t *testing.T, root string) { nixtest.New(t, root) }, false},
		{"unknown column", func(t *testing.T, root string) {
			nixtest.New(t, root)
			testenv.Run(t, "sqlite3", filepath.Join(root, "nix", "var", "nix", "db", "db.sqlite"),
				"ALTER TABLE ValidPaths ADD COLUMN future text")
		}, true},
		{"no db yet", func(t *testing.T, root string) {}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			root := filepath.Join(t.TempDir(), "builder")
			c.prepare(t, root)
			if err := os.MkdirAll(filepath.Join(root, "nix", "store"), 0o755); err != nil {
				t.Fatal(err)
			}
			testenv.Run(t, "cp", "-a", filepath.Join(central.NixRoot(), "store")+"/.", filepath.Join(root, "nix", "store"))
			var logs bytes.Buffer
			n := &NixStore{
				CLI: nixstore.CLI{Args: []string{"--store", root, "--option", "build-users-group", "", "--option", "substituters", ""},
					Env: []string{"NIX_CONFIG="}},
				DB:  filepath.Join(root, "nix", "var", "nix", "db", "db.sqlite"),
				Log: slog.New(slog.NewTextHandler(&logs, nil)),
			}
			got, err := n.Load(context.Background(), rows)
			if err != nil {
				t.Fatal(err)
			}
			if got != len(rows.Paths) {
				t.Fatalf("loaded %d paths, want %d", got, len(rows.Paths))
			}
			fellBack := strings.Contains(logs.String(), "nix-store --load-db instead")
			if fellBack != c.fallback {
				t.Fatalf("fell back to --load-db: %v, want %v; log:\n%s", fellBack, c.fallback, logs.String())
			}
			b := nixtest.Store{Root: root}
			infos := b.PathInfos(t)
			if len(infos) != len(rows.Paths) {
				t.Fatalf("%d valid paths, want %d", len(infos), len(rows.Paths))
			}
			for _, p := range made {
				sigs := infos[p].Signatures
				// The fallback keeps what the registration has; the
				// import also the signatures.
				if want := !c.fallback; (len(sigs) == 1) != want {
					t.Errorf("%s: signatures %v (fallback %v)", p, sigs, c.fallback)
				}
			}
			if out, err := b.Command("nix-store", "--verify", "--check-contents").CombinedOutput(); err != nil {
				t.Fatalf("verify: %v\n%s", err, out)
			}
		})
	}
}
