//go:build integration

package builder

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
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
// says so in the log, and every path is valid. Either way the GC root
// path given with the rows refers to every one of them, and a second
// root updating it (one path less) refers to the rest.
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
			mkRoot := func(gen uint64, prev string, remove []string) *nixstore.RootUpdate {
				content := []byte(rootName(gen) + "\n")
				p := textPath("/nix/store", rootName(gen), content, nil)
				if err := writeStoreFile(filepath.Join(root, p), content); err != nil {
					t.Fatal(err)
				}
				h, size := narOfFile(content)
				return &nixstore.RootUpdate{Path: p, NarHash: h, NarSize: size, Prev: prev, Full: prev == "", Remove: remove}
			}
			r1 := mkRoot(1, "", nil)
			got, err := n.Load(context.Background(), rows, r1)
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
			refsOf := func(p string) []string {
				return strings.Fields(b.Run(t, "nix-store", "--query", "--references", p))
			}
			all := make([]string, len(rows.Paths))
			for i := range rows.Paths {
				all[i] = rows.Paths[i].Path
			}
			if got := refsOf(r1.Path); !slices.Equal(got, all) {
				t.Fatalf("root refers to %d paths, want all %d", len(got), len(all))
			}
			r2 := mkRoot(2, r1.Path, made[:1])
			if _, err := n.Load(context.Background(), &nixstore.Rows{}, r2); err != nil {
				t.Fatal(err)
			}
			if got := refsOf(r2.Path); !slices.Equal(got, without(all, made[:1])) {
				t.Fatalf("updated root refers to %d paths, want %d (all but %s)", len(got), len(all)-1, made[0])
			}
			if !c.fallback {
				if v := b.Run(t, "nix-store", "--check-validity", "--print-invalid", r1.Path); v != r1.Path {
					t.Fatalf("previous root %s still valid after the update renamed it", r1.Path)
				}
			} else if err := n.Invalidate(context.Background(), []string{r1.Path}); err != nil {
				t.Fatal(err)
			}
			infos := b.PathInfos(t)
			if len(infos) != len(rows.Paths)+1 {
				t.Fatalf("%d valid paths, want %d and the root", len(infos), len(rows.Paths))
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
