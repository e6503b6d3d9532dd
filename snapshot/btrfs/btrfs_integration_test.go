//go:build integration

package btrfs

import (
	"errors"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/snapshot"
	"github.com/strata-nix/strata/snapshot/snapshottest"
)

func testLog(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// newStore makes a loop-backed btrfs with the subvolume central/ holding
// store/ and var/nix/db/, and returns its mountpoint.
func newStore(t *testing.T) (mnt, root, snaps string) {
	t.Helper()
	mnt = testenv.LoopBtrfs(t, "256M")
	root = filepath.Join(mnt, "central")
	testenv.Run(t, "btrfs", "subvolume", "create", root)
	for _, d := range []string{"store", "var/nix/db"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return mnt, root, filepath.Join(mnt, "snapshots")
}

func TestConformance(t *testing.T) {
	snapshottest.Run(t, func(t *testing.T) snapshottest.Env {
		_, root, snaps := newStore(t)
		b, err := New(root, snaps, testLog(t))
		if err != nil {
			t.Fatal(err)
		}
		return snapshottest.Env{
			Backend: b,
			Root:    root,
			Reopen: func(t *testing.T) snapshot.Backend {
				b, err := New(root, snaps, testLog(t))
				if err != nil {
					t.Fatalf("New after restart: %v", err)
				}
				return b
			},
			Foreign: func(t *testing.T, name string) func() bool {
				p := filepath.Join(snaps, name)
				testenv.Run(t, "btrfs", "subvolume", "snapshot", "-r", root, p)
				return func() bool { _, err := os.Stat(filepath.Join(p, "store")); return err == nil }
			},
		}
	})
}

// A crash between taking the snapshot and renaming it leaves
// .tmp-strata-N: it is never listed, and the next New deletes it.
func TestHalfMadeSnapshot(t *testing.T) {
	_, root, snaps := newStore(t)
	b, err := New(root, snaps, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(snaps, ".tmp-strata-4")
	testenv.Run(t, "btrfs", "subvolume", "snapshot", "-r", root, tmp)
	// Not a subvolume / not read-only: a hand-made strata-N is not listed.
	if err := os.Mkdir(filepath.Join(snaps, "strata-5"), 0o755); err != nil {
		t.Fatal(err)
	}
	testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(snaps, "strata-6"))
	l, err := b.List(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if len(l) != 0 {
		t.Errorf("List = %+v, want nothing (half-made, plain dir, writable subvolume)", l)
	}
	// --check-config names what New removes, and removes nothing itself.
	leftovers := func() []string {
		t.Helper()
		ib, err := Inspect(root, snaps, nil)
		if err != nil {
			t.Fatal(err)
		}
		left, err := ib.Leftovers(false)
		if err != nil {
			t.Fatal(err)
		}
		return left
	}
	if left := leftovers(); len(left) != 1 || !strings.Contains(left[0], "half-made snapshot "+tmp) {
		t.Errorf("Leftovers = %q, want the half-made %s alone", left, tmp)
	}
	if _, err := os.Lstat(tmp); err != nil {
		t.Errorf("Leftovers removed %s: %v", tmp, err)
	}
	if _, err := New(root, snaps, testLog(t)); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(tmp); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("half-made snapshot %s still there after New: %v", tmp, err)
	}
	if left := leftovers(); len(left) != 0 {
		t.Errorf("Leftovers after New = %q, want none", left)
	}
	// Create of a half-made id also works after a crash without restart.
	testenv.Run(t, "btrfs", "subvolume", "snapshot", "-r", root, filepath.Join(snaps, ".tmp-strata-7"))
	s, err := b.Create(t.Context(), 7, nil)
	if err != nil {
		t.Fatalf("Create(7) over a half-made snapshot: %v", err)
	}
	if s.Path != filepath.Join(snaps, "strata-7") {
		t.Errorf("Path = %s", s.Path)
	}
	// A .tmp-strata-N that is no subvolume stops New; Leftovers says so.
	if err := os.Mkdir(filepath.Join(snaps, ".tmp-strata-8"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := New(root, snaps, testLog(t)); err == nil || !strings.Contains(err.Error(), "not a subvolume") {
		t.Errorf("New over a plain .tmp-strata-8: %v, want not a subvolume", err)
	}
	if ib, err := Inspect(root, snaps, nil); err != nil {
		t.Fatal(err)
	} else if _, err := ib.Leftovers(false); err == nil || !strings.Contains(err.Error(), ".tmp-strata-8: not a subvolume") {
		t.Errorf("Leftovers over a plain .tmp-strata-8: %v, want not a subvolume", err)
	}
	os.Remove(filepath.Join(snaps, ".tmp-strata-8"))
	// Destroy refuses what is not a read-only snapshot.
	if err := b.Destroy(t.Context(), 5); err == nil || errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("Destroy of a plain directory strata-5: err = %v, want a refusal", err)
	}
	if _, err := os.Stat(filepath.Join(snaps, "strata-5")); err != nil {
		t.Errorf("plain directory strata-5 removed: %v", err)
	}
}

func TestNewLayoutErrors(t *testing.T) {
	testenv.RequireRoot(t)
	mnt, root, snaps := newStore(t)

	tmpfs := t.TempDir()
	testenv.Run(t, "mount", "-t", "tmpfs", "tmpfs", tmpfs)
	t.Cleanup(func() { _ = exec.Command("umount", "-l", tmpfs).Run() })
	for _, d := range []string{"store", "var/nix/db"} {
		if err := os.MkdirAll(filepath.Join(tmpfs, "central", d), 0o755); err != nil {
			t.Fatal(err)
		}
	}

	plain := filepath.Join(mnt, "plain")
	for _, d := range []string{"store", "var/nix/db"} {
		if err := os.MkdirAll(filepath.Join(plain, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}

	nested := filepath.Join(mnt, "nested")
	testenv.Run(t, "btrfs", "subvolume", "create", nested)
	if err := os.MkdirAll(filepath.Join(nested, "store"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(nested, "var/nix"), 0o755); err != nil {
		t.Fatal(err)
	}
	testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(nested, "var/nix/db"))

	mounted := filepath.Join(mnt, "mounted")
	testenv.Run(t, "btrfs", "subvolume", "create", mounted)
	for _, d := range []string{"store", "var/nix/db"} {
		if err := os.MkdirAll(filepath.Join(mounted, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	testenv.Run(t, "mount", "--bind", filepath.Join(mounted, "var"), filepath.Join(mounted, "store"))
	t.Cleanup(func() { _ = exec.Command("umount", "-l", filepath.Join(mounted, "store")).Run() })

	nodb := filepath.Join(mnt, "nodb")
	testenv.Run(t, "btrfs", "subvolume", "create", nodb)
	if err := os.MkdirAll(filepath.Join(nodb, "store"), 0o755); err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct {
		name, root, snaps, wantPath, wantText string
	}{
		{"root on tmpfs", filepath.Join(tmpfs, "central"), snaps, filepath.Join(tmpfs, "central"), "not on btrfs"},
		{"root not a subvolume", plain, snaps, plain, "not a subvolume root"},
		{"db in a nested subvolume", nested, snaps, filepath.Join(nested, "var/nix/db"), "nested subvolume"},
		{"store is a mount point", mounted, snaps, filepath.Join(mounted, "store"), "mount point"},
		{"no database", nodb, snaps, filepath.Join(nodb, "var"), "must hold store/ and var/nix/db/"},
		{"snapshot dir on tmpfs", root, filepath.Join(tmpfs, "snaps"), filepath.Join(tmpfs, "snaps"), "not on btrfs"},
		{"snapshot dir inside root", root, filepath.Join(root, "snaps"), filepath.Join(root, "snaps"), "inside store root"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := New(c.root, c.snaps, testLog(t))
			if err == nil {
				t.Fatal("New succeeded, want an error")
			}
			if !errors.Is(err, snapshot.ErrUnsupported) {
				t.Errorf("err = %v, want it to wrap ErrUnsupported", err)
			}
			if !strings.Contains(err.Error(), c.wantPath) || !strings.Contains(err.Error(), c.wantText) {
				t.Errorf("err = %q, want it to name %s and say %q", err, c.wantPath, c.wantText)
			}
		})
	}

	// A snapshot dir on a second btrfs filesystem is refused too.
	other := testenv.LoopBtrfs(t, "256M")
	if _, err := New(root, other, testLog(t)); !errors.Is(err, snapshot.ErrUnsupported) || !strings.Contains(err.Error(), other) {
		t.Errorf("snapshot dir on another btrfs: err = %v, want ErrUnsupported naming %s", err, other)
	}
	// The good layout works, through a symlink too.
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(root, link); err != nil {
		t.Fatal(err)
	}
	b, err := New(link, snaps, testLog(t))
	if err != nil {
		t.Fatalf("New on a good layout: %v", err)
	}
	if b.Root() != root {
		t.Errorf("Root() = %s, want %s", b.Root(), root)
	}
}

// SetLabels never makes a read-only snapshot writable again: a replica
// that received strata-1 still receives strata-2 incrementally from it
// after strata-1 was pinned (changing strata-1's xattrs would make btrfs
// receive fail). The changes live in strata-1.labels, which a snapshot
// of the same name made later ignores, and Destroy removes.
func TestSetLabelsKeepsIncrementalSend(t *testing.T) {
	mnt, root, snaps := newStore(t)
	b, err := New(root, snaps, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	s1, err := b.Create(ctx, 1, snapshot.Labels{"generation": "1", "state": "publishing"})
	if err != nil {
		t.Fatal(err)
	}
	before, err := getSubvolInfo(s1.Path)
	if err != nil {
		t.Fatal(err)
	}
	recv := filepath.Join(mnt, "replica")
	if err := os.Mkdir(recv, 0o755); err != nil {
		t.Fatal(err)
	}
	sendRecv := func(args ...string) {
		t.Helper()
		cmd := exec.Command("sh", "-c", `btrfs send -q "$@" | btrfs receive -e "$RECV"`, "sh")
		cmd.Args = append(cmd.Args, args...)
		cmd.Env = append(os.Environ(), "RECV="+recv)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("btrfs send %v | btrfs receive: %v\n%s", args, err, out)
		}
	}
	sendRecv(s1.Path)
	if err := b.SetLabels(ctx, 1, snapshot.Labels{"state": "live", "pinned": "true", "pin_name": "golden", "generation": ""}); err != nil {
		t.Fatal(err)
	}
	after, err := getSubvolInfo(s1.Path)
	if err != nil || !after.ReadOnly || after.UUID != before.UUID {
		t.Fatalf("strata-1 after SetLabels: %+v, %v", after, err)
	}
	if l, _ := b.List(ctx); len(l) != 1 || !maps.Equal(l[0].Labels, snapshot.Labels{"state": "live", "pinned": "true", "pin_name": "golden"}) {
		t.Errorf("List after SetLabels: %+v", l)
	}
	if err := os.WriteFile(filepath.Join(root, "store/new"), []byte("2"), 0o644); err != nil {
		t.Fatal(err)
	}
	s2, err := b.Create(ctx, 2, snapshot.Labels{"generation": "2"})
	if err != nil {
		t.Fatal(err)
	}
	sendRecv("-p", s1.Path, s2.Path)
	if got, err := os.ReadFile(filepath.Join(recv, "strata-2/store/new")); err != nil || string(got) != "2" {
		t.Errorf("received strata-2: %q, %v", got, err)
	}

	// Destroy removes the labels file; a later strata-1 starts clean even
	// if a stale labels file is put back.
	stale, err := os.ReadFile(filepath.Join(snaps, "strata-1.labels"))
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Destroy(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(snaps, "strata-1.labels")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("strata-1.labels left after Destroy: %v", err)
	}
	if err := os.WriteFile(filepath.Join(snaps, "strata-1.labels"), stale, 0o644); err != nil {
		t.Fatal(err)
	}
	n1, err := b.Create(ctx, 1, snapshot.Labels{"generation": "1"})
	if err != nil {
		t.Fatal(err)
	}
	if !maps.Equal(n1.Labels, snapshot.Labels{"generation": "1"}) {
		t.Errorf("a new strata-1 took a stale labels file: %v", n1.Labels)
	}
}

// Inspect checks the layout but changes nothing: no snapshot dir made, no
// leftover removed, no change allowed.
func TestInspectChangesNothing(t *testing.T) {
	_, root, snaps := newStore(t)
	if _, err := Inspect(root, snaps, testLog(t)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Inspect with a missing snapshot dir: err = %v, want ErrNotExist", err)
	}
	if _, err := os.Stat(snaps); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Inspect made the snapshot dir: %v", err)
	}
	b, err := New(root, snaps, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Create(t.Context(), 1, snapshot.Labels{"generation": "1"}); err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(snaps, ".tmp-strata-2")
	testenv.Run(t, "btrfs", "subvolume", "snapshot", "-r", root, tmp)
	ib, err := Inspect(root, snaps, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(tmp); err != nil {
		t.Errorf("Inspect removed the leftover %s: %v", tmp, err)
	}
	l, err := ib.List(t.Context())
	if err != nil || len(l) != 1 || l[0].Labels["generation"] != "1" {
		t.Errorf("Inspect List = %+v, %v", l, err)
	}
	if _, err := ib.Create(t.Context(), 3, nil); err == nil {
		t.Error("Create through Inspect succeeded")
	}
	if err := ib.SetLabels(t.Context(), 1, snapshot.Labels{"state": "live"}); err == nil {
		t.Error("SetLabels through Inspect succeeded")
	}
	if err := ib.Destroy(t.Context(), 1); err == nil {
		t.Error("Destroy through Inspect succeeded")
	}
	if l, _ := b.List(t.Context()); len(l) != 1 || l[0].Labels["state"] != "" {
		t.Errorf("after refused changes: %+v", l)
	}
}

// RemoveLabels (the server's forget of a generation whose snapshot is gone)
// removes strata-N.labels and only it, and refuses while strata-N exists:
// then the file is the snapshot's own.
func TestRemoveLabels(t *testing.T) {
	_, root, snaps := newStore(t)
	b, err := New(root, snaps, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	for _, id := range []uint64{1, 2} {
		if _, err := b.Create(ctx, id, snapshot.Labels{"generation": strconv.FormatUint(id, 10)}); err != nil {
			t.Fatal(err)
		}
		if err := b.SetLabels(ctx, id, snapshot.Labels{"pinned": "true"}); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.RemoveLabels(ctx, 2); err == nil || !strings.Contains(err.Error(), "strata-2 exists") {
		t.Errorf("RemoveLabels of a snapshot that exists: %v, want a refusal", err)
	}
	if _, err := os.Stat(filepath.Join(snaps, "strata-2.labels")); err != nil {
		t.Errorf("strata-2.labels after the refusal: %v", err)
	}
	// Gone by hand, as a missing generation's snapshot is.
	testenv.Run(t, "btrfs", "subvolume", "delete", filepath.Join(snaps, "strata-2"))
	if err := b.RemoveLabels(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(snaps, "strata-2.labels")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("strata-2.labels after RemoveLabels: %v, want gone", err)
	}
	if l, err := b.List(ctx); err != nil || len(l) != 1 || l[0].Labels["pinned"] != "true" {
		t.Errorf("strata-1 after RemoveLabels(2): %+v %v, want its labels kept", l, err)
	}
	// Again: nothing to remove is not an error.
	if err := b.RemoveLabels(ctx, 2); err != nil {
		t.Errorf("RemoveLabels without a file: %v", err)
	}
}
