//go:build integration

package nixstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
)

// nixVersion is one Nix a test runs: Debian bookworm's nix-bin (2.8, on
// PATH) or trixie's (2.26, scripts/nix-trixie.sh).
type nixVersion struct {
	name string
	bin  func(t *testing.T) string
}

var (
	nix28  = nixVersion{"2.8", func(*testing.T) string { return "" }}
	nix226 = nixVersion{"2.26", func(t *testing.T) string { return nixtest.TrixieBin(t) }}
)

func storeOf(t *testing.T, v nixVersion, features ...string) nixtest.Store {
	t.Helper()
	testenv.RequireRoot(t)
	s := nixtest.NewWith(t, nixtest.Store{Root: filepath.Join(t.TempDir(), "root"), Bin: v.bin(t), Features: features})
	if got := s.Version(t); !strings.HasPrefix(got, v.name+".") {
		t.Fatalf("nix %s wanted, store runs %s", v.name, got)
	}
	return s
}

// centralStore fills a store the way a central store looks: added trees
// (content-addressed "fixed:r:" paths), a built derivation with a deriver
// and references, two signed paths, and with withCA a floating
// content-addressed derivation, built (a Realisation) and depended on.
func centralStore(t *testing.T, v nixVersion, withCA bool) (nixtest.Store, []string) {
	t.Helper()
	var feats []string
	if withCA {
		feats = []string{"ca-derivations"}
	}
	s := storeOf(t, v, feats...)
	made := s.Fill(t)
	sk, _ := nixtest.GenerateKey(t, "central-1")
	s.Sign(t, sk, made[0], made[3])
	if withCA {
		ca := s.BuildFloatingCA(t, "floating", `mkdir $out; echo floating > $out/x; echo $in0 > $out/ref`, made[1])
		made = append(made, ca)
		made = append(made, s.Build(t, "on-floating", `mkdir $out; echo $in0 > $out/ref`, ca))
	}
	return s, made
}

// sameRows fails unless two stores' DBs hold the same rows; withReal also
// compares realisations.
func sameRows(t *testing.T, what string, got, want *Rows, withReal bool) {
	t.Helper()
	if len(got.Paths) != len(want.Paths) {
		t.Errorf("%s: %d paths, want %d", what, len(got.Paths), len(want.Paths))
	}
	for i := range min(len(got.Paths), len(want.Paths)) {
		if !reflect.DeepEqual(got.Paths[i], want.Paths[i]) {
			t.Errorf("%s: row differs:\n got %+v\nwant %+v", what, got.Paths[i], want.Paths[i])
		}
	}
	if withReal && !reflect.DeepEqual(got.Realisations, want.Realisations) {
		t.Errorf("%s: realisations\n got %+v\nwant %+v", what, got.Realisations, want.Realisations)
	}
}

// TestIntegrationImportKeepsEverything: rows read from a real central
// store's DB, imported into a fresh store of the same or another Nix, give
// the fresh store exactly the central store's rows, as Nix itself reports
// them (nix path-info --json: signatures, ca, deriver, references, NAR hash
// and size, registration time, ultimate; nix-store --dump-db; derivation
// outputs), and `nix-store --verify --check-contents` is clean. A second
// import changes nothing. A floating-CA derivation written by 2.26 imports
// into 2.8 (whose --load-db refuses it) as a plain path; its realisation
// imports into a 2.26 store that has the ca-derivations tables.
func TestIntegrationImportKeepsEverything(t *testing.T) {
	for _, c := range []struct {
		central, builder nixVersion
		ca, builderCA    bool
	}{
		{nix28, nix28, false, false},
		{nix226, nix226, true, true},
		{nix226, nix28, true, false},
		{nix226, nix226, true, false}, // 2.26 without ca-derivations: no Realisations table
	} {
		name := fmt.Sprintf("central-%s-builder-%s-ca-%v", c.central.name, c.builder.name, c.builderCA)
		t.Run(name, func(t *testing.T) {
			central, made := centralStore(t, c.central, c.ca)
			rows, err := ReadDBRows(context.Background(), dbDir(central))
			if err != nil {
				t.Fatal(err)
			}
			var signed, cas, outs int
			for _, r := range rows.Paths {
				signed += min(len(r.Sigs), 1)
				if r.CA != "" {
					cas++
				}
				outs += len(r.Outputs)
			}
			if signed != 2 || cas == 0 || outs == 0 || (c.ca && len(rows.Realisations) == 0) {
				t.Fatalf("fixture: %d signed, %d ca, %d drv outputs, %d realisations", signed, cas, outs, len(rows.Realisations))
			}
			var feats []string
			if c.builderCA {
				feats = []string{"ca-derivations"}
			}
			b := storeOf(t, c.builder, feats...)
			copyStore(t, central, filepath.Join(b.NixRoot(), "store"))
			before, err := ReadDBRows(context.Background(), dbDir(b))
			if err != nil {
				t.Fatal(err)
			}
			res, err := ImportDB(context.Background(), dbDir(b), rows, nil)
			if err != nil {
				t.Fatal(err)
			}
			if res.Imported != len(rows.Paths) || res.Skipped != 0 || res.SchemaVersion != 10 {
				t.Fatalf("result %+v, want %d imported of schema 10", res, len(rows.Paths))
			}
			wantReal := 0
			if c.ca && c.builderCA {
				wantReal = len(rows.Realisations)
			}
			if res.Realisations != wantReal || res.HasRealisations != c.builderCA {
				t.Fatalf("result %+v: want %d realisations imported, table present %v", res, wantReal, c.builderCA)
			}
			after, err := ReadDBRows(context.Background(), dbDir(b))
			if err != nil {
				t.Fatal(err)
			}
			if len(before.Paths) != 0 {
				t.Fatalf("fresh store had %d paths", len(before.Paths))
			}
			sameRows(t, "builder DB after import vs central DB", after, rows, c.builderCA)
			noForeignKeyViolations(t, b)

			// What Nix itself says, on both sides.
			wantInfo, gotInfo := central.PathInfos(t), b.PathInfos(t)
			if len(gotInfo) != len(wantInfo) {
				t.Errorf("nix path-info: %d paths on the builder, %d on the central store", len(gotInfo), len(wantInfo))
			}
			for p, w := range wantInfo {
				g := gotInfo[p]
				slices.Sort(g.Signatures)
				slices.Sort(w.Signatures)
				if !reflect.DeepEqual(g, w) {
					t.Errorf("nix path-info %s:\nbuilder %+v\ncentral %+v", p, g, w)
				}
			}
			if got, want := b.DumpDB(t), central.DumpDB(t); got != want {
				t.Errorf("dump-db differs:\n%s", diffLinesOf(got, want))
			}
			for _, r := range rows.Paths {
				if len(r.Outputs) == 0 {
					continue
				}
				got := b.Run(t, "nix-store", "--query", "--outputs", r.Path)
				want := central.Run(t, "nix-store", "--query", "--outputs", r.Path)
				if got != want {
					t.Errorf("outputs of %s: builder %q, central %q", r.Path, got, want)
				}
			}
			verify := b.Command("nix-store", "--verify", "--check-contents")
			if out, err := verify.CombinedOutput(); err != nil || strings.Contains(string(out), "error") ||
				strings.Contains(string(out), "path '") {
				t.Fatalf("nix-store --verify --check-contents: %v\n%s", err, out)
			}
			// The store is usable: Nix builds on an imported input.
			b.Build(t, "after-import", `mkdir $out; echo $in0 > $out/ref`, made[3])

			// Again: nothing new, nothing touched.
			res, err = ImportDB(context.Background(), dbDir(b), rows, nil)
			if err != nil || res.Imported != 0 || res.Skipped != len(rows.Paths) {
				t.Fatalf("second import: %+v, %v", res, err)
			}
			again, err := ReadDBRows(context.Background(), dbDir(b))
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range after.Paths {
				i := slices.IndexFunc(again.Paths, func(x Row) bool { return x.Path == r.Path })
				if i < 0 || !reflect.DeepEqual(again.Paths[i], r) {
					t.Errorf("second import changed %s", r.Path)
				}
			}
		})
	}
}

func diffLinesOf(a, b string) string {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	var out []string
	for i := 0; i < max(len(al), len(bl)); i++ {
		var x, y string
		if i < len(al) {
			x = al[i]
		}
		if i < len(bl) {
			y = bl[i]
		}
		if x != y {
			out = append(out, fmt.Sprintf("line %d: %q != %q", i+1, x, y))
		}
		if len(out) > 10 {
			break
		}
	}
	return strings.Join(out, "\n")
}

// TestIntegrationImportRefusesAndLeavesDB: an unknown schema version, a
// table with a column Nix 2.8/2.26 do not have, a missing database, and
// rows whose references are neither valid nor imported are errors (the
// first three ErrUnknownSchema, so callers fall back to --load-db) and the
// DB is unchanged. Paths valid already keep their own signatures.
func TestIntegrationImportRefusesAndLeavesDB(t *testing.T) {
	central, made := centralStore(t, nix28, false)
	rows, err := ReadDBRows(context.Background(), dbDir(central))
	if err != nil {
		t.Fatal(err)
	}
	fresh := func(t *testing.T) nixtest.Store {
		b := storeOf(t, nix28)
		copyStore(t, central, filepath.Join(b.NixRoot(), "store"))
		return b
	}
	t.Run("schema version", func(t *testing.T) {
		b := fresh(t)
		if err := os.WriteFile(filepath.Join(dbDir(b), "schema"), []byte("11"), 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := ImportDB(context.Background(), dbDir(b), rows, nil)
		if !errors.Is(err, ErrUnknownSchema) || !strings.Contains(err.Error(), "schema version 11") {
			t.Fatalf("got %v", err)
		}
		os.WriteFile(filepath.Join(dbDir(b), "schema"), []byte("10"), 0o644)
		if d := b.DumpDB(t); strings.TrimSpace(d) != "" {
			t.Fatalf("db changed: %s", d)
		}
	})
	t.Run("extra column", func(t *testing.T) {
		b := fresh(t)
		db := openLiveDB(t, b)
		if _, err := db.Exec("ALTER TABLE ValidPaths ADD COLUMN future text"); err != nil {
			t.Fatal(err)
		}
		_, err := ImportDB(context.Background(), dbDir(b), rows, nil)
		if !errors.Is(err, ErrUnknownSchema) || !strings.Contains(err.Error(), "column future") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("no database", func(t *testing.T) {
		_, err := ImportDB(context.Background(), filepath.Join(t.TempDir(), "db"), rows, nil)
		if !errors.Is(err, ErrUnknownSchema) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("missing reference", func(t *testing.T) {
		b := fresh(t)
		// The built output without the tree it refers to.
		var part Rows
		for _, r := range rows.Paths {
			if r.Path != made[0] {
				part.Paths = append(part.Paths, r)
			}
		}
		_, err := ImportDB(context.Background(), dbDir(b), &part, nil)
		var mr *MissingRefsError
		if !errors.As(err, &mr) || mr.Missing[made[0]] == "" {
			t.Fatalf("got %v, want %s missing", err, made[0])
		}
		if d := b.DumpDB(t); strings.TrimSpace(d) != "" {
			t.Fatalf("db changed: %s", d)
		}
	})
	t.Run("valid paths keep their own rows", func(t *testing.T) {
		b := fresh(t)
		// made[2] is valid locally first, unsigned; the import must not
		// add the central signature to it or change its time.
		sub := &Rows{}
		for _, r := range rows.Paths {
			if r.Path == made[2] {
				r.Sigs = []string{"local-1:" + strings.Repeat("x", 20)}
				r.RegistrationTime = 12345
				sub.Paths = append(sub.Paths, r)
			}
		}
		if _, err := ImportDB(context.Background(), dbDir(b), sub, nil); err != nil {
			t.Fatal(err)
		}
		res, err := ImportDB(context.Background(), dbDir(b), rows, nil)
		if err != nil || res.Skipped != 1 || res.Imported != len(rows.Paths)-1 {
			t.Fatalf("%+v %v", res, err)
		}
		got := b.PathInfos(t, made[2])[made[2]]
		if got.RegistrationTime != 12345 || len(got.Signatures) != 1 || !strings.HasPrefix(got.Signatures[0], "local-1:") {
			t.Fatalf("pre-existing path changed: %+v", got)
		}
	})
}

// TestIntegrationImportNextToNixWriters: while ImportDB runs, other Nix
// processes keep adding paths to the same store (nix-store --add, which
// writes the DB under Nix's own locking). Both sides' paths end up valid
// and the store verifies: the import neither corrupts the DB nor loses a
// concurrent write.
func TestIntegrationImportNextToNixWriters(t *testing.T) {
	b := storeOf(t, nix28)
	// 20,000 synthetic paths (empty files; --verify without
	// --check-contents checks existence and the DB, not hashes), so the
	// import's transaction lasts while the writers run.
	synth := RowsFromInfos(fakeInfos("/nix/store", 20000, 3, 11))
	store := filepath.Join(b.NixRoot(), "store")
	for _, r := range synth.Paths {
		if err := os.WriteFile(filepath.Join(store, filepath.Base(r.Path)), nil, 0o444); err != nil {
			t.Fatal(err)
		}
	}
	var (
		wg      sync.WaitGroup
		stop    atomic.Bool
		added   []string
		mu      sync.Mutex
		started = make(chan struct{}, 2)
	)
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; !stop.Load() && i < 300; i++ {
				cmd := b.Command("nix-store", "--add", writeTemp(t, fmt.Sprintf("concurrent-%d-%d", w, i)))
				out, err := cmd.Output()
				if err != nil {
					t.Errorf("concurrent nix-store --add: %v", err)
					return
				}
				mu.Lock()
				added = append(added, strings.TrimSpace(string(out)))
				mu.Unlock()
				if i == 2 {
					started <- struct{}{}
				}
			}
		}()
	}
	schemaBefore := schemaOf(t, b)
	<-started
	<-started
	res, err := ImportDB(context.Background(), dbDir(b), synth, nil)
	stop.Store(true)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if res.Imported != len(synth.Paths) {
		t.Fatalf("imported %d of %d", res.Imported, len(synth.Paths))
	}
	if len(added) < 6 {
		t.Fatalf("writers added only %d paths", len(added))
	}
	t.Logf("imported %d paths while nix-store --add registered %d", res.Imported, len(added))
	invalid := b.Run(t, "nix-store", append([]string{"--check-validity", "--print-invalid"}, added...)...)
	if invalid != "" {
		t.Fatalf("concurrently added paths invalid: %s", invalid)
	}
	all, err := ReadDB(context.Background(), dbDir(b))
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != len(synth.Paths)+len(added) {
		t.Fatalf("DB has %d paths, want %d imported + %d added", len(all), len(synth.Paths), len(added))
	}
	if out, err := b.Command("nix-store", "--verify").CombinedOutput(); err != nil || strings.Contains(string(out), "error") {
		t.Fatalf("verify: %v\n%s", err, out)
	}
	var ok string
	if err := openLiveDB(t, b).QueryRow("PRAGMA integrity_check").Scan(&ok); err != nil || ok != "ok" {
		t.Fatalf("integrity_check: %q %v", ok, err)
	}
	noForeignKeyViolations(t, b)
	// The bulk import rebuilt an index: the schema is Nix's own again.
	if after := schemaOf(t, b); after != schemaBefore {
		t.Fatalf("schema changed by the import:\nbefore %s\nafter  %s", schemaBefore, after)
	}
	var idx int
	if err := openLiveDB(t, b).QueryRow("SELECT count(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = 'Refs'").Scan(&idx); err != nil || idx < 3 {
		t.Fatalf("Refs has %d indexes (%v)", idx, err)
	}
}

// schemaOf is the store DB's schema as SQLite records it.
func schemaOf(t *testing.T, b nixtest.Store) string {
	t.Helper()
	rows, err := openLiveDB(t, b).Query("SELECT type, name, tbl_name, coalesce(sql, '') FROM sqlite_master ORDER BY type, name")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var a, b, c, d string
		if err := rows.Scan(&a, &b, &c, &d); err != nil {
			t.Fatal(err)
		}
		out = append(out, a+" "+b+" "+c+" "+d)
	}
	return strings.Join(out, "\n")
}

// noForeignKeyViolations fails if any row of b's DB breaks a foreign key
// (ImportDB writes with them off; Nix relies on them for deletes).
func noForeignKeyViolations(t *testing.T, b nixtest.Store) {
	t.Helper()
	rows, err := openLiveDB(t, b).Query("PRAGMA foreign_key_check")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	n := 0
	for rows.Next() {
		n++
	}
	if n != 0 {
		t.Fatalf("%d foreign key violations after import", n)
	}
}

func writeTemp(t *testing.T, name string) string {
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(name+"\n"), 0o644); err != nil {
		t.Error(err)
	}
	return p
}

func pathsOf(rs *Rows) []string {
	out := make([]string, len(rs.Paths))
	for i := range rs.Paths {
		out[i] = rs.Paths[i].Path
	}
	return out
}

// TestIntegrationImportRoot: the GC root given with an import refers to
// every row, in Nix's own view (nix-store --query --references); a full
// import again with fewer rows drops the references to the others; an
// update renames the previous root (no longer valid) and drops only the
// references it is told to, keeping the rest; the foreign keys hold
// throughout.
func TestIntegrationImportRoot(t *testing.T) {
	central, _ := centralStore(t, nix28, false)
	rows, err := ReadDBRows(context.Background(), dbDir(central))
	if err != nil {
		t.Fatal(err)
	}
	b := storeOf(t, nix28)
	copyStore(t, central, filepath.Join(b.NixRoot(), "store"))
	root := func(name string) *RootUpdate {
		return &RootUpdate{Path: "/nix/store/" + strings.Repeat("r", 31) + name[len(name)-1:] + "-strata-" + name,
			NarHash: strings.Repeat("ab", 32), NarSize: 120}
	}
	refs := func(p string) []string {
		return strings.Fields(b.Run(t, "nix-store", "--query", "--references", p))
	}
	all := pathsOf(rows)
	r1 := root("generation-1")
	r1.Full = true
	if _, err := ImportDB(context.Background(), dbDir(b), rows, r1); err != nil {
		t.Fatal(err)
	}
	if got := refs(r1.Path); !slices.Equal(got, all) {
		t.Fatalf("root refers to %v, want all %d rows", got, len(all))
	}
	// Full again with every row but the first: the first is dropped.
	sub := &Rows{Paths: rows.Paths[1:]}
	if _, err := ImportDB(context.Background(), dbDir(b), sub, r1); err != nil {
		t.Fatal(err)
	}
	if got := refs(r1.Path); !slices.Equal(got, all[1:]) {
		t.Fatalf("full root again refers to %v, want %v", got, all[1:])
	}
	// Update: renamed, the second row removed, the first added back.
	r2 := root("generation-2")
	r2.Prev, r2.Remove = r1.Path, all[1:2]
	res, err := ImportDB(context.Background(), dbDir(b), &Rows{Paths: rows.Paths[:1]}, r2)
	if err != nil {
		t.Fatal(err)
	}
	if res.Imported != 0 || res.Skipped != 1 {
		t.Fatalf("result %+v, want the one row skipped as valid", res)
	}
	if out := b.Run(t, "nix-store", "--check-validity", "--print-invalid", r1.Path, r2.Path); out != r1.Path {
		t.Fatalf("invalid among the roots: %q, want only the renamed %s", out, r1.Path)
	}
	want := append(slices.Clone(all[:1]), all[2:]...)
	if got := refs(r2.Path); !slices.Equal(got, want) {
		t.Fatalf("updated root refers to %v, want %v", got, want)
	}
	noForeignKeyViolations(t, b)
	// The import gives ids itself: the AUTOINCREMENT counter follows
	// them, and a path Nix adds afterwards gets the next one.
	seqIsMax := func() int64 {
		var seq, max int64
		if err := openLiveDB(t, b).QueryRow("SELECT (SELECT seq FROM sqlite_sequence WHERE name = 'ValidPaths'), (SELECT max(id) FROM ValidPaths)").Scan(&seq, &max); err != nil {
			t.Fatal(err)
		}
		if seq != max {
			t.Fatalf("sqlite_sequence says %d, ValidPaths' largest id is %d", seq, max)
		}
		return max
	}
	before := seqIsMax()
	added := strings.TrimSpace(b.Run(t, "nix-store", "--add", writeTemp(t, "after-import")))
	var id int64
	if err := openLiveDB(t, b).QueryRow("SELECT id FROM ValidPaths WHERE path = ?", added).Scan(&id); err != nil || id != before+1 {
		t.Fatalf("path added by Nix after the import has id %d (%v), want %d", id, err, before+1)
	}
	seqIsMax()
}
