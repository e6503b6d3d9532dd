//go:build vm

package vm

import (
	"context"
	"fmt"
	"math/rand"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/server/nfs"
	"github.com/strata-nix/strata/server/nfs/guard"
	"github.com/strata-nix/strata/vm/internal/manifest"
)

// checkFuncs is prepended to guest scripts: check DESC CMD... runs CMD and
// prints "CHECK ok: DESC", or prints "CHECK FAILED: DESC" and exits 1.
const checkFuncs = `
check() { d="$1"; shift; if "$@"; then echo "CHECK ok: $d"; else echo "CHECK FAILED: $d"; exit 1; fi; }
nfsopts() { echo "vers=3,proto=tcp,port=$1,mountport=$1,mountproto=tcp,nolock,ro,hard,nconnect=4,addr=$2,mountaddr=$2"; }
nfs_dmesg_clean() { ! dmesg | grep -iE 'nfs|rpc|stale' | grep -viE 'Registering|Installing knfsd|RPC: Registered'; }
`

var (
	buildMu    sync.Mutex
	buildCache = map[string]string{}
)

// buildStatic builds a main package of this module with CGO_ENABLED=0, once
// per test process, and returns the binary.
func buildStatic(t *testing.T, pkg string) string {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if p, ok := buildCache[pkg]; ok {
		return p
	}
	dir, err := os.MkdirTemp("", "strata-vm-bin-")
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
	buildCache[pkg] = out
	return out
}

// testTree writes a tree with every kind of entry the export must serve:
// files of awkward sizes (0, 1, page-sized, multi-MiB), an executable,
// relative, absolute and dangling symlinks, nested directories, a name with
// a space, and (with many) many/, a directory of 20,000 empty files.
func testTree(t *testing.T, root string, many bool) {
	t.Helper()
	rng := rand.New(rand.NewSource(42))
	write := func(rel string, size int, mode os.FileMode) {
		p := filepath.Join(root, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		data := make([]byte, size)
		rng.Read(data)
		if err := os.WriteFile(p, data, mode); err != nil {
			t.Fatal(err)
		}
	}
	for i, size := range []int{0, 1, 4095, 4096, 4097, 65536, 1<<20 + 7, 8 << 20} {
		write(fmt.Sprintf("sizes/f%d-%d", i, size), size, 0o644)
	}
	write("bin/tool", 3000, 0o755)
	write("dir/a.txt", 100, 0o644)
	write("dir/rmme.txt", 200, 0o644)
	write("dir/sub/deeper/leaf", 5000, 0o444)
	write("with space/file name", 10, 0o644)
	for _, l := range [][2]string{{"links/rel", "../dir/a.txt"}, {"links/abs", "/etc/passwd"}, {"links/dangling", "nowhere"}, {"links/dir", "../dir"}} {
		p := filepath.Join(root, l[0])
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(l[1], p); err != nil {
			t.Fatal(err)
		}
	}
	if !many {
		return
	}
	manyDir := filepath.Join(root, "many")
	if err := os.MkdirAll(manyDir, 0o755); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20000; i++ {
		name := fmt.Sprintf("entry-%05d-%s", i, strings.Repeat("x", rng.Intn(40)))
		f, err := os.Create(filepath.Join(manyDir, name))
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
}

// btrfsGeneration makes a loop-backed btrfs with a central store subvolume
// (store/ holding testTree or what fill writes), takes a read-only snapshot
// of it and returns the snapshot's store directory.
func btrfsGeneration(t *testing.T, fill func(store string)) string {
	t.Helper()
	mnt := testenv.LoopBtrfs(t, "2G")
	central := filepath.Join(mnt, "central")
	testenv.Run(t, "btrfs", "subvolume", "create", central)
	store := filepath.Join(central, "store")
	if err := os.MkdirAll(store, 0o755); err != nil {
		t.Fatal(err)
	}
	fill(store)
	snap := filepath.Join(mnt, "strata-1")
	testenv.Run(t, "btrfs", "subvolume", "snapshot", "-r", central, snap)
	return filepath.Join(snap, "store")
}

// writeManifest makes the manifest of dir and returns it as file contents.
func writeManifest(t *testing.T, dir string) []byte {
	t.Helper()
	lines, err := manifest.Make(dir)
	if err != nil {
		t.Fatal(err)
	}
	return []byte(strings.Join(lines, "\n") + "\n")
}

// serveInProcess exports gens (id -> store dir) with server/nfs on
// 127.0.0.1 and returns the port; the export stops at cleanup.
func serveInProcess(t *testing.T, gens map[uint64]string) int {
	t.Helper()
	exp, err := nfs.New(nfs.Options{StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	for id, dir := range gens {
		if err := exp.Add(id, dir); err != nil {
			t.Fatal(err)
		}
	}
	l, err := nfs.Listen(nfs.ListenOptions{Addr: "127.0.0.1:0",
		Guard: guard.Options{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- exp.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
		exp.Close()
	})
	return l.Addr().(*net.TCPAddr).Port
}

// requireChecks fails t unless the guest succeeded and printed exactly the
// wanted number of "CHECK ok:" lines.
// failureSummary collects what says why a guest failed: the failed check
// and every warning or error a daemon logged. It goes last in a failure
// message, so a CI log that keeps only the end of the output still shows
// it.
func failureSummary(out string) string {
	var b strings.Builder
	b.WriteString("--- why (failed checks, then WARN/ERROR log lines):\n")
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, "CHECK FAILED") {
			b.WriteString(l + "\n")
		}
	}
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, "level=WARN") || strings.Contains(l, "level=ERROR") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

func requireChecks(t *testing.T, res Result, want int) {
	t.Helper()
	n := strings.Count(res.Output, "CHECK ok: ")
	if res.Status != 0 || n != want {
		t.Fatalf("guest status %d with %d of %d checks passed; output:\n%s\n%s", res.Status, n, want, lastLines(res.Output, 60), failureSummary(res.Output))
	}
	for _, l := range strings.Split(res.Output, "\n") {
		if strings.HasPrefix(l, "CHECK ok: ") || strings.HasPrefix(l, "compare: ") || strings.HasPrefix(l, "TIMING ") {
			t.Log("checked: " + l)
		}
	}
}
