//go:build integration

package nixstore

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
)

// cliFor is a CLI on a nixtest chroot store.
func cliFor(s nixtest.Store) CLI {
	return CLI{
		Args: []string{"--store", s.Root, "--option", "build-users-group", "", "--option", "substituters", ""},
		Env:  []string{"NIX_CONFIG=", "PAGER=cat"},
	}
}

func dbDir(s nixtest.Store) string { return filepath.Join(s.NixRoot(), "var", "nix", "db") }

func newStore(t *testing.T) nixtest.Store {
	t.Helper()
	testenv.RequireRoot(t)
	return nixtest.New(t, filepath.Join(t.TempDir(), "root"))
}

// copyStore copies the files of a chroot store's nix/store into dst.
func copyStore(t *testing.T, s nixtest.Store, dst string) {
	t.Helper()
	if err := os.MkdirAll(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	testenv.Run(t, "cp", "-a", filepath.Join(s.NixRoot(), "store")+"/.", dst)
}

func openLiveDB(t *testing.T, s nixtest.Store) *sql.DB {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+filepath.Join(dbDir(s), dbFile)+"?_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// hasDeriverAndRefs fails t unless some record has a deriver and some
// record refers to another path: the comparisons below must not be vacuous.
func hasDeriverAndRefs(t *testing.T, infos []PathInfo) {
	t.Helper()
	var deriver, refs bool
	for _, in := range infos {
		deriver = deriver || in.Deriver != ""
		for _, r := range in.References {
			refs = refs || r != in.Path
		}
	}
	if !deriver || !refs {
		t.Fatalf("store has no deriver (%v) or no reference (%v): %v", deriver, refs, infos)
	}
}

func TestIntegrationReadDBEqualsDumpDB(t *testing.T) {
	s := newStore(t)
	made := s.Fill(t)
	dumped, err := ParseRegistration(strings.NewReader(s.DumpDB(t)))
	if err != nil {
		t.Fatal(err)
	}
	read, err := ReadDB(context.Background(), dbDir(s))
	if err != nil {
		t.Fatal(err)
	}
	hasDeriverAndRefs(t, read)
	if !reflect.DeepEqual(read, dumped) {
		t.Fatalf("ReadDB differs from nix-store --dump-db:\nReadDB: %v\ndump-db: %v", read, dumped)
	}
	for _, p := range made {
		if !slices.ContainsFunc(read, func(in PathInfo) bool { return in.Path == p }) {
			t.Errorf("ReadDB lacks %s", p)
		}
	}
	// Our writer reproduces nix-store's text byte for byte.
	var b bytes.Buffer
	if err := WriteRegistration(&b, read); err != nil {
		t.Fatal(err)
	}
	if b.String() != s.DumpDB(t) {
		t.Fatalf("WriteRegistration differs from dump-db:\n%s\nvs\n%s", b.String(), s.DumpDB(t))
	}
}

func TestIntegrationLoadDBRoundTrip(t *testing.T) {
	a := newStore(t)
	a.Fill(t)
	infos, err := ReadDB(context.Background(), dbDir(a))
	if err != nil {
		t.Fatal(err)
	}
	b := newStore(t)
	copyStore(t, a, filepath.Join(b.NixRoot(), "store")) // .drv files are read during load
	var reg bytes.Buffer
	if err := WriteRegistration(&reg, infos); err != nil {
		t.Fatal(err)
	}
	cmd := b.Command("nix-store", "--load-db")
	cmd.Stdin = &reg
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nix-store --load-db: %v\n%s", err, out)
	}
	got, err := cliFor(b).DumpDB(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, infos) {
		t.Fatalf("loaded and dumped again:\n%v\nwant\n%v", got, infos)
	}
}

// A snapshot taken while the newest transactions are still in db.sqlite-wal
// (a nix-daemon keeps the DB open, so they often are) is read with them.
func TestIntegrationReadDBReplaysWAL(t *testing.T) {
	s := newStore(t)
	s.Fill(t)
	before, err := ReadDB(context.Background(), dbDir(s))
	if err != nil {
		t.Fatal(err)
	}

	// An open read transaction pins the WAL: no checkpoint, not even Nix's
	// on exit, can copy frames past it into db.sqlite.
	db := openLiveDB(t, s)
	tx, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	var n int
	if err := tx.QueryRow("SELECT count(*) FROM ValidPaths").Scan(&n); err != nil || n != len(before) {
		t.Fatalf("count = %d, %v; want %d", n, err, len(before))
	}
	added := []string{s.AddText(t, "late-1", "one\n"), s.AddText(t, "late-2", "two\n")}

	snap := t.TempDir()
	for _, name := range []string{dbFile, dbFile + walSuffix} {
		testenv.Run(t, "cp", filepath.Join(dbDir(s), name), filepath.Join(snap, name))
	}
	if st, err := os.Stat(filepath.Join(snap, dbFile+walSuffix)); err != nil || st.Size() == 0 {
		t.Fatalf("no WAL to replay: %v", err)
	}
	if err := os.Chmod(snap, 0o555); err != nil {
		t.Fatal(err)
	}
	got, err := ReadDB(context.Background(), snap)
	if err != nil {
		t.Fatal(err)
	}
	want, err := ParseRegistration(strings.NewReader(s.DumpDB(t)))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("ReadDB of db.sqlite+wal:\n%v\nwant dump-db:\n%v", got, want)
	}

	// Proof that the new paths were only in the WAL.
	alone := t.TempDir()
	testenv.Run(t, "cp", filepath.Join(snap, dbFile), filepath.Join(alone, dbFile))
	old, err := ReadDB(context.Background(), alone)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range added {
		if slices.ContainsFunc(old, func(in PathInfo) bool { return in.Path == p }) {
			t.Fatalf("%s is already in db.sqlite: the test did not keep it in the WAL", p)
		}
		if !slices.ContainsFunc(got, func(in PathInfo) bool { return in.Path == p }) {
			t.Fatalf("ReadDB lacks %s", p)
		}
	}
}

func TestIntegrationVerify(t *testing.T) {
	s := newStore(t)
	s.Fill(t)
	infos, err := ReadDB(context.Background(), dbDir(s))
	if err != nil {
		t.Fatal(err)
	}
	hasDeriverAndRefs(t, infos)
	snap := filepath.Join(t.TempDir(), "store")
	copyStore(t, s, snap)
	if err := Verify(snap, "/nix/store", infos); err != nil {
		t.Fatalf("intact copy: %v", err)
	}

	t.Run("path removed", func(t *testing.T) {
		broken := filepath.Join(t.TempDir(), "store")
		copyStore(t, s, broken)
		gone := infos[len(infos)/2].Path
		if err := os.RemoveAll(filepath.Join(broken, filepath.Base(gone))); err != nil {
			t.Fatal(err)
		}
		err := Verify(broken, "/nix/store", infos)
		var ve *VerifyError
		if !errors.As(err, &ve) || !slices.Equal(ve.Missing, []string{gone}) {
			t.Fatalf("got %v; want %s missing", err, gone)
		}
		if want := "verify registration: 1 registered path missing from snapshot: " + gone; err.Error() != want {
			t.Fatalf("message %q, want %q", err, want)
		}
	})

	t.Run("unregistered reference", func(t *testing.T) {
		// Drop the record of a path another path refers to.
		var cut []PathInfo
		var gone string
		for _, in := range infos {
			if gone == "" && refersTo(infos, in.Path) {
				gone = in.Path
				continue
			}
			cut = append(cut, in)
		}
		err := Verify(snap, "/nix/store", cut)
		var ve *VerifyError
		if !errors.As(err, &ve) || len(ve.Unregistered) == 0 || len(ve.Missing) != 0 ||
			!strings.HasPrefix(ve.Unregistered[0], gone+" (referenced by /nix/store/") {
			t.Fatalf("got %v; want %s unregistered", err, gone)
		}
	})
}

// LoadDB registers only paths that are not valid yet, so what a builder
// knows about its own paths (signatures, content address) survives.
func TestIntegrationLoadDBSkipsValidPaths(t *testing.T) {
	ctx := context.Background()
	a := newStore(t)
	a.Fill(t)
	infos, err := ReadDB(ctx, dbDir(a))
	if err != nil {
		t.Fatal(err)
	}
	b := newStore(t)
	own := b.AddText(t, "own", "built here\n") // has a ca field
	copyStore(t, a, filepath.Join(b.NixRoot(), "store"))
	cli := cliFor(b)

	// First the paths that refer to nothing but themselves.
	var first []PathInfo
	for _, in := range infos {
		if len(in.References) == 0 || slices.Equal(in.References, []string{in.Path}) {
			first = append(first, in)
		}
	}
	if len(first) == 0 || len(first) == len(infos) {
		t.Fatalf("bad split: %d of %d", len(first), len(infos))
	}
	n, err := cli.LoadDB(ctx, first)
	if err != nil || n != len(first) {
		t.Fatalf("LoadDB(first) = %d, %v; want %d", n, err, len(first))
	}
	// Give a loaded path a signature, as `nix store sign` would.
	db := openLiveDB(t, b)
	if _, err := db.Exec("UPDATE ValidPaths SET sigs = 'cache-1:c2lnbmF0dXJl' WHERE path = ?", first[0].Path); err != nil {
		t.Fatal(err)
	}
	db.Close()

	all := append(slices.Clone(infos), mustRecord(t, b, own))
	Sort(all)
	n, err = cli.LoadDB(ctx, all)
	if err != nil || n != len(infos)-len(first) {
		t.Fatalf("LoadDB(all) = %d, %v; want %d", n, err, len(infos)-len(first))
	}
	got, err := cli.DumpDB(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, all) {
		t.Fatalf("after LoadDB: %v\nwant %v", got, all)
	}
	sigs, ca := sigsAndCA(t, b, first[0].Path)
	if sigs != "cache-1:c2lnbmF0dXJl" {
		t.Errorf("signature of already-valid %s wiped: %q", first[0].Path, sigs)
	}
	if _, ca = sigsAndCA(t, b, own); !strings.HasPrefix(ca, "fixed:r:sha256:") {
		t.Errorf("content address of %s wiped: %q", own, ca)
	}

	// Control: nix-store --load-db of the same registration does wipe them,
	// so the checks above can fail.
	var reg bytes.Buffer
	WriteRegistration(&reg, all)
	cmd := b.Command("nix-store", "--load-db")
	cmd.Stdin = &reg
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nix-store --load-db: %v\n%s", err, out)
	}
	if sigs, _ := sigsAndCA(t, b, first[0].Path); sigs != "" {
		t.Fatalf("control: plain --load-db kept the signature %q; the test proves nothing", sigs)
	}
	if _, ca := sigsAndCA(t, b, own); ca != "" {
		t.Fatalf("control: plain --load-db kept the content address %q; the test proves nothing", ca)
	}
}

func sigsAndCA(t *testing.T, s nixtest.Store, p string) (string, string) {
	t.Helper()
	db := openLiveDB(t, s)
	defer db.Close()
	var sigs, ca sql.NullString
	if err := db.QueryRow("SELECT sigs, ca FROM ValidPaths WHERE path = ?", p).Scan(&sigs, &ca); err != nil {
		t.Fatalf("%s: %v", p, err)
	}
	return sigs.String, ca.String
}

func mustRecord(t *testing.T, s nixtest.Store, p string) PathInfo {
	t.Helper()
	infos, err := ReadDB(context.Background(), dbDir(s))
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(infos, func(in PathInfo) bool { return in.Path == p })
	if i < 0 {
		t.Fatalf("%s not registered", p)
	}
	return infos[i]
}
