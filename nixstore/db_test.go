package nixstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// nixSchema is Nix 2.8's schema.sql (schema version 10), as a real store
// has it.
const nixSchema = `
CREATE TABLE ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer,
    sigs             text,
    ca               text
);
CREATE TABLE Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);
CREATE INDEX IndexReferrer on Refs(referrer);
CREATE INDEX IndexReference on Refs(reference);
CREATE TABLE DerivationOutputs (
    drv  integer not null,
    id   text not null,
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);
`

func openTestDB(t testing.TB, dir string) *sql.DB {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+filepath.Join(dir, dbFile)+"?_pragma=journal_mode(wal)&_pragma=wal_autocheckpoint(0)")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// writeTestDB inserts infos the way Nix does (hash as "sha256:<base16>",
// ids assigned in insertion order, which is not path order).
func writeTestDB(t testing.TB, db *sql.DB, infos []PathInfo, hashOf func(string) string) {
	t.Helper()
	ctx := context.Background()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	ins, err := tx.Prepare("INSERT INTO ValidPaths (path, hash, registrationTime, deriver, narSize) VALUES (?, ?, ?, ?, ?)")
	if err != nil {
		t.Fatal(err)
	}
	ids := map[string]int64{}
	var rows []int
	for i := len(infos) - 1; i >= 0; i-- { // reverse: ids do not follow path order
		rows = append(rows, i)
	}
	for _, i := range rows {
		in := infos[i]
		var deriver any
		if in.Deriver != "" {
			deriver = in.Deriver
		}
		res, err := ins.Exec(in.Path, hashOf(in.NarHash), time.Now().Unix(), deriver, int64(in.NarSize))
		if err != nil {
			t.Fatal(err)
		}
		ids[in.Path], _ = res.LastInsertId()
	}
	ref, err := tx.Prepare("INSERT INTO Refs (referrer, reference) VALUES (?, ?)")
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range infos {
		for _, r := range in.References {
			id, ok := ids[r]
			if !ok { // registered by an earlier transaction
				if err := tx.QueryRow("SELECT id FROM ValidPaths WHERE path = ?", r).Scan(&id); err != nil {
					t.Fatalf("reference %s: %v", r, err)
				}
			}
			if _, err := ref.Exec(ids[in.Path], id); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
}

func newTestDB(t testing.TB, infos []PathInfo, hashOf func(string) string) string {
	t.Helper()
	dir := t.TempDir()
	db := openTestDB(t, dir)
	if _, err := db.Exec(nixSchema); err != nil {
		t.Fatal(err)
	}
	writeTestDB(t, db, infos, hashOf)
	if err := db.Close(); err != nil { // last connection: folds the WAL in
		t.Fatal(err)
	}
	return dir
}

func prefixed(h string) string { return "sha256:" + h }

func TestReadDB(t *testing.T) {
	infos := fakeInfos("/nix/store", 500, 6, 9)
	dir := newTestDB(t, infos, prefixed)
	got, err := ReadDB(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, infos) {
		t.Fatalf("ReadDB differs from what was written (%d vs %d records)", len(got), len(infos))
	}
	// The db dir itself is untouched: no -wal/-shm created next to it.
	if _, err := os.Stat(filepath.Join(dir, dbFile+"-shm")); err == nil {
		t.Fatal("ReadDB created a -shm file in the db dir")
	}
}

func TestReadDBOtherHashEncodings(t *testing.T) {
	infos := fakeInfos("/nix/store", 20, 2, 4)
	dir := newTestDB(t, infos, func(h string) string {
		b := mustHex(t, h)
		return "sha256:" + encodeNix32(b)
	})
	got, err := ReadDB(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, infos) {
		t.Fatal("base-32 hashes were not converted to base16")
	}
}

// A database whose last transaction is only in the -wal file is read with
// that transaction, from a read-only copy of the directory.
func TestReadDBReplaysWAL(t *testing.T) {
	old := fakeInfos("/nix/store", 40, 3, 11)
	all := append([]PathInfo{}, old...)
	for i := 0; i < 20; i++ {
		p := fakePath("/nix/store", fmt.Sprintf("new-%d", i))
		all = append(all, PathInfo{Path: p, NarHash: fakeHash(p), NarSize: 1, References: sortedPair(old[i].Path, p)})
	}
	dir := t.TempDir()
	db := openTestDB(t, dir)
	if _, err := db.Exec(nixSchema); err != nil {
		t.Fatal(err)
	}
	writeTestDB(t, db, old, prefixed)
	if _, err := db.Exec("PRAGMA wal_checkpoint(TRUNCATE)"); err != nil {
		t.Fatal(err)
	}
	// The second transaction registers the other 20 paths.
	var second []PathInfo
	for _, in := range all {
		if !containsPath(old, in.Path) {
			second = append(second, in)
		}
	}
	writeTestDB(t, db, second, prefixed)

	// Snapshot the directory (db.sqlite + -wal + -shm) while the writer
	// still has it open, then make the copy read-only.
	snap := t.TempDir()
	for _, name := range []string{dbFile, dbFile + "-wal", dbFile + "-shm"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(snap, name), b, 0o444); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(snap, 0o555); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Chmod(snap, 0o755) })

	got, err := ReadDB(context.Background(), snap)
	if err != nil {
		t.Fatal(err)
	}
	want := append([]PathInfo{}, all...)
	Sort(want)
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("ReadDB with WAL: %d records, want %d", len(got), len(want))
	}

	// Proof that the second transaction lived only in the WAL: db.sqlite
	// alone has just the first.
	alone := t.TempDir()
	b, _ := os.ReadFile(filepath.Join(snap, dbFile))
	if err := os.WriteFile(filepath.Join(alone, dbFile), b, 0o644); err != nil {
		t.Fatal(err)
	}
	got, err = ReadDB(context.Background(), alone)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(old) {
		t.Fatalf("db.sqlite alone has %d records, want %d: the WAL was already folded in", len(got), len(old))
	}
}

func sortedPair(a, b string) []string {
	if a > b {
		a, b = b, a
	}
	return []string{a, b}
}

func containsPath(infos []PathInfo, p string) bool {
	for _, in := range infos {
		if in.Path == p {
			return true
		}
	}
	return false
}

func TestReadDBErrors(t *testing.T) {
	ctx := context.Background()
	t.Run("missing", func(t *testing.T) {
		_, err := ReadDB(ctx, t.TempDir())
		if err == nil || !strings.Contains(err.Error(), "db.sqlite: no such file") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("not a database", func(t *testing.T) {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, dbFile), []byte(strings.Repeat("garbage!", 1000)), 0o644)
		_, err := ReadDB(ctx, dir)
		if err == nil || !strings.Contains(err.Error(), "not a database") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("truncated", func(t *testing.T) {
		dir := newTestDB(t, fakeInfos("/nix/store", 2000, 3, 1), prefixed)
		p := filepath.Join(dir, dbFile)
		st, _ := os.Stat(p)
		os.Truncate(p, st.Size()/3)
		_, err := ReadDB(ctx, dir)
		if err == nil {
			t.Fatal("truncated db read without error")
		}
		t.Log(err)
	})
	for name, schema := range map[string]string{
		"no ValidPaths":  "CREATE TABLE Other (x)",
		"no narSize":     "CREATE TABLE ValidPaths (id integer primary key, path text, hash text, deriver text); CREATE TABLE Refs (referrer, reference)",
		"no Refs table":  "CREATE TABLE ValidPaths (id integer primary key, path text, hash text, deriver text, narSize integer)",
		"renamed column": "CREATE TABLE ValidPaths (id integer primary key, path text, hash text, deriver text, narSize integer); CREATE TABLE Refs (referrer, ref)",
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			db := openTestDB(t, dir)
			if _, err := db.Exec(schema); err != nil {
				t.Fatal(err)
			}
			db.Close()
			_, err := ReadDB(ctx, dir)
			if err == nil || !strings.Contains(err.Error(), "unknown schema") {
				t.Fatalf("got %v", err)
			}
		})
	}
	t.Run("bad hash", func(t *testing.T) {
		dir := newTestDB(t, fakeInfos("/nix/store", 3, 0, 1), func(string) string { return "sha256:nothex" })
		_, err := ReadDB(ctx, dir)
		if err == nil || !strings.Contains(err.Error(), "nothex") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("dangling reference", func(t *testing.T) {
		dir := t.TempDir()
		db := openTestDB(t, dir)
		db.Exec(nixSchema)
		p := fakePath("/nix/store", "x")
		if _, err := db.Exec("INSERT INTO ValidPaths (id, path, hash, registrationTime) VALUES (1, ?, ?, 0); INSERT INTO Refs VALUES (1, 99)", p, prefixed(fakeHash("x"))); err != nil {
			t.Fatal(err)
		}
		db.Close()
		_, err := ReadDB(ctx, dir)
		if err == nil || !strings.Contains(err.Error(), "refers to id 99") {
			t.Fatalf("got %v", err)
		}
	})
}

func mustHex(t testing.TB, h string) []byte {
	t.Helper()
	out := make([]byte, len(h)/2)
	for i := range out {
		var v byte
		for _, c := range h[2*i : 2*i+2] {
			v <<= 4
			switch {
			case c >= '0' && c <= '9':
				v |= byte(c - '0')
			default:
				v |= byte(c-'a') + 10
			}
		}
		out[i] = v
	}
	return out
}

// BenchmarkReadDB reads a 100,000-path database with about 5 references
// per path (the publish budget is well under 1 s).
func BenchmarkReadDB(b *testing.B) {
	infos := fakeInfos("/nix/store", 100_000, 10, 42)
	dir := newTestDB(b, infos, prefixed)
	b.ResetTimer()
	for b.Loop() {
		got, err := ReadDB(context.Background(), dir)
		if err != nil || len(got) != len(infos) {
			b.Fatal(err)
		}
	}
}

func TestReadDBEmptyWAL(t *testing.T) {
	infos := fakeInfos("/nix/store", 50, 3, 6)
	dir := newTestDB(t, infos, prefixed)
	// A store whose writer checkpointed and truncated its log leaves an
	// empty -wal behind; it is read in place.
	if err := os.WriteFile(filepath.Join(dir, dbFile+walSuffix), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o555)
	t.Cleanup(func() { os.Chmod(dir, 0o755) })
	got, err := ReadDB(context.Background(), dir)
	if err != nil || !reflect.DeepEqual(got, infos) {
		t.Fatalf("ReadDB with empty WAL: %d records, %v", len(got), err)
	}
}

func TestReadDBCanceled(t *testing.T) {
	dir := newTestDB(t, fakeInfos("/nix/store", 50, 3, 6), prefixed)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := ReadDB(ctx, dir); err == nil || !errors.Is(err, context.Canceled) {
		t.Fatalf("canceled ReadDB: %v", err)
	}
}
