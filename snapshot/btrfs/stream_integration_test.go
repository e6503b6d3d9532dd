//go:build integration

package btrfs

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/mountinfo"
	"github.com/strata-nix/strata/snapshot"
	"github.com/strata-nix/strata/snapshot/snapshottest"
)

// transfer sends generation id (incremental from from) from src into dst
// through a pipe, as the API does, and returns the stream's size.
func transfer(t *testing.T, src, dst *Backend, id, from uint64) (snapshot.Snapshot, int64, error) {
	t.Helper()
	pr, pw := io.Pipe()
	var n countWriter
	go func() { pw.CloseWithError(src.Send(context.Background(), io.MultiWriter(pw, &n), id, from)) }()
	s, err := dst.Receive(context.Background(), pr, id, from)
	pr.Close()
	return s, n.n, err
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// replicaPair is a primary store on one btrfs and a replica's snapshot dir
// on another.
func replicaPair(t *testing.T) (prim *Backend, root string, repl *Backend, replDir string) {
	t.Helper()
	_, root, snaps := newStore(t)
	prim, err := New(root, snaps, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	replDir = filepath.Join(testenv.LoopBtrfs(t, "256M"), "replica")
	repl, err = NewReplica(replDir, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	return prim, root, repl, replDir
}

func writeFile(t *testing.T, p string, data []byte) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// nothingLeft checks that the replica dir holds exactly the generations
// want and nothing else.
func nothingLeft(t *testing.T, b *Backend, dir string, want ...uint64) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names, wantNames []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	for _, id := range want {
		wantNames = append(wantNames, snapshot.Name(id))
	}
	sort.Strings(names)
	sort.Strings(wantNames)
	if strings.Join(names, " ") != strings.Join(wantNames, " ") {
		t.Errorf("replica dir holds %q, want %q", names, wantNames)
	}
	l, err := b.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(l) != len(want) {
		t.Errorf("replica lists %d generations, want %d", len(l), len(want))
	}
}

// A replica receives generation 1 whole and 2, 3 incrementally; each
// equals the primary's snapshot, is read-only, and an incremental stream is
// about the size of the change, not of the store.
func TestSendReceive(t *testing.T) {
	prim, root, repl, replDir := replicaPair(t)
	big := make([]byte, 8<<20)
	rand.Read(big)
	writeFile(t, filepath.Join(root, "store/aaa-big/blob"), big)
	writeFile(t, filepath.Join(root, "var/nix/db/db.sqlite"), []byte("db v1"))
	if err := os.Symlink("aaa-big/blob", filepath.Join(root, "store/link")); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for id := uint64(1); id <= 3; id++ {
		if id > 1 {
			writeFile(t, filepath.Join(root, fmt.Sprintf("store/new-%d/file", id)), []byte(fmt.Sprintf("gen %d\n", id)))
			writeFile(t, filepath.Join(root, "var/nix/db/db.sqlite"), []byte(fmt.Sprintf("db v%d", id)))
		}
		if id == 3 {
			if err := os.RemoveAll(filepath.Join(root, "store/new-2")); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := prim.Create(ctx, id, snapshot.Labels{"generation": fmt.Sprint(id), "store": "primary-A"}); err != nil {
			t.Fatal(err)
		}
	}
	sizes := map[uint64]int64{}
	for id := uint64(1); id <= 3; id++ {
		s, n, err := transfer(t, prim, repl, id, id-1)
		if err != nil {
			t.Fatalf("transfer generation %d: %v", id, err)
		}
		sizes[id] = n
		if s.Path != filepath.Join(replDir, snapshot.Name(id)) || s.ID != id {
			t.Errorf("received %+v", s)
		}
		if s.Labels["generation"] != fmt.Sprint(id) || s.Labels["store"] != "primary-A" {
			t.Errorf("received generation %d has labels %v, want the primary's", id, s.Labels)
		}
		if g, w := snapshottest.Digest(t, s.Path), snapshottest.Digest(t, prim.path(id)); g != w {
			t.Errorf("generation %d on the replica differs from the primary:\n%s\n---\n%s", id, g, w)
		}
		if err := os.WriteFile(filepath.Join(s.Path, "store/x"), nil, 0o644); !errors.Is(err, fs.ErrPermission) && !strings.Contains(fmt.Sprint(err), "read-only") {
			t.Errorf("write into received generation %d: %v, want EROFS", id, err)
		}
	}
	t.Logf("stream bytes: full %d, incremental %d and %d", sizes[1], sizes[2], sizes[3])
	if sizes[1] < 8<<20 || sizes[2] > 64<<10 || sizes[3] > 64<<10 {
		t.Errorf("stream bytes full %d, incremental %d, %d: want full >= 8 MiB and each incremental < 64 KiB", sizes[1], sizes[2], sizes[3])
	}
	if _, err := os.Stat(filepath.Join(replDir, "strata-3/store/new-2")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("path deleted in generation 3 is on the replica: %v", err)
	}
	nothingLeft(t, repl, replDir, 1, 2, 3)

	// A restarted replica lists them; a second receive of one is ErrExists.
	repl2, err := NewReplica(replDir, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	nothingLeft(t, repl2, replDir, 1, 2, 3)
	if _, _, err := transfer(t, prim, repl2, 3, 2); !errors.Is(err, snapshot.ErrExists) {
		t.Errorf("receive of generation 3 again: %v, want ErrExists", err)
	}
	if _, err := repl2.Create(ctx, 4, nil); err == nil {
		t.Errorf("a replica backend took a snapshot")
	}
	// Destroy works on received generations.
	if err := repl2.Destroy(ctx, 1); err != nil {
		t.Fatal(err)
	}
	nothingLeft(t, repl2, replDir, 2, 3)
}

// Streams that cannot become the generation leave nothing: a missing base,
// a base of another lineage, a truncated stream, a stream of another
// generation, a cancelled receive.
func TestReceiveRefusals(t *testing.T) {
	prim, root, repl, replDir := replicaPair(t)
	ctx := context.Background()
	big := make([]byte, 4<<20)
	rand.Read(big)
	writeFile(t, filepath.Join(root, "store/a/blob"), big)
	for id := uint64(1); id <= 2; id++ {
		writeFile(t, filepath.Join(root, fmt.Sprintf("store/p%d", id)), []byte("x"))
		if _, err := prim.Create(ctx, id, snapshot.Labels{"generation": fmt.Sprint(id), "store": "primary-A"}); err != nil {
			t.Fatal(err)
		}
	}
	// No base here.
	if _, _, err := transfer(t, prim, repl, 2, 1); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("incremental without its base: %v, want ErrNotFound", err)
	}
	nothingLeft(t, repl, replDir)

	// A stream of generation 2 received as 5: refused.
	if _, _, err := transfer(t, prim, repl, 2, 0); err != nil {
		t.Fatal(err)
	}
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(prim.Send(ctx, pw, 1, 0)) }()
	if _, err := repl.Receive(ctx, pr, 5, 0); err == nil || !strings.Contains(err.Error(), `carries snapshot "strata-1", want strata-5`) {
		t.Errorf("stream of strata-1 received as 5: %v, want a refusal naming strata-5", err)
	}
	pr.Close()
	nothingLeft(t, repl, replDir, 2)

	// A base of another lineage (another primary's generation 1).
	_, otherRoot, otherSnaps := newStore(t)
	other, err := New(otherRoot, otherSnaps, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.Create(ctx, 1, snapshot.Labels{"generation": "1"}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := transfer(t, other, repl, 1, 0); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(root, "store/p3"), []byte("x"))
	if _, err := prim.Create(ctx, 3, snapshot.Labels{"generation": "3"}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := transfer(t, prim, repl, 3, 1); err == nil || !strings.Contains(err.Error(), "parent") {
		t.Errorf("incremental onto another lineage's base: %v, want btrfs's missing-parent error", err)
	}
	nothingLeft(t, repl, replDir, 1, 2)

	// A truncated stream (the connection broke) fails and leaves nothing.
	var full bytes.Buffer
	if err := prim.Send(ctx, &full, 3, 0); err != nil {
		t.Fatal(err)
	}
	cut := io.MultiReader(bytes.NewReader(full.Bytes()[:full.Len()/2]), errReader{errors.New("connection reset")})
	if _, err := repl.Receive(ctx, cut, 3, 0); err == nil {
		t.Errorf("truncated stream received")
	}
	nothingLeft(t, repl, replDir, 1, 2)

	// A cancelled receive.
	cctx, cancel := context.WithCancel(ctx)
	pr, pw = io.Pipe()
	go func() {
		pw.Write(full.Bytes()[:full.Len()/2])
		cancel()
	}()
	if _, err := repl.Receive(cctx, pr, 3, 0); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled receive: %v, want context.Canceled", err)
	}
	pw.Close()
	nothingLeft(t, repl, replDir, 1, 2)
}

type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }

// A crash mid-receive leaves a writable strata-N without a Received UUID:
// it is never listed, and the next NewReplica deletes it.
func TestHalfReceived(t *testing.T) {
	_, _, repl, replDir := replicaPair(t)
	half := filepath.Join(replDir, "strata-4")
	testenv.Run(t, "btrfs", "subvolume", "create", half)
	if l, _ := repl.List(context.Background()); len(l) != 0 {
		t.Errorf("List = %+v, want nothing", l)
	}
	leftovers := func() []string {
		t.Helper()
		ib, err := InspectReplica(replDir, nil)
		if err != nil {
			t.Fatal(err)
		}
		left, err := ib.Leftovers(true)
		if err != nil {
			t.Fatal(err)
		}
		return left
	}
	if left := leftovers(); len(left) != 1 || !strings.Contains(left[0], "half-received snapshot "+half) {
		t.Errorf("Leftovers = %q, want the half-received %s alone", left, half)
	}
	if _, err := NewReplica(replDir, testLog(t)); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(half); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("half-received %s still there after NewReplica: %v", half, err)
	}
	if left := leftovers(); len(left) != 0 {
		t.Errorf("Leftovers after NewReplica = %q, want none", left)
	}
}

// Under systemd's ReadWritePaths= the replica's snapshot dir is a bind
// mount of itself, writable, on a read-only view of its filesystem
// (ProtectSystem=strict). btrfs receive, left to find the mount itself,
// took the bind for the filesystem's top and failed every incremental
// stream ("It seems that you have changed your default subvolume"); told
// the read-only top with -m (receiveMount), it receives whole and
// incremental streams alike.
func TestReceiveUnderReadWritePathsBind(t *testing.T) {
	prim, root, repl, replDir := replicaPair(t)
	top := filepath.Dir(replDir)
	if err := unix.Mount(replDir, replDir, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(replDir, unix.MNT_DETACH) })
	if err := unix.Mount("", top, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Mount("", top, "", unix.MS_REMOUNT|unix.MS_BIND, "") })
	if err := os.WriteFile(filepath.Join(top, "x"), nil, 0o644); err == nil {
		t.Fatal("the filesystem's top is writable: the sandbox is not what ProtectSystem=strict makes")
	}
	ms, err := mountinfo.Read()
	if err != nil {
		t.Fatal(err)
	}
	if m := receiveMount(ms, replDir); m != top {
		t.Fatalf("receiveMount(%s) = %q, want the filesystem's top %s", replDir, m, top)
	}
	ctx := context.Background()
	for id := uint64(1); id <= 2; id++ {
		writeFile(t, filepath.Join(root, fmt.Sprintf("store/p-%d/file", id)), []byte(fmt.Sprintf("gen %d\n", id)))
		if _, err := prim.Create(ctx, id, snapshot.Labels{"generation": fmt.Sprint(id)}); err != nil {
			t.Fatal(err)
		}
		s, n, err := transfer(t, prim, repl, id, id-1)
		if err != nil {
			t.Fatalf("receive generation %d (from %d) into a snapshot dir bound on itself: %v", id, id-1, err)
		}
		if g, w := snapshottest.Digest(t, s.Path), snapshottest.Digest(t, prim.path(id)); g != w {
			t.Errorf("generation %d on the replica differs from the primary:\n%s\n---\n%s", id, g, w)
		}
		t.Logf("generation %d from %d: %d stream bytes", id, id-1, n)
	}
	nothingLeft(t, repl, replDir, 1, 2)
}
