//go:build integration

package nfs

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	nfsc "github.com/willscott/go-nfs-client/nfs"
	"github.com/willscott/go-nfs-client/nfs/rpc"
	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/internal/nfsdial"
	"github.com/strata-nix/strata/internal/nfsraw"
	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/server/nfs/guard"
)

// childEnv makes TestMain run an export server instead of the tests:
// "ADDR|STATEDIR|ID=DIR,ID=DIR". The child prints "LISTEN addr" and serves
// until killed, so tests can SIGKILL and restart it.
const childEnv = "STRATA_NFSTEST_SERVE"

func TestMain(m *testing.M) {
	if spec := os.Getenv(childEnv); spec != "" {
		if err := serveChild(spec); err != nil {
			fmt.Fprintln(os.Stderr, "child server:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func serveChild(spec string) error {
	parts := strings.SplitN(spec, "|", 3)
	if len(parts) != 3 {
		return fmt.Errorf("bad %s %q", childEnv, spec)
	}
	reg := prometheus.NewRegistry()
	e, err := New(Options{StateDir: parts[1], Registry: reg,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, nil))})
	if err != nil {
		return err
	}
	for _, g := range strings.Split(parts[2], ",") {
		id, dir, _ := strings.Cut(g, "=")
		n, _ := strconv.ParseUint(id, 10, 64)
		if err := e.Add(n, dir); err != nil {
			return err
		}
	}
	maxConns, _ := strconv.Atoi(os.Getenv("STRATA_NFSTEST_MAX_CONNS"))
	l, err := Listen(productionListen(parts[0], maxConns), slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})), reg)
	if err != nil {
		return err
	}
	ml, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	go http.Serve(ml, promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	if n, _ := strconv.ParseUint(os.Getenv("STRATA_NFSTEST_NOFILE"), 10, 64); n > 0 {
		// Out of descriptors from here on: Accept must back off, not fail.
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: n, Max: n}); err != nil {
			return err
		}
	}
	fmt.Printf("LISTEN %s %s\n", l.Addr(), ml.Addr())
	return e.Serve(context.Background(), l)
}

// productionListen is the listener configuration strata server uses by
// default (busy polling, guard defaults), admitting loopback clients.
func productionListen(addr string, maxConns int) ListenOptions {
	return ListenOptions{Addr: addr, BusyPoll: 50 * time.Microsecond,
		Guard: guard.Options{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}, MaxConns: maxConns}}
}

// testListen binds the production listener stack on addr.
func testListen(t *testing.T, addr string) *guard.Listener {
	t.Helper()
	l, err := Listen(productionListen(addr, 0), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// fixture is a btrfs with a central store subvolume and read-only snapshots
// of it as generations 1 and 2 (gen 2 changes pkg-a/data.txt in place, so
// the file keeps its inode number).
type fixture struct {
	mnt        string
	gen        map[uint64]string // id -> exported store dir
	outside    string            // a file outside every generation (top-level subvolume)
	stateDir   string
	gen1Secret string // a file in gen 1's snapshot but outside its store dir
}

func writeFile(t *testing.T, p string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, data, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
}

func symlink(t *testing.T, target, p string) {
	t.Helper()
	if err := os.Symlink(target, p); err != nil {
		t.Fatal(err)
	}
}

func newFixture(t *testing.T, extra func(store string)) *fixture {
	testenv.RequireRoot(t)
	mnt := testenv.LoopBtrfs(t, "1G")
	central := filepath.Join(mnt, "central")
	testenv.Run(t, "btrfs", "subvolume", "create", central)
	store := filepath.Join(central, "store")
	big := make([]byte, 3<<20+123)
	rand.Read(big)
	writeFile(t, filepath.Join(store, "pkg-a/bin/run"), []byte("#!/bin/sh\necho a\n"), 0o755)
	writeFile(t, filepath.Join(store, "pkg-a/share/doc.txt"), []byte("documentation\n"), 0o644)
	writeFile(t, filepath.Join(store, "pkg-a/data.txt"), []byte("generation one data\n"), 0o444)
	writeFile(t, filepath.Join(store, "pkg-a/empty"), nil, 0o644)
	writeFile(t, filepath.Join(store, "pkg-a/suid"), []byte("x"), 0o4755|os.ModeSetuid)
	if err := os.Chmod(filepath.Join(store, "pkg-a/suid"), 0o755|os.ModeSetuid); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(store, "pkg-a/owned"), []byte("owned"), 0o640)
	if err := os.Lchown(filepath.Join(store, "pkg-a/owned"), 1234, 5678); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(store, "pkg-b/lib/libx.so"), big, 0o555)
	writeFile(t, filepath.Join(store, "pkg-b/weird name @x"), []byte("spaces"), 0o644)
	writeFile(t, filepath.Join(store, "@at"), []byte("at"), 0o644)
	if err := os.Link(filepath.Join(store, "pkg-a/share/doc.txt"), filepath.Join(store, "pkg-b/hardlink")); err != nil {
		t.Fatal(err)
	}
	symlink(t, "../pkg-b/lib", filepath.Join(store, "pkg-a/lib"))
	symlink(t, "../../../../../../../../etc", filepath.Join(store, "pkg-a/escape"))
	symlink(t, "/etc/passwd", filepath.Join(store, "pkg-a/abs"))
	symlink(t, "/nix/store/xxx-pkg-b/lib/libx.so", filepath.Join(store, "pkg-a/nixlink"))
	for i := 0; i < 300; i++ {
		writeFile(t, filepath.Join(store, fmt.Sprintf("many/f%03d", i)), []byte(strconv.Itoa(i)), 0o644)
	}
	if extra != nil {
		extra(store)
	}
	writeFile(t, filepath.Join(central, "var/nix/db/db.sqlite"), []byte("DB-SECRET"), 0o644)
	writeFile(t, filepath.Join(mnt, "outside.txt"), []byte("OUTSIDE-SECRET"), 0o644)

	testenv.Run(t, "btrfs", "subvolume", "snapshot", "-r", central, filepath.Join(mnt, "strata-1"))
	// gen 2: same inode, other content
	f, err := os.OpenFile(filepath.Join(store, "pkg-a/data.txt"), os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("generation TWO data, longer\n")
	f.Close()
	writeFile(t, filepath.Join(store, "pkg-c/new"), []byte("only in two"), 0o644)
	testenv.Run(t, "btrfs", "subvolume", "snapshot", "-r", central, filepath.Join(mnt, "strata-2"))
	return &fixture{
		mnt:        mnt,
		gen:        map[uint64]string{1: filepath.Join(mnt, "strata-1/store"), 2: filepath.Join(mnt, "strata-2/store")},
		outside:    filepath.Join(mnt, "outside.txt"),
		stateDir:   filepath.Join(t.TempDir(), "state"),
		gen1Secret: filepath.Join(mnt, "strata-1/var/nix/db/db.sqlite"),
	}
}

// serve runs an in-process export of every fixture generation on 127.0.0.1.
func (fx *fixture) serve(t *testing.T) (*Export, string, *prometheus.Registry) {
	t.Helper()
	return fx.serveWith(t, false)
}

// serveWith is serve; noFastPath makes go-nfs answer every call.
func (fx *fixture) serveWith(t *testing.T, noFastPath bool) (*Export, string, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	e, err := New(Options{StateDir: fx.stateDir, Registry: reg,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	e.noFastPath = noFastPath
	for id, dir := range fx.gen {
		if err := e.Add(id, dir); err != nil {
			t.Fatal(err)
		}
	}
	l := testListen(t, "127.0.0.1:0")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve returned %v after cancel, want nil", err)
		}
		e.Close()
	})
	return e, l.Addr().String(), reg
}

func raw(t *testing.T, addr string) *nfsraw.Client {
	t.Helper()
	rc, err := nfsraw.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rc.Close() })
	return rc
}

func mountRaw(t *testing.T, rc *nfsraw.Client, path string) []byte {
	t.Helper()
	st, fh, err := rc.Mount(path)
	if err != nil || st != 0 {
		t.Fatalf("MOUNT %s: status %d err %v", path, st, err)
	}
	return fh
}

// lookupPath resolves a slash path component by component with LOOKUP.
func lookupPath(t *testing.T, rc *nfsraw.Client, root []byte, p string) []byte {
	t.Helper()
	fh := root
	for _, c := range strings.Split(p, "/") {
		st, nfh, _, err := rc.Lookup(fh, c)
		if err != nil || st != nfsraw.NFS3OK {
			t.Fatalf("LOOKUP %s (at %q): status %d err %v", p, c, st, err)
		}
		fh = nfh
	}
	return fh
}

// entry is what a user checks about one file of a tree.
type entry struct {
	Type   string
	Mode   uint32 // permission and setuid/setgid/sticky bits
	Size   int64
	Target string
	SHA256 string
	Ino    uint64
	Nlink  uint32
	UID    uint32
	GID    uint32
}

func localTree(t *testing.T, root string) map[string]entry {
	t.Helper()
	out := map[string]entry{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			return nil
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		e := entry{Mode: st.Mode & 0o7777, Ino: st.Ino, Nlink: uint32(st.Nlink), UID: st.Uid, GID: st.Gid}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			e.Type = "dir"
		case unix.S_IFLNK:
			e.Type = "symlink"
			e.Target, _ = os.Readlink(p)
			e.Size = st.Size
		case unix.S_IFREG:
			e.Type = "file"
			e.Size = st.Size
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			e.SHA256 = hex.EncodeToString(sum[:])
		default:
			e.Type = "other"
		}
		out[rel] = e
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// remoteTree walks a mount with the go-nfs-client Target (READDIRPLUS,
// LOOKUP, READ, READLINK).
func remoteTree(t *testing.T, v *nfsc.Target) map[string]entry {
	t.Helper()
	out := map[string]entry{}
	var walk func(dir string)
	walk = func(dir string) {
		ents, err := v.ReadDirPlus(dir)
		if err != nil {
			t.Fatalf("READDIRPLUS %q: %v", dir, err)
		}
		for _, de := range ents {
			p := de.Name()
			if dir != "." {
				p = dir + "/" + de.Name()
			}
			if !de.Attr.IsSet {
				t.Fatalf("%s: no attributes in READDIRPLUS", p)
			}
			a := de.Attr.Attr
			e := entry{Mode: a.FileMode & 0o7777, Ino: a.Fileid, Nlink: a.Nlink, UID: a.UID, GID: a.GID}
			switch a.Type {
			case nfsc.NF3Dir:
				e.Type = "dir"
				out[p] = e
				walk(p)
				continue
			case nfsc.NF3Lnk:
				e.Type = "symlink"
				e.Size = int64(a.Filesize)
				f, err := v.Open(p)
				if err != nil {
					t.Fatalf("LOOKUP %s: %v", p, err)
				}
				if e.Target, err = f.Readlink(); err != nil {
					t.Fatalf("READLINK %s: %v", p, err)
				}
			case nfsc.NF3Reg:
				e.Type = "file"
				e.Size = int64(a.Filesize)
				f, err := v.Open(p)
				if err != nil {
					t.Fatalf("LOOKUP %s: %v", p, err)
				}
				b, err := io.ReadAll(f)
				if err != nil {
					t.Fatalf("READ %s: %v", p, err)
				}
				sum := sha256.Sum256(b)
				e.SHA256 = hex.EncodeToString(sum[:])
			default:
				e.Type = "other"
			}
			out[p] = e
		}
	}
	walk(".")
	return out
}

func goClientMount(t *testing.T, addr, path string) *nfsc.Target {
	t.Helper()
	c, err := nfsdial.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	m := &nfsc.Mount{Client: c}
	v, err := m.Mount(path, rpc.NewAuthUnix("strata-test", 0, 0).Auth())
	if err != nil {
		t.Fatalf("mount %s: %v", path, err)
	}
	return v
}

func compareTrees(t *testing.T, what string, want, got map[string]entry) {
	t.Helper()
	for p, w := range want {
		g, ok := got[p]
		if !ok {
			t.Errorf("%s: %s missing over NFS", what, p)
			continue
		}
		if g != w {
			t.Errorf("%s: %s over NFS %+v, on disk %+v", what, p, g, w)
		}
	}
	for p := range got {
		if _, ok := want[p]; !ok {
			t.Errorf("%s: %s over NFS but not in the snapshot", what, p)
		}
	}
}

func TestWalkMatchesSnapshot(t *testing.T) {
	fx := newFixture(t, nil)
	_, addr, _ := fx.serve(t)

	var st1, st2 unix.Stat_t
	unix.Stat(filepath.Join(fx.gen[1], "pkg-a/data.txt"), &st1)
	unix.Stat(filepath.Join(fx.gen[2], "pkg-a/data.txt"), &st2)
	if st1.Ino != st2.Ino {
		t.Fatalf("fixture: data.txt inodes differ (%d, %d); the test needs them equal", st1.Ino, st2.Ino)
	}

	v1 := goClientMount(t, addr, "/gen/1")
	v2 := goClientMount(t, addr, "/gen/2") // both mounted at once
	for id, v := range map[uint64]*nfsc.Target{1: v1, 2: v2} {
		want := localTree(t, fx.gen[id])
		got := remoteTree(t, v)
		if len(want) < 300 {
			t.Fatalf("fixture too small: %d entries", len(want))
		}
		compareTrees(t, fmt.Sprintf("gen %d", id), want, got)
	}
	for id, v := range map[uint64]*nfsc.Target{1: v1, 2: v2} {
		f, err := v.Open("pkg-a/data.txt")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(f)
		want, _ := os.ReadFile(filepath.Join(fx.gen[id], "pkg-a/data.txt"))
		if !bytes.Equal(b, want) {
			t.Errorf("gen %d data.txt = %q, want %q", id, b, want)
		}
	}
	// setuid survives (go-nfs would drop it without the Mode() extension)
	if got := localTree(t, fx.gen[1])["pkg-a/suid"].Mode; got&0o4000 == 0 {
		t.Errorf("fixture: suid bit not set (%o)", got)
	}
}

func TestConfinement(t *testing.T) {
	fx := newFixture(t, nil)
	e, addr, reg := fx.serve(t)
	rc := raw(t, addr)
	root := mountRaw(t, rc, "/gen/1")

	var rootSt unix.Stat_t
	unix.Stat(fx.gen[1], &rootSt)

	// LOOKUP ".." at the root stays at the root; "." is the root.
	for _, name := range []string{"..", "."} {
		st, fh, a, err := rc.Lookup(root, name)
		if err != nil || st != nfsraw.NFS3OK || a.Fileid != rootSt.Ino {
			t.Errorf("LOOKUP root %q: status %d fileid %d err %v, want the root (%d)", name, st, a.Fileid, err, rootSt.Ino)
		}
		if st == nfsraw.NFS3OK && !bytes.Equal(fh, root) {
			t.Errorf("LOOKUP root %q: handle differs from the root handle", name)
		}
	}
	// ".." of a subdirectory is its parent, and ".." of that is the root again.
	pkga := lookupPath(t, rc, root, "pkg-a")
	share := lookupPath(t, rc, pkga, "share")
	if st, fh, _, _ := rc.Lookup(share, ".."); st != nfsraw.NFS3OK || !bytes.Equal(fh, pkga) {
		t.Errorf("LOOKUP share/..: status %d, want pkg-a's handle", st)
	}
	if st, fh, _, _ := rc.Lookup(pkga, ".."); st != nfsraw.NFS3OK || !bytes.Equal(fh, root) {
		t.Errorf("LOOKUP pkg-a/..: status %d, want the root handle", st)
	}
	// READDIR's ".." entry of the root is the root.
	st, ents, _, _, err := rc.Readdir(root, 0, 0, 8192)
	if err != nil || st != nfsraw.NFS3OK {
		t.Fatalf("READDIR root: %d %v", st, err)
	}
	for _, en := range ents {
		if en.Name == ".." && en.Fileid != rootSt.Ino {
			t.Errorf("READDIR root: '..' has fileid %d, want the root %d", en.Fileid, rootSt.Ino)
		}
	}

	// Names with "/" or that try to climb are refused.
	for _, name := range []string{"pkg-a/data.txt", "pkg-a/escape/passwd", "../strata-1", "../var", "../../outside.txt",
		"", "pkg-a/", "/etc/passwd", "..\x00", "a\x00b"} {
		st, _, _, err := rc.Lookup(root, name)
		if err != nil || st == nfsraw.NFS3OK {
			t.Errorf("LOOKUP root %q: status %d err %v, want an error status", name, st, err)
		}
	}
	// A symlink pointing outside: LOOKUP gives the link itself, READLINK its
	// target verbatim, READ/READDIR on it and LOOKUP through it fail.
	for _, c := range []struct{ name, target string }{
		{"escape", "../../../../../../../../etc"}, {"abs", "/etc/passwd"}, {"lib", "../pkg-b/lib"},
	} {
		st, lfh, a, err := rc.Lookup(pkga, c.name)
		if err != nil || st != nfsraw.NFS3OK || a.Type != 5 {
			t.Fatalf("LOOKUP %s: status %d type %d err %v", c.name, st, a.Type, err)
		}
		if st, target, _ := rc.Readlink(lfh); st != nfsraw.NFS3OK || target != c.target {
			t.Errorf("READLINK %s = %d %q, want %q", c.name, st, target, c.target)
		}
		if st, data, _, err := rc.Read(lfh, 0, 4096); err != nil || st == nfsraw.NFS3OK || len(data) != 0 {
			t.Errorf("READ symlink %s: status %d, %d bytes, err %v; want an error", c.name, st, len(data), err)
		}
		if st, ents, _, _, err := rc.Readdirplus(lfh, 0, 0, 8192); err != nil || st == nfsraw.NFS3OK || len(ents) != 0 {
			t.Errorf("READDIRPLUS symlink %s: status %d, %d entries, err %v; want an error", c.name, st, len(ents), err)
		}
		if st, ents, _, _, err := rc.Readdir(lfh, 0, 0, 8192); err != nil || st == nfsraw.NFS3OK || len(ents) != 0 {
			t.Errorf("READDIR symlink %s: status %d, %d entries, err %v; want an error", c.name, st, len(ents), err)
		}
		for _, n := range []string{"passwd", "libx.so", "hosts"} {
			if st, _, _, _ := rc.Lookup(lfh, n); st == nfsraw.NFS3OK {
				t.Errorf("LOOKUP %s/%s through a symlink succeeded", c.name, n)
			}
		}
	}
	// READ on a directory fails; READ of a file is exact.
	if st, data, _, _ := rc.Read(pkga, 0, 4096); st == nfsraw.NFS3OK || len(data) != 0 {
		t.Errorf("READ directory: status %d, %d bytes", st, len(data))
	}
	// Handles that are not this generation's: sealed with the server's own key
	// (the worst case: a leaked key or a server bug), they still must not open
	// files of another subvolume. And anything unsealed is STALE.
	key, err := os.ReadFile(filepath.Join(fx.stateDir, keyFileName))
	if err != nil {
		t.Fatal(err)
	}
	forge := func(gen uint64, path string) []byte {
		fh, _, err := unix.NameToHandleAt(unix.AT_FDCWD, path, 0)
		if err != nil {
			t.Fatal(err)
		}
		h, err := seal(key, gen, fh.Type(), fh.Bytes())
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	gen2data := forge(2, filepath.Join(fx.gen[2], "pkg-a/data.txt"))
	if st, b, _ := rc.ReadAll(gen2data); st != nfsraw.NFS3OK || !strings.Contains(string(b), "TWO") {
		t.Fatalf("control: gen 2's own handle: status %d data %q", st, b)
	}
	bad := map[string][]byte{
		"gen 2 file sealed as gen 1":     forge(1, filepath.Join(fx.gen[2], "pkg-a/data.txt")),
		"top-level file sealed as gen 1": forge(1, fx.outside),
		"gen 2 root sealed as gen 1":     forge(1, fx.gen[2]),
		"unknown generation 9":           forge(9, filepath.Join(fx.gen[1], "pkg-a/data.txt")),
		"random bytes":                   bytes.Repeat([]byte{0x42}, 44),
		"truncated":                      root[:len(root)-4],
		"flipped":                        append(append([]byte(nil), root[:len(root)-1]...), root[len(root)-1]^1),
		"empty":                          {},
	}
	for name, h := range bad {
		if st, _, err := rc.Getattr(h); err != nil || st != nfsraw.NFS3ErrStale {
			t.Errorf("GETATTR %s: status %d err %v, want NFS3ERR_STALE", name, st, err)
		}
		if st, data, _, err := rc.Read(h, 0, 4096); err != nil || st != nfsraw.NFS3ErrStale || len(data) != 0 {
			t.Errorf("READ %s: status %d (%d bytes) err %v, want NFS3ERR_STALE", name, st, len(data), err)
		}
		if st, _, _, err := rc.Lookup(h, "pkg-a"); err != nil || st != nfsraw.NFS3ErrStale {
			t.Errorf("LOOKUP in %s: status %d err %v, want NFS3ERR_STALE", name, st, err)
		}
	}

	// Every mutating procedure: NFS3ERR_ROFS, nothing changes on disk.
	file := lookupPath(t, rc, root, "pkg-a/data.txt")
	many := lookupPath(t, rc, root, "many")
	mut := []struct {
		name string
		proc uint32
		args *nfsraw.Enc
		want uint32
	}{
		{"SETATTR", 2, (&nfsraw.Enc{}).Opaque(file).U32(1).U32(0o777).U32(0).U32(0).U32(1).U64(0).U32(0).U32(0).U32(0), nfsraw.NFS3ErrROFS},
		{"WRITE", 7, (&nfsraw.Enc{}).Opaque(file).U64(0).U32(4).U32(2).Opaque([]byte("evil")), nfsraw.NFS3ErrROFS},
		{"CREATE", 8, (&nfsraw.Enc{}).Opaque(pkga).Str("new").U32(0).NoSattr(), nfsraw.NFS3ErrROFS},
		{"MKDIR", 9, (&nfsraw.Enc{}).Opaque(pkga).Str("newdir").NoSattr(), nfsraw.NFS3ErrROFS},
		{"SYMLINK", 10, (&nfsraw.Enc{}).Opaque(pkga).Str("newlink").NoSattr().Str("/etc"), nfsraw.NFS3ErrROFS},
		{"MKNOD", 11, (&nfsraw.Enc{}).Opaque(pkga).Str("fifo").U32(7).NoSattr(), nfsraw.NFS3ErrROFS},
		{"REMOVE", 12, (&nfsraw.Enc{}).Opaque(pkga).Str("data.txt"), nfsraw.NFS3ErrROFS},
		{"RMDIR", 13, (&nfsraw.Enc{}).Opaque(root).Str("many"), nfsraw.NFS3ErrROFS},
		{"RENAME", 14, (&nfsraw.Enc{}).Opaque(pkga).Str("data.txt").Opaque(pkga).Str("moved"), nfsraw.NFS3ErrROFS},
		// go-nfs decodes LINK as (dir, name, sattr, target); the RFC 1813
		// encoding (file, dir, name) does not parse there. Send go-nfs's form.
		{"LINK", 15, (&nfsraw.Enc{}).Opaque(pkga).Str("hl").NoSattr().Opaque(file), nfsraw.NFS3ErrROFS},
		// go-nfs answers COMMIT on a read-only filesystem with SERVERFAULT.
		{"COMMIT", 21, (&nfsraw.Enc{}).Opaque(file).U64(0).U32(0), nfsraw.NFS3ErrSrvFault},
	}
	for _, m := range mut {
		st, _, err := rc.NFS(m.proc, m.args)
		if err != nil || st != m.want {
			t.Errorf("%s: status %d err %v, want %d", m.name, st, err, m.want)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(fx.gen[1], "pkg-a/data.txt")); string(b) != "generation one data\n" {
		t.Errorf("gen 1 data.txt changed: %q", b)
	}
	if _, err := os.Lstat(filepath.Join(fx.gen[1], "pkg-a/new")); err == nil {
		t.Error("CREATE made a file")
	}
	_ = many

	// Metrics: requests by procedure, errors by status, bytes read.
	mf, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range mf {
		for _, m := range f.GetMetric() {
			k := f.GetName()
			for _, l := range m.GetLabel() {
				k += "," + l.GetName() + "=" + l.GetValue()
			}
			if m.Counter != nil {
				got[k] = m.Counter.GetValue()
			}
		}
	}
	for _, k := range []string{"strata_nfs_requests_total,proc=NFS3_LOOKUP", "strata_nfs_requests_total,proc=MOUNT3_MNT",
		"strata_nfs_errors_total,proc=NFS3_WRITE,status=NFS3ERR_ROFS", "strata_nfs_errors_total,proc=NFS3_GETATTR,status=NFS3ERR_STALE",
		"strata_nfs_read_bytes_total"} {
		if got[k] <= 0 {
			t.Errorf("metric %s = %v, want > 0", k, got[k])
		}
	}

	// Remove: the generation's handles go STALE and it no longer mounts;
	// gen 2 is unaffected.
	e.Remove(1)
	if st, _, _ := rc.Getattr(file); st != nfsraw.NFS3ErrStale {
		t.Errorf("GETATTR after Remove: status %d, want NFS3ERR_STALE", st)
	}
	if st, _, _ := rc.Mount("/gen/1"); st != 2 {
		t.Errorf("MOUNT /gen/1 after Remove: status %d, want MNT3ERR_NOENT", st)
	}
	if st, b, _ := rc.ReadAll(gen2data); st != nfsraw.NFS3OK || !strings.Contains(string(b), "TWO") {
		t.Errorf("gen 2 after removing gen 1: status %d data %q", st, b)
	}
}

func TestMountPaths(t *testing.T) {
	fx := newFixture(t, nil)
	e, addr, _ := fx.serve(t)
	rc := raw(t, addr)
	for p, want := range map[string]uint32{
		"/gen/99": 2, "/gen/0": 2, "/gen/x": 2, "/": 2, "/gen/1/../2": 2, "/gen/1/nope": 2,
		"/gen/1/pkg-a/lib": 20, "/gen/1/pkg-a/escape": 20, "/gen/1/pkg-a/data.txt": 20,
	} {
		if st, _, err := rc.Mount(p); err != nil || st != want {
			t.Errorf("MOUNT %s: status %d err %v, want %d", p, st, err, want)
		}
	}
	sub := mountRaw(t, rc, "/gen/1/pkg-b/lib/")
	fh := lookupPath(t, rc, sub, "libx.so")
	want, _ := os.ReadFile(filepath.Join(fx.gen[1], "pkg-b/lib/libx.so"))
	if st, b, _ := rc.ReadAll(fh); st != nfsraw.NFS3OK || !bytes.Equal(b, want) {
		t.Errorf("READ libx.so via MOUNT /gen/1/pkg-b/lib: status %d, %d bytes, want %d", st, len(b), len(want))
	}
	// Add is idempotent for the same dir, refuses another dir for a live id.
	if err := e.Add(1, fx.gen[1]+"/"); err != nil {
		t.Errorf("Add again with the same dir: %v", err)
	}
	if err := e.Add(1, fx.gen[2]); err == nil {
		t.Error("Add with another dir for a live id succeeded")
	}
	if err := e.Add(3, filepath.Join(fx.gen[1], "pkg-a/data.txt")); err == nil {
		t.Error("Add of a regular file succeeded")
	}
}

// startChild runs the export in a child process (TestMain) and returns its
// address once it listens.
func startChild(t *testing.T, addr string, fx *fixture) (*exec.Cmd, string) {
	t.Helper()
	cmd, addr, _ := startChildWith(t, addr, fx)
	return cmd, addr
}

// startChildWith is startChild with extra environment for the child; it
// also returns the address of the child's /metrics.
func startChildWith(t *testing.T, addr string, fx *fixture, env ...string) (*exec.Cmd, string, string) {
	t.Helper()
	var gens []string
	for id, dir := range fx.gen {
		gens = append(gens, fmt.Sprintf("%d=%s", id, dir))
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(append(os.Environ(), env...), childEnv+"="+addr+"|"+fx.stateDir+"|"+strings.Join(gens, ","))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("child server: %v", err)
	}
	f := strings.Fields(line)
	if len(f) != 3 || f[0] != "LISTEN" {
		t.Fatalf("child server said %q", line)
	}
	return cmd, f[1], f[2]
}

func TestHandlesSurviveRestart(t *testing.T) {
	fx := newFixture(t, nil)
	cmd, addr := startChild(t, "127.0.0.1:0", fx)

	rc := raw(t, addr)
	root := mountRaw(t, rc, "/gen/2")
	file := lookupPath(t, rc, root, "pkg-b/lib/libx.so")
	link := lookupPath(t, rc, root, "pkg-a/abs")
	many := lookupPath(t, rc, root, "many")
	_, before, _ := rc.ReadAll(file)
	// a half-finished listing: first two pages only
	st, p1, verf, _, err := rc.Readdirplus(many, 0, 0, 4096)
	if err != nil || st != nfsraw.NFS3OK || len(p1) < 3 {
		t.Fatalf("READDIRPLUS page 1: %d %v (%d entries)", st, err, len(p1))
	}
	st, p2, verf2, _, err := rc.Readdirplus(many, p1[len(p1)-1].Cookie, verf, 4096)
	if err != nil || st != nfsraw.NFS3OK || verf2 != verf {
		t.Fatalf("READDIRPLUS page 2: %d %v", st, err)
	}
	rc.Close()

	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	_, addr2 := startChild(t, addr, fx) // same port, same state dir
	if addr2 != addr {
		t.Fatalf("restarted on %s, want %s", addr2, addr)
	}
	rc2 := raw(t, addr2)
	if st, after, err := rc2.ReadAll(file); err != nil || st != nfsraw.NFS3OK || !bytes.Equal(after, before) || len(after) == 0 {
		t.Fatalf("READ old handle after restart: status %d err %v, %d bytes (want %d, same)", st, err, len(after), len(before))
	}
	if st, target, _ := rc2.Readlink(link); st != nfsraw.NFS3OK || target != "/etc/passwd" {
		t.Errorf("READLINK old handle after restart: %d %q", st, target)
	}
	if fh := mountRaw(t, rc2, "/gen/2"); !bytes.Equal(fh, root) {
		t.Error("root handle changed across restart")
	}
	rest, err := rc2.ListAll(many, p2[len(p2)-1].Cookie, verf2, 4096)
	if err != nil {
		t.Fatalf("resume READDIRPLUS with the old cookie and verifier: %v", err)
	}
	seen := map[string]int{}
	for _, en := range append(append(p1, p2...), rest...) {
		seen[en.Name]++
	}
	for i := 0; i < 300; i++ {
		n := fmt.Sprintf("f%03d", i)
		if seen[n] != 1 {
			t.Errorf("resumed listing: %s seen %d times", n, seen[n])
		}
	}
	if len(seen) != 302 { // plus . and ..
		t.Errorf("resumed listing has %d names, want 302", len(seen))
	}
}

func TestLibnfsClient(t *testing.T) {
	testenv.RequireCommands(t, "nfs-ls", "nfs-cat", "nfs-cp")
	fx := newFixture(t, nil)
	_, addr, _ := fx.serve(t)
	_, port, _ := net.SplitHostPort(addr)
	opts := "?version=3&nfsport=" + port + "&mountport=" + port + "&auto-traverse-mounts=0"
	run := func(name string, args ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, out)
		}
		return string(out)
	}
	ls := run("nfs-ls", "-R", "nfs://127.0.0.1/gen/1"+opts)
	for _, want := range []string{"pkg-a/bin/run", "pkg-b/lib/libx.so", "many/f299", "pkg-a/abs"} {
		if !strings.Contains(ls, want) {
			t.Errorf("nfs-ls -R does not show %q:\n%.2000s", want, ls)
		}
	}
	if got := run("nfs-cat", "nfs://127.0.0.1/gen/1/pkg-a/share/doc.txt"+opts); got != "documentation\n" {
		t.Errorf("nfs-cat pkg-a/share/doc.txt = %q", got)
	}
	if got := run("nfs-cat", "nfs://127.0.0.1/gen/2/pkg-a/data.txt"+opts); !strings.Contains(got, "TWO") {
		t.Errorf("nfs-cat gen 2 data.txt = %q", got)
	}
	dst := filepath.Join(t.TempDir(), "libx.so")
	run("nfs-cp", "nfs://127.0.0.1/gen/1/pkg-b/lib/libx.so"+opts, dst)
	got, _ := os.ReadFile(dst)
	want, _ := os.ReadFile(filepath.Join(fx.gen[1], "pkg-b/lib/libx.so"))
	if !bytes.Equal(got, want) {
		t.Errorf("nfs-cp libx.so: %d bytes, want %d identical", len(got), len(want))
	}
}

func TestLargeDirectory(t *testing.T) {
	const n = 100_000
	fx := newFixture(t, func(store string) {
		dir := filepath.Join(store, "huge")
		os.Mkdir(dir, 0o755)
		for i := 0; i < n; i++ {
			f, err := os.OpenFile(filepath.Join(dir, fmt.Sprintf("entry-%06d", i)), os.O_CREATE|os.O_WRONLY, 0o644)
			if err != nil {
				t.Fatal(err)
			}
			f.Close()
		}
	})
	_, addr, _ := fx.serve(t)
	v := goClientMount(t, addr, "/gen/1")
	start := time.Now()
	ents, err := v.ReadDirPlus("huge")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("go-nfs-client READDIRPLUS (4 KiB pages) of %d entries: %v", len(ents), time.Since(start))
	seen := make(map[string]bool, n)
	for _, e := range ents {
		if seen[e.Name()] {
			t.Fatalf("%s listed twice", e.Name())
		}
		seen[e.Name()] = true
	}
	for i := 0; i < n; i++ {
		if !seen[fmt.Sprintf("entry-%06d", i)] {
			t.Fatalf("entry-%06d missing (%d listed)", i, len(seen))
		}
	}
	if len(seen) != n {
		t.Errorf("%d entries listed, want %d", len(seen), n)
	}

	// With Linux-sized 32 KiB pages (raw client), and every entry has a handle
	// that resolves.
	rc := raw(t, addr)
	root := mountRaw(t, rc, "/gen/1")
	huge := lookupPath(t, rc, root, "huge")
	start = time.Now()
	all, err := rc.ListAll(huge, 0, 0, 32<<10)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("raw READDIRPLUS (32 KiB pages) of %d entries: %v", len(all), time.Since(start))
	names := make([]string, 0, len(all))
	for _, en := range all {
		names = append(names, en.Name)
	}
	sort.Strings(names)
	if len(names) != n+2 {
		t.Errorf("raw listing: %d names, want %d", len(names), n+2)
	}
	for _, i := range []int{0, n / 2, n - 1} {
		en := all[i+2]
		if st, a, err := rc.Getattr(en.FH); err != nil || st != nfsraw.NFS3OK || a.Fileid != en.Fileid {
			t.Errorf("GETATTR of %s's READDIRPLUS handle: %d %v", en.Name, st, err)
		}
	}
}

// rssKB reads this process's resident set size.
func rssKB(t testing.TB) int {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	return 0
}

// TestMemoryBoundedHandles serves N distinct handles (READDIRPLUS mints one
// per entry, then a GETATTR resolves each) and checks the server's RSS does
// not grow with N beyond the listing cache's bound. N defaults to 300,000;
// STRATA_NFS_HANDLES=1000000 runs the full million (about 4 minutes here).
func TestMemoryBoundedHandles(t *testing.T) {
	total := 300_000
	if s := os.Getenv("STRATA_NFS_HANDLES"); s != "" {
		total, _ = strconv.Atoi(s)
	}
	const perDir = 100_000
	dirs := (total + perDir - 1) / perDir
	testenv.RequireRoot(t)
	mnt := testenv.LoopBtrfs(t, "6G")
	central := filepath.Join(mnt, "central")
	testenv.Run(t, "btrfs", "subvolume", "create", central)
	for d := 0; d < dirs; d++ {
		dir := filepath.Join(central, "store", fmt.Sprintf("d%d", d))
		os.MkdirAll(dir, 0o755)
		for i := 0; i < perDir; i++ {
			f, err := os.OpenFile(filepath.Join(dir, fmt.Sprintf("e%06d", i)), os.O_CREATE|os.O_WRONLY, 0o644)
			if err != nil {
				t.Fatal(err)
			}
			f.Close()
		}
	}
	testenv.Run(t, "btrfs", "subvolume", "snapshot", "-r", central, filepath.Join(mnt, "strata-1"))
	e, err := New(Options{StateDir: t.TempDir(), DirCacheEntries: 2 * perDir})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if err := e.Add(1, filepath.Join(mnt, "strata-1/store")); err != nil {
		t.Fatal(err)
	}
	l := testListen(t, "127.0.0.1:0")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go e.Serve(ctx, l)
	rc := raw(t, l.Addr().String())
	root := mountRaw(t, rc, "/gen/1")

	measure := func() int {
		runtime.GC()
		debug.FreeOSMemory()
		return rssKB(t)
	}
	served := 0
	var base int
	start := time.Now()
	for d := 0; d < dirs; d++ {
		dfh := lookupPath(t, rc, root, fmt.Sprintf("d%d", d))
		cookie, verf := uint64(0), uint64(0)
		for {
			st, ents, v, eof, err := rc.Readdirplus(dfh, cookie, verf, 64<<10)
			if err != nil || st != nfsraw.NFS3OK {
				t.Fatalf("READDIRPLUS d%d: %d %v", d, st, err)
			}
			for _, en := range ents {
				if en.Name == "." || en.Name == ".." {
					continue
				}
				if st, _, err := rc.Getattr(en.FH); err != nil || st != nfsraw.NFS3OK {
					t.Fatalf("GETATTR %s: %d %v", en.Name, st, err)
				}
				served++
			}
			if eof {
				break
			}
			cookie, verf = ents[len(ents)-1].Cookie, v
		}
		if d == 0 {
			base = measure()
			t.Logf("RSS after %d handles: %d KiB", served, base)
		}
	}
	end := measure()
	t.Logf("RSS after %d handles: %d KiB (%v)", served, end, time.Since(start))
	if served != dirs*perDir {
		t.Fatalf("served %d handles, want %d", served, dirs*perDir)
	}
	// The cache may hold a second 100k listing (~15 MB); handles hold nothing.
	if grow := end - base; grow > 48<<10 {
		t.Errorf("RSS grew by %d KiB from %d to %d handles; handles must cost no memory", grow, perDir, served)
	}
}
