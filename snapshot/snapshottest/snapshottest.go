// Package snapshottest is the conformance suite every snapshot.Backend
// passes. A backend's integration test calls Run with a function that makes
// a fresh central store and a Backend over it; the suite then checks, as a
// user of generations would:
//
//   - a snapshot's Path shows the store exactly as it was at Create,
//     including var/nix/db, and later writes and deletes in the live store
//     do not change it;
//   - Path is read-only: every kind of write fails with EROFS;
//   - Create of an existing generation fails with snapshot.ErrExists, also
//     when several Creates race, and leaves the first snapshot intact;
//   - List is ordered by ID (numerically), shows only strata-N snapshots,
//     and snapshots made by hand under other names are neither listed nor
//     destroyed;
//   - Destroy removes a snapshot and its Path; a second Destroy and a
//     Destroy of an unknown id fail with snapshot.ErrNotFound;
//   - id 0 is refused, a cancelled context creates nothing;
//   - a Backend made anew over the same store (a daemon restart) lists the
//     same snapshots, with readable Paths, and can create the next one;
//   - labels given to Create are bound to the snapshot: Create and List
//     return them, SetLabels sets and removes them without changing a file
//     or the snapshot's read-only state, a restarted Backend lists them,
//     and labels a backend cannot store are refused before anything is
//     made.
package snapshottest

import (
	"context"
	"errors"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/strata-nix/strata/snapshot"
)

// Env is one backend under test over a fresh central store.
type Env struct {
	// Backend is the backend under test. The suite creates, lists and
	// destroys snapshots with ids of its choosing; the store starts with
	// no strata snapshots.
	Backend snapshot.Backend
	// Root is the live central-store root on this host: a writable
	// directory that already holds store/ and var/nix/db/. The suite
	// writes and removes files under it.
	Root string
	// Reopen returns a new Backend over the same store and snapshots, made
	// the way a restarted daemon makes it (the backend's New).
	Reopen func(t *testing.T) snapshot.Backend
	// Foreign takes a snapshot of the store by hand, outside the backend,
	// under a name strata does not own (e.g. "manual"), and returns a
	// function reporting whether that snapshot still exists.
	Foreign func(t *testing.T, name string) (exists func() bool)
}

// Run runs the conformance suite. newEnv is called once per subtest and
// must register its own cleanup with t.Cleanup.
func Run(t *testing.T, newEnv func(t *testing.T) Env) {
	t.Run("Kind", func(t *testing.T) {
		e := newEnv(t)
		if k := e.Backend.Kind(); k != "btrfs" && k != "zfs" {
			t.Errorf("Kind() = %q, want btrfs or zfs", k)
		}
	})
	t.Run("ContentFrozenAtCreate", func(t *testing.T) { testContent(t, newEnv(t)) })
	t.Run("ReadOnly", func(t *testing.T) { testReadOnly(t, newEnv(t)) })
	t.Run("Exists", func(t *testing.T) { testExists(t, newEnv(t)) })
	t.Run("ListOrderAndForeign", func(t *testing.T) { testList(t, newEnv(t)) })
	t.Run("Destroy", func(t *testing.T) { testDestroy(t, newEnv(t)) })
	t.Run("BadInput", func(t *testing.T) { testBadInput(t, newEnv(t)) })
	t.Run("Restart", func(t *testing.T) { testRestart(t, newEnv(t)) })
	t.Run("Labels", func(t *testing.T) { testLabels(t, newEnv(t)) })
}

// tree is a directory's content: relative path -> file content, "->target"
// for a symlink, "/" for a directory.
type tree map[string]string

func write(t *testing.T, root, rel, content string) {
	t.Helper()
	p := filepath.Join(root, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if target, ok := cutArrow(content); ok {
		_ = os.Remove(p)
		if err := os.Symlink(target, p); err != nil {
			t.Fatal(err)
		}
		return
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func cutArrow(s string) (string, bool) {
	if len(s) > 2 && s[:2] == "->" {
		return s[2:], true
	}
	return "", false
}

func remove(t *testing.T, root, rel string) {
	t.Helper()
	if err := os.RemoveAll(filepath.Join(root, rel)); err != nil {
		t.Fatal(err)
	}
}

// read walks dir (never following symlinks) into a tree.
func read(t *testing.T, dir string) tree {
	t.Helper()
	got := tree{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		switch {
		case rel == ".":
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			got[rel] = "->" + target
		case d.IsDir():
			got[rel] = "/"
		default:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			got[rel] = string(b)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("read snapshot %s: %v", dir, err)
	}
	return got
}

// files is what the suite writes into a store: a store path with a
// subdirectory and a symlink, and a database file.
func initial() map[string]string {
	return map[string]string{
		"store/aaaa-hello/bin/hello":  "#!/bin/sh\necho hello\n",
		"store/aaaa-hello/share/doc":  "v1",
		"store/aaaa-hello/lib":        "->bin",
		"store/bbbb-gone.txt":         "deleted later",
		"store/cccc-changed":          "before",
		"var/nix/db/db.sqlite":        "database v1",
		"var/nix/db/db.sqlite-wal":    "wal v1",
		"store/.links/0123456789abcd": "hardlink farm entry",
	}
}

// expect is the tree a snapshot must show: files plus their directories,
// plus every directory that was in the live root (store/, var/nix/db/, ...).
func expect(t *testing.T, root string) tree {
	t.Helper()
	return read(t, root)
}

func equal(t *testing.T, what string, got, want tree) {
	t.Helper()
	for k, w := range want {
		if g, ok := got[k]; !ok {
			t.Errorf("%s: %s missing", what, k)
		} else if g != w {
			t.Errorf("%s: %s = %q, want %q", what, k, g, w)
		}
	}
	for k, g := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("%s: unexpected %s (%q)", what, k, g)
		}
	}
}

func mustCreate(t *testing.T, b snapshot.Backend, id uint64) snapshot.Snapshot {
	t.Helper()
	before := time.Now()
	s, err := b.Create(context.Background(), id, snapshot.Labels{"generation": strconv.FormatUint(id, 10)})
	if err != nil {
		t.Fatalf("Create(%d): %v", id, err)
	}
	after := time.Now()
	if s.ID != id || s.Name != snapshot.Name(id) {
		t.Errorf("Create(%d) = {ID %d, Name %q}, want {ID %d, Name %q}", id, s.ID, s.Name, id, snapshot.Name(id))
	}
	if s.Path == "" || !filepath.IsAbs(s.Path) {
		t.Errorf("Create(%d).Path = %q, want an absolute path", id, s.Path)
	}
	// Backends may report creation times in whole seconds.
	if s.Created.Before(before.Truncate(time.Second).Add(-time.Second)) || s.Created.After(after.Add(time.Second)) {
		t.Errorf("Create(%d).Created = %v, want between %v and %v", id, s.Created, before, after)
	}
	return s
}

func list(t *testing.T, b snapshot.Backend) []snapshot.Snapshot {
	t.Helper()
	l, err := b.List(context.Background())
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	return l
}

func ids(l []snapshot.Snapshot) []uint64 {
	out := make([]uint64, 0, len(l))
	for _, s := range l {
		out = append(out, s.ID)
	}
	return out
}

func sameIDs(a []uint64, b ...uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func populate(t *testing.T, root string) {
	t.Helper()
	for rel, c := range initial() {
		write(t, root, rel, c)
	}
}

func testContent(t *testing.T, e Env) {
	populate(t, e.Root)
	want1 := expect(t, e.Root)
	s1 := mustCreate(t, e.Backend, 1)
	equal(t, "snapshot 1 at create", read(t, s1.Path), want1)

	// Change the live store: overwrite, delete, add, including the DB.
	write(t, e.Root, "store/cccc-changed", "after")
	remove(t, e.Root, "store/bbbb-gone.txt")
	write(t, e.Root, "store/dddd-new/file", "new")
	write(t, e.Root, "var/nix/db/db.sqlite", "database v2")
	write(t, e.Root, "store/aaaa-hello/lib", "->share")
	want2 := expect(t, e.Root)

	equal(t, "snapshot 1 after live changes", read(t, s1.Path), want1)
	s2 := mustCreate(t, e.Backend, 2)
	equal(t, "snapshot 2", read(t, s2.Path), want2)
	equal(t, "snapshot 1 after snapshot 2", read(t, s1.Path), want1)
	if s1.Path == s2.Path {
		t.Errorf("snapshots 1 and 2 share Path %s", s1.Path)
	}
	// Listed snapshots show the same content.
	for _, s := range list(t, e.Backend) {
		want := map[uint64]tree{1: want1, 2: want2}[s.ID]
		equal(t, "listed "+s.Name, read(t, s.Path), want)
	}
}

func wantEROFS(t *testing.T, what string, err error) {
	t.Helper()
	if !errors.Is(err, syscall.EROFS) {
		t.Errorf("%s: err = %v, want EROFS", what, err)
	}
}

func testReadOnly(t *testing.T, e Env) {
	populate(t, e.Root)
	s := mustCreate(t, e.Backend, 1)
	p := func(rel string) string { return filepath.Join(s.Path, rel) }

	wantEROFS(t, "create file", os.WriteFile(p("store/new"), []byte("x"), 0o644))
	f, err := os.OpenFile(p("store/cccc-changed"), os.O_WRONLY, 0)
	if err == nil {
		f.Close()
	}
	wantEROFS(t, "open existing file for writing", err)
	wantEROFS(t, "mkdir", os.Mkdir(p("store/newdir"), 0o755))
	wantEROFS(t, "remove", os.Remove(p("store/bbbb-gone.txt")))
	wantEROFS(t, "rename", os.Rename(p("store/cccc-changed"), p("store/renamed")))
	wantEROFS(t, "chmod", os.Chmod(p("store/cccc-changed"), 0o600))
	wantEROFS(t, "symlink", os.Symlink("x", p("store/link")))
	wantEROFS(t, "write database", os.WriteFile(p("var/nix/db/db.sqlite"), []byte("x"), 0o644))
	wantEROFS(t, "create in snapshot root", os.WriteFile(p("new-top"), []byte("x"), 0o644))
	equal(t, "snapshot after write attempts", read(t, s.Path), expect(t, e.Root))
}

func testExists(t *testing.T, e Env) {
	populate(t, e.Root)
	s1 := mustCreate(t, e.Backend, 1)
	want := read(t, s1.Path)
	write(t, e.Root, "store/cccc-changed", "after")
	if _, err := e.Backend.Create(context.Background(), 1, nil); !errors.Is(err, snapshot.ErrExists) {
		t.Errorf("second Create(1): err = %v, want ErrExists", err)
	}
	equal(t, "snapshot 1 after duplicate create", read(t, s1.Path), want)

	// Racing creates of one id: exactly one wins.
	const n = 4
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() { _, errs[i] = e.Backend.Create(context.Background(), 2, nil) })
	}
	wg.Wait()
	won := 0
	for _, err := range errs {
		switch {
		case err == nil:
			won++
		case !errors.Is(err, snapshot.ErrExists):
			t.Errorf("racing Create(2): err = %v, want nil or ErrExists", err)
		}
	}
	if won != 1 {
		t.Errorf("racing Create(2): %d succeeded, want exactly 1", won)
	}
	if got := ids(list(t, e.Backend)); !sameIDs(got, 1, 2) {
		t.Errorf("List after duplicates = %v, want [1 2]", got)
	}
}

func testList(t *testing.T, e Env) {
	populate(t, e.Root)
	if got := list(t, e.Backend); len(got) != 0 {
		t.Errorf("List of a fresh store = %v, want none", ids(got))
	}
	var foreign []func() bool
	for _, name := range []string{"manual", "strata-0", "strata-x", "strata-01"} {
		foreign = append(foreign, e.Foreign(t, name))
	}
	made := map[uint64]snapshot.Snapshot{}
	for _, id := range []uint64{3, 1, 10, 2} {
		made[id] = mustCreate(t, e.Backend, id)
	}
	l := list(t, e.Backend)
	if got := ids(l); !sameIDs(got, 1, 2, 3, 10) {
		t.Fatalf("List = %v, want [1 2 3 10]", got)
	}
	for _, s := range l {
		m := made[s.ID]
		if s.Name != snapshot.Name(s.ID) || s.Path != m.Path || !s.Created.Equal(m.Created) {
			t.Errorf("List entry %+v, want %+v", s, m)
		}
		if _, err := os.Stat(filepath.Join(s.Path, "var/nix/db/db.sqlite")); err != nil {
			t.Errorf("listed %s: %v", s.Name, err)
		}
	}
	for _, id := range []uint64{1, 2, 3, 10} {
		if err := e.Backend.Destroy(context.Background(), id); err != nil {
			t.Errorf("Destroy(%d): %v", id, err)
		}
	}
	for i, exists := range foreign {
		if !exists() {
			t.Errorf("foreign snapshot %d was removed by the backend", i)
		}
	}
	if got := list(t, e.Backend); len(got) != 0 {
		t.Errorf("List after destroying all = %v, want none", ids(got))
	}
}

func testDestroy(t *testing.T, e Env) {
	populate(t, e.Root)
	s1 := mustCreate(t, e.Backend, 1)
	s2 := mustCreate(t, e.Backend, 2)
	if err := e.Backend.Destroy(context.Background(), 1); err != nil {
		t.Fatalf("Destroy(1): %v", err)
	}
	if got := ids(list(t, e.Backend)); !sameIDs(got, 2) {
		t.Errorf("List after Destroy(1) = %v, want [2]", got)
	}
	if _, err := os.Stat(filepath.Join(s1.Path, "store")); err == nil {
		t.Errorf("destroyed snapshot still readable at %s", s1.Path)
	}
	equal(t, "snapshot 2 after destroying 1", read(t, s2.Path), expect(t, e.Root))
	if err := e.Backend.Destroy(context.Background(), 1); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("second Destroy(1): err = %v, want ErrNotFound", err)
	}
	if err := e.Backend.Destroy(context.Background(), 99); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("Destroy(99): err = %v, want ErrNotFound", err)
	}
	if _, err := os.Stat(e.Root + "/store/cccc-changed"); err != nil {
		t.Errorf("live store damaged by Destroy: %v", err)
	}
}

func testBadInput(t *testing.T, e Env) {
	populate(t, e.Root)
	if _, err := e.Backend.Create(context.Background(), 0, nil); err == nil {
		t.Error("Create(0) succeeded, want an error")
	}
	if err := e.Backend.Destroy(context.Background(), 0); err == nil {
		t.Error("Destroy(0) succeeded, want an error")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := e.Backend.Create(ctx, 1, nil); !errors.Is(err, context.Canceled) {
		t.Errorf("Create with a cancelled context: err = %v, want context.Canceled", err)
	}
	if _, err := e.Backend.List(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("List with a cancelled context: err = %v, want context.Canceled", err)
	}
	if got := list(t, e.Backend); len(got) != 0 {
		t.Errorf("List after refused creates = %v, want none", ids(got))
	}
	// The refused create must not block the id.
	mustCreate(t, e.Backend, 1)
}

func testRestart(t *testing.T, e Env) {
	populate(t, e.Root)
	s1 := mustCreate(t, e.Backend, 1)
	want1 := read(t, s1.Path)
	write(t, e.Root, "store/cccc-changed", "after")
	s2 := mustCreate(t, e.Backend, 2)
	want2 := read(t, s2.Path)

	b := e.Reopen(t)
	l := list(t, b)
	if got := ids(l); !sameIDs(got, 1, 2) {
		t.Fatalf("List after restart = %v, want [1 2]", got)
	}
	for i, w := range []snapshot.Snapshot{s1, s2} {
		if l[i].Name != w.Name || !l[i].Created.Equal(w.Created) {
			t.Errorf("after restart: %+v, want %+v", l[i], w)
		}
	}
	equal(t, "snapshot 1 after restart", read(t, l[0].Path), want1)
	equal(t, "snapshot 2 after restart", read(t, l[1].Path), want2)
	if _, err := b.Create(context.Background(), 2, nil); !errors.Is(err, snapshot.ErrExists) {
		t.Errorf("Create(2) after restart: err = %v, want ErrExists", err)
	}
	mustCreate(t, b, 3)
	if err := b.Destroy(context.Background(), 1); err != nil {
		t.Errorf("Destroy(1) after restart: %v", err)
	}
	if got := ids(list(t, b)); !sameIDs(got, 2, 3) {
		t.Errorf("List after restart, create and destroy = %v, want [2 3]", got)
	}
}

func sameLabels(t *testing.T, what string, got, want snapshot.Labels) {
	t.Helper()
	if got == nil {
		t.Errorf("%s: labels are nil, want a map", what)
	}
	if !maps.Equal(got, want) {
		t.Errorf("%s: labels %v, want %v", what, got, want)
	}
}

func listed(t *testing.T, b snapshot.Backend, id uint64) snapshot.Snapshot {
	t.Helper()
	for _, s := range list(t, b) {
		if s.ID == id {
			return s
		}
	}
	t.Fatalf("generation %d not listed", id)
	return snapshot.Snapshot{}
}

func testLabels(t *testing.T, e Env) {
	populate(t, e.Root)
	ctx := context.Background()
	long := "ü"
	for len(long) < snapshot.MaxLabelValue-1 {
		long += "x"
	}
	in := snapshot.Labels{"generation": "1", "store": "3f6c1e0a-store", "state": "publishing", "note": long, "unset": ""}
	want := snapshot.Labels{"generation": "1", "store": "3f6c1e0a-store", "state": "publishing", "note": long}
	s, err := e.Backend.Create(ctx, 1, in)
	if err != nil {
		t.Fatalf("Create(1) with labels: %v", err)
	}
	sameLabels(t, "Create(1)", s.Labels, want)
	sameLabels(t, "List after Create", listed(t, e.Backend, 1).Labels, want)
	content := read(t, s.Path)

	// Another snapshot has its own labels, none of the first one's.
	write(t, e.Root, "store/cccc-changed", "after")
	s2, err := e.Backend.Create(ctx, 2, snapshot.Labels{"generation": "2"})
	if err != nil {
		t.Fatal(err)
	}
	sameLabels(t, "Create(2)", s2.Labels, snapshot.Labels{"generation": "2"})

	// Set one, change one, remove two; the rest stay.
	if err := e.Backend.SetLabels(ctx, 1, snapshot.Labels{"state": "live", "pin_name": "golden release", "note": "", "store": ""}); err != nil {
		t.Fatalf("SetLabels(1): %v", err)
	}
	want = snapshot.Labels{"generation": "1", "state": "live", "pin_name": "golden release"}
	sameLabels(t, "List after SetLabels", listed(t, e.Backend, 1).Labels, want)
	sameLabels(t, "snapshot 2 after SetLabels(1)", listed(t, e.Backend, 2).Labels, snapshot.Labels{"generation": "2"})
	equal(t, "snapshot 1 after SetLabels", read(t, s.Path), content)
	wantEROFS(t, "write after SetLabels", os.WriteFile(filepath.Join(s.Path, "store/new"), []byte("x"), 0o644))
	wantEROFS(t, "write to the root after SetLabels", os.WriteFile(filepath.Join(s.Path, "new-top"), []byte("x"), 0o644))

	// Labels are bound to the snapshot, not to the process.
	b := e.Reopen(t)
	sameLabels(t, "List after restart", listed(t, b, 1).Labels, want)
	if err := b.SetLabels(ctx, 1, snapshot.Labels{"pin_name": ""}); err != nil {
		t.Fatalf("SetLabels after restart: %v", err)
	}
	sameLabels(t, "List after removing pin_name", listed(t, b, 1).Labels, snapshot.Labels{"generation": "1", "state": "live"})

	// Refusals.
	if err := b.SetLabels(ctx, 9, snapshot.Labels{"state": "live"}); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("SetLabels(9): err = %v, want ErrNotFound", err)
	}
	for _, bad := range []snapshot.Labels{{"Bad": "x"}, {"": "x"}, {"a-b": "x"}, {"k": "line\nbreak"}, {"k": long + "xxx"}} {
		if err := b.SetLabels(ctx, 1, bad); err == nil {
			t.Errorf("SetLabels(%q) succeeded, want an error", bad)
		}
		if _, err := b.Create(ctx, 3, bad); err == nil {
			t.Errorf("Create(3, %q) succeeded, want an error", bad)
		}
	}
	if got := ids(list(t, b)); !sameIDs(got, 1, 2) {
		t.Errorf("List after refused creates = %v, want [1 2]", got)
	}
	sameLabels(t, "labels after refused changes", listed(t, b, 1).Labels, snapshot.Labels{"generation": "1", "state": "live"})
	if err := b.Destroy(ctx, 1); err != nil {
		t.Fatalf("Destroy(1) after SetLabels: %v", err)
	}
}
