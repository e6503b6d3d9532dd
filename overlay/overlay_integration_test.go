//go:build integration

package overlay

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/mountinfo"
)

// TestMain re-runs the test binary in a private mount namespace
// (testenv.PrivateMountNS), so every mount the tests make, and any a
// failing test leaves behind, disappears with the process and never
// reaches the host.
func TestMain(m *testing.M) {
	if f := os.Getenv(mmapHelperEnv); f != "" {
		mmapHelper(f)
	}
	testenv.PrivateMountNS()
	os.Exit(m.Run())
}

func requireOverlay(t *testing.T) {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.Require(t, testenv.InPrivateMountNS(), "needs the private mount namespace set up by TestMain")
	testenv.RequireOverlay(t)
}

// mountTmpfs mounts a fresh tmpfs on dir (created) and detaches it at cleanup.
func mountTmpfs(t *testing.T, dir, name string) string {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(name, dir, "tmpfs", 0, "mode=0755"); err != nil {
		t.Fatalf("mount tmpfs on %s: %v", dir, err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
	return dir
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func readMounts(t *testing.T) []mountinfo.Mount {
	t.Helper()
	ms, err := mountinfo.Read()
	if err != nil {
		t.Fatal(err)
	}
	return ms
}

// env is a target under its own tmpfs parent, lowers gen0..genN on a
// tmpfs, and an upper with its workdirs on a third tmpfs.
type env struct {
	base, srv, target string
	lowers            string
	upper, works      string
	staging           string
}

func newEnv(t *testing.T, gens int) *env { return newEnvLowers(t, gens, false) }

// newEnvLowers makes the lowers on tmpfs, or with btrfs as read-only
// snapshots gen0..genN of one subvolume changed between snapshots, the way
// a strata server makes generations.
func newEnvLowers(t *testing.T, gens int, btrfs bool) *env {
	t.Helper()
	base := t.TempDir()
	e := &env{base: base}
	e.srv = mountTmpfs(t, filepath.Join(base, "srv"), "srv")
	e.target = filepath.Join(e.srv, "store")
	if err := os.Mkdir(e.target, 0o755); err != nil {
		t.Fatal(err)
	}
	fill := func(d string, g int) {
		writeFile(t, filepath.Join(d, "common"), fmt.Sprintf("gen %d\n", g))
		writeFile(t, filepath.Join(d, "sub", "deep"), fmt.Sprintf("deep %d\n", g))
		writeFile(t, filepath.Join(d, "sub", "remove-me"), "whiteout me\n")
	}
	held := strings.Repeat("held bytes of gen 0\n", 200)
	if btrfs {
		e.lowers = testenv.LoopBtrfs(t, "256M")
		live := filepath.Join(e.lowers, "live")
		testenv.Run(t, "btrfs", "subvolume", "create", live)
		for g := 0; g <= gens; g++ {
			fill(live, g)
			if g == 0 {
				writeFile(t, filepath.Join(live, "held"), held)
			} else if g == 1 {
				_ = os.Remove(filepath.Join(live, "held"))
			}
			testenv.Run(t, "btrfs", "subvolume", "snapshot", "-r", live, e.gen(g))
		}
	} else {
		e.lowers = mountTmpfs(t, filepath.Join(base, "lowers"), "lowers")
		for g := 0; g <= gens; g++ {
			fill(e.gen(g), g)
		}
		writeFile(t, filepath.Join(e.gen(0), "held"), held)
	}
	up := mountTmpfs(t, filepath.Join(base, "upperfs"), "upperfs")
	e.upper = filepath.Join(up, "upper")
	e.works = filepath.Join(up, "work")
	for _, d := range []string{e.upper, e.works} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	e.staging = filepath.Join(base, "staging")
	t.Cleanup(func() {
		for range 4 { // the target may hold stacked leftovers after a failure
			_ = unix.Unmount(e.target, unix.MNT_DETACH)
		}
		_ = unix.Unmount(e.staging, unix.MNT_DETACH)
	})
	return e
}

func (e *env) gen(g int) string { return filepath.Join(e.lowers, fmt.Sprintf("gen%d", g)) }

func (e *env) layers(t *testing.T, g int) Layers {
	t.Helper()
	w, err := NewWorkdir(e.works, fmt.Sprintf("gen%d-", g))
	if err != nil {
		t.Fatal(err)
	}
	return Layers{Lower: []string{e.gen(g)}, Upper: e.upper, Work: w}
}

// buildStatloop builds internal/cmd/statloop as a static binary.
func buildStatloop(t *testing.T) string {
	t.Helper()
	goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(goBin); err != nil {
		goBin = "go"
	}
	out := filepath.Join(t.TempDir(), "statloop")
	cmd := exec.Command(goBin, "build", "-o", out, "github.com/strata-nix/strata/internal/cmd/statloop")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build statloop: %v\n%s", err, b)
	}
	return out
}

// loop is a running statloop process.
type loop struct {
	cmd            *exec.Cmd
	stdout, stderr bytes.Buffer
	stop           string
	done           chan error
}

type loopResult struct {
	iterations, failures, heldFail, changes int
	exitCode                                int
	stderr                                  string
}

// startLoop runs statloop (prefix, e.g. unshare, before it) and waits
// until it has done its first iteration.
func startLoop(t *testing.T, prefix []string, bin string, hold string, paths ...string) *loop {
	t.Helper()
	dir := t.TempDir()
	l := &loop{stop: filepath.Join(dir, "stop"), done: make(chan error, 1)}
	ready := filepath.Join(dir, "ready")
	args := append(append([]string(nil), prefix...), bin, "-stop", l.stop, "-ready", ready)
	if hold != "" {
		args = append(args, "-hold", hold)
	}
	args = append(args, paths...)
	l.cmd = exec.Command(args[0], args[1:]...)
	l.cmd.Stdout, l.cmd.Stderr = &l.stdout, &l.stderr
	if err := l.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { l.done <- l.cmd.Wait() }()
	t.Cleanup(func() { _ = l.cmd.Process.Kill() })
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(ready); err == nil {
			return l
		}
		select {
		case err := <-l.done:
			t.Fatalf("statloop exited before it was ready: %v\n%s%s", err, l.stdout.String(), l.stderr.String())
		case <-time.After(2 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("statloop not ready after 20s")
		}
	}
}

var loopLine = regexp.MustCompile(`statloop iterations=(\d+) failures=(\d+) heldfail=(\d+) changes=(\d+)`)

func (l *loop) finish(t *testing.T) loopResult {
	t.Helper()
	writeFile(t, l.stop, "")
	var err error
	select {
	case err = <-l.done:
	case <-time.After(30 * time.Second):
		t.Fatal("statloop did not stop within 30s")
	}
	r := loopResult{stderr: l.stderr.String()}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		r.exitCode = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	m := loopLine.FindStringSubmatch(l.stdout.String())
	if m == nil {
		t.Fatalf("statloop printed no result line: %q %q", l.stdout.String(), r.stderr)
	}
	r.iterations, _ = strconv.Atoi(m[1])
	r.failures, _ = strconv.Atoi(m[2])
	r.heldFail, _ = strconv.Atoi(m[3])
	r.changes, _ = strconv.Atoi(m[4])
	return r
}

func TestMountUnmount(t *testing.T) {
	requireOverlay(t)
	ctx := context.Background()
	e := newEnv(t, 0)
	l := e.layers(t, 0)

	if err := Mount(ctx, e.target, l); err != nil {
		t.Fatal(err)
	}
	top, ok := mountinfo.Top(readMounts(t), e.target)
	if !ok || top.FSType != "overlay" || top.Source != Source {
		t.Fatalf("after Mount the top mount at %s is %+v", e.target, top)
	}
	if got, err := LayersOf(top); err != nil || !reflect.DeepEqual(got, l) {
		t.Errorf("mountinfo layers = %+v %v, want %+v", got, err, l)
	}
	if got := readFile(t, filepath.Join(e.target, "common")); got != "gen 0\n" {
		t.Errorf("common through the overlay = %q", got)
	}
	writeFile(t, filepath.Join(e.target, "local"), "local build\n")
	if got := readFile(t, filepath.Join(e.upper, "local")); got != "local build\n" {
		t.Errorf("write did not land in the upper: %q", got)
	}
	if err := RemoveWorkdir(l.Work); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("RemoveWorkdir of a live overlay's workdir: %v, want 'in use'", err)
	}

	// Busy: plain unmount refuses, Detach goes.
	f, err := os.Open(filepath.Join(e.target, "common"))
	if err != nil {
		t.Fatal(err)
	}
	if err := Unmount(ctx, e.target); !errors.Is(err, unix.EBUSY) {
		t.Errorf("Unmount of a busy overlay = %v, want EBUSY", err)
	}
	if err := Detach(ctx, e.target); err != nil {
		t.Fatal(err)
	}
	if b := make([]byte, 5); true {
		if n, err := f.Read(b); err != nil || string(b[:n]) != "gen 0" {
			t.Errorf("read from a file held across Detach = %q %v", b[:n], err)
		}
	}
	f.Close()
	if _, ok := mountinfo.Top(readMounts(t), e.target); ok {
		t.Error("target still mounted after Detach")
	}

	// Remount and unmount cleanly; then the workdir can go, including
	// overlayfs's root-owned mode-000 work/work.
	if err := Mount(ctx, e.target, Layers{Lower: l.Lower, Upper: l.Upper, Work: e.layers(t, 1).Work}); err != nil {
		t.Fatal(err)
	}
	if err := Unmount(ctx, e.target); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(l.Work, "work")); err != nil || fi.Mode().Perm() != 0 {
		t.Logf("overlayfs work dir: %v %v", fi, err)
	}
	if err := RemoveWorkdir(l.Work); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(l.Work); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("workdir still there after RemoveWorkdir: %v", err)
	}
	removed, err := PruneWorkdirs(e.works)
	if err != nil || len(removed) != 1 {
		t.Errorf("PruneWorkdirs = %v %v, want the one unused workdir", removed, err)
	}
}

func TestMountBadInput(t *testing.T) {
	requireOverlay(t)
	ctx := context.Background()
	e := newEnv(t, 0)
	other := mountTmpfs(t, filepath.Join(e.base, "other"), "other")

	tests := []struct {
		name string
		l    Layers
		want string
	}{
		{"missing lower", Layers{Lower: []string{filepath.Join(e.lowers, "nope")}, Upper: e.upper, Work: e.layers(t, 0).Work}, "nope: no such file"},
		{"work on another mount", Layers{Lower: []string{e.gen(0)}, Upper: e.upper, Work: other}, "not on the same mount"},
		{"lower is a file", Layers{Lower: []string{filepath.Join(e.gen(0), "common")}, Upper: e.upper, Work: e.layers(t, 0).Work}, "not a directory"},
		{"relative lower", Layers{Lower: []string{"gen0"}, Upper: e.upper, Work: e.works}, "absolute"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := Mount(ctx, e.target, tc.l)
			t.Logf("Mount: %v", err)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Mount = %v, want an error mentioning %q", err, tc.want)
			}
			if _, ok := mountinfo.Top(readMounts(t), e.target); ok {
				t.Error("a failed Mount left a mount at the target")
			}
		})
	}
}

func TestSwapBeneath(t *testing.T) {
	requireOverlay(t)
	testenv.Require(t, BeneathSupported(), "needs MOVE_MOUNT_BENEATH (Linux 6.5+)")
	runSwaps(t, MethodBeneath, MethodBeneath, 60, false)
}

func TestSwapPropagation(t *testing.T) {
	requireOverlay(t)
	runSwaps(t, MethodPropagation, MethodPropagation, 60, false)
}

func TestSwapAuto(t *testing.T) {
	requireOverlay(t)
	want := MethodPropagation
	if BeneathSupported() {
		want = MethodBeneath
	}
	runSwaps(t, MethodAuto, want, 5, false)
}

// Lowers that are read-only btrfs snapshots of one changing subvolume, as
// a btrfs strata server exports them: same inode numbers in every
// generation, different st_dev.
func TestSwapBtrfsLowers(t *testing.T) {
	requireOverlay(t)
	const n = 50
	e := newEnvLowers(t, n, true)
	want := MethodPropagation
	if BeneathSupported() {
		want = MethodBeneath
	}
	runSwapsOn(t, e, MethodAuto, want, n, false)
}

// Namespaces that are slaves of the target's parent (systemd services,
// containers) must see the swap too, without a failed lookup.
func TestSwapSlaveNamespace(t *testing.T) {
	requireOverlay(t)
	testenv.RequireCommands(t, "unshare")
	t.Run("propagation", func(t *testing.T) { runSwaps(t, MethodPropagation, MethodPropagation, 25, true) })
	t.Run("beneath", func(t *testing.T) {
		testenv.Require(t, BeneathSupported(), "needs MOVE_MOUNT_BENEATH (Linux 6.5+)")
		runSwaps(t, MethodBeneath, MethodBeneath, 25, true)
	})
}

// runSwaps mounts gen0, then swaps to gen1..genN while statloop stats,
// opens and reads paths present in every generation and holds a file of
// gen0 open, and checks the mount table and the contents after each swap.
func runSwaps(t *testing.T, method, wantMethod Method, n int, slave bool) {
	runSwapsOn(t, newEnv(t, n), method, wantMethod, n, slave)
}

func runSwapsOn(t *testing.T, e *env, method, wantMethod Method, n int, slave bool) {
	ctx := context.Background()
	bin := buildStatloop(t)
	if slave {
		// The slave namespace must exist before the swaps and receive
		// propagation from the target's parent.
		if err := unix.Mount("", e.srv, "", unix.MS_SHARED, ""); err != nil {
			t.Fatal(err)
		}
	}
	first := e.layers(t, 0)
	if err := Mount(ctx, e.target, first); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(e.target, "local-build"), "built here\n")
	if err := os.Remove(filepath.Join(e.target, "sub", "remove-me")); err != nil {
		t.Fatal(err)
	}
	paths := []string{filepath.Join(e.target, "common"), filepath.Join(e.target, "sub", "deep"),
		filepath.Join(e.target, "local-build"), filepath.Join(e.target, "sub")}
	hold := filepath.Join(e.target, "held")
	watch := startLoop(t, nil, bin, hold, paths...)
	var slaveWatch *loop
	if slave {
		slaveWatch = startLoop(t, []string{"unshare", "--mount", "--propagation", "slave"}, bin, hold, paths...)
	}

	start := time.Now()
	var worst time.Duration
	for g := 1; g <= n; g++ {
		next := e.layers(t, g)
		t0 := time.Now()
		res, err := Swap(ctx, e.target, next, SwapOptions{Method: method, StagingDir: e.staging})
		if d := time.Since(t0); d > worst {
			worst = d
		}
		if err != nil {
			t.Fatalf("swap %d: %v", g, err)
		}
		if res.Method != wantMethod {
			t.Fatalf("swap %d used %s, want %s", g, res.Method, wantMethod)
		}
		checkAfterSwap(t, e, g, next, res)
		time.Sleep(2 * time.Millisecond) // let the watchers see each generation
	}
	elapsed := time.Since(start)

	r := watch.finish(t)
	t.Logf("%s: %d swaps in %v (slowest %v); statloop iterations=%d failures=%d heldfail=%d changes=%d",
		wantMethod, n, elapsed.Round(time.Millisecond), worst.Round(time.Microsecond), r.iterations, r.failures, r.heldFail, r.changes)
	checkLoop(t, "watcher", r)
	if slave {
		rs := slaveWatch.finish(t)
		t.Logf("slave namespace: iterations=%d failures=%d heldfail=%d changes=%d", rs.iterations, rs.failures, rs.heldFail, rs.changes)
		checkLoop(t, "watcher in a slave namespace", rs)
	}
	if method == MethodPropagation {
		parent, _ := mountinfo.Top(readMounts(t), e.srv)
		if parent.PeerGroup() == 0 {
			t.Errorf("propagation swap left the target's parent %s not shared: %v", e.srv, parent.Optional)
		}
	}
}

func checkLoop(t *testing.T, who string, r loopResult) {
	t.Helper()
	if r.exitCode != 0 || r.failures != 0 || r.heldFail != 0 {
		t.Errorf("%s: exit %d, failures=%d heldfail=%d, want none\n%s", who, r.exitCode, r.failures, r.heldFail, r.stderr)
	}
	// The watcher must have run through the swaps: it saw content change.
	if r.changes == 0 {
		t.Errorf("%s saw no generation change in %d iterations: it did not watch the swaps", who, r.iterations)
	}
}

func checkAfterSwap(t *testing.T, e *env, g int, next Layers, res SwapResult) {
	t.Helper()
	ms := readMounts(t)
	at := mountinfo.At(ms, e.target)
	if len(at) != 1 || at[0].FSType != "overlay" {
		t.Fatalf("swap %d: %d mounts at the target, want exactly one overlay: %+v", g, len(at), at)
	}
	got, err := LayersOf(at[0])
	if err != nil || !reflect.DeepEqual(got, next) {
		t.Fatalf("swap %d: overlay layers %+v %v, want %+v", g, got, err, next)
	}
	if res.Mount.ID != at[0].ID {
		t.Errorf("swap %d: result reports mount %d, mountinfo shows %d", g, res.Mount.ID, at[0].ID)
	}
	for _, m := range mountinfo.Under(ms, e.staging) {
		if m.Mountpoint != e.staging {
			t.Fatalf("swap %d: staging mount leaked: %+v", g, m)
		}
	}
	if c := readFile(t, filepath.Join(e.target, "common")); c != fmt.Sprintf("gen %d\n", g) {
		t.Fatalf("swap %d: common = %q", g, c)
	}
	if c := readFile(t, filepath.Join(e.target, "local-build")); c != "built here\n" {
		t.Fatalf("swap %d: upper file local-build = %q", g, c)
	}
	if _, err := os.Stat(filepath.Join(e.target, "sub", "remove-me")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("swap %d: whiteout in the upper lost, sub/remove-me: %v", g, err)
	}
	old := res.Old.Work
	if err := res.Cleanup(); err != nil {
		t.Fatalf("swap %d: cleanup: %v", g, err)
	}
	if _, err := os.Stat(old); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("swap %d: old workdir %s still there after Cleanup: %v", g, old, err)
	}
}

// The detector works: a non-atomic swap (detach, then mount) makes
// statloop fail. Without this, zero failures above would prove nothing.
func TestStatloopDetectsNonAtomicSwap(t *testing.T) {
	requireOverlay(t)
	ctx := context.Background()
	bin := buildStatloop(t)
	const n = 10
	e := newEnv(t, n)
	if err := Mount(ctx, e.target, e.layers(t, 0)); err != nil {
		t.Fatal(err)
	}
	watch := startLoop(t, nil, bin, "", filepath.Join(e.target, "common"))
	for g := 1; g <= n; g++ {
		if err := Detach(ctx, e.target); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
		if err := Mount(ctx, e.target, e.layers(t, g)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
	r := watch.finish(t)
	t.Logf("non-atomic: iterations=%d failures=%d", r.iterations, r.failures)
	if r.failures == 0 || r.exitCode != 1 {
		t.Errorf("statloop saw %d failures (exit %d) across %d detach+mount gaps, want some and exit 1", r.failures, r.exitCode, n)
	}
}

func TestSwapBadInputKeepsOverlay(t *testing.T) {
	requireOverlay(t)
	ctx := context.Background()
	e := newEnv(t, 1)
	cur := e.layers(t, 0)
	if err := Mount(ctx, e.target, cur); err != nil {
		t.Fatal(err)
	}
	before, _ := mountinfo.Top(readMounts(t), e.target)
	nonEmpty := e.layers(t, 1).Work
	writeFile(t, filepath.Join(nonEmpty, "junk"), "x")

	for _, method := range []Method{MethodBeneath, MethodPropagation} {
		if method == MethodBeneath && !BeneathSupported() {
			continue
		}
		tests := []struct {
			name string
			l    Layers
			want string
		}{
			{"missing lower", Layers{Lower: []string{filepath.Join(e.lowers, "gone")}, Upper: e.upper, Work: e.layers(t, 1).Work}, "gone: no such file"},
			{"current workdir", Layers{Lower: []string{e.gen(1)}, Upper: e.upper, Work: cur.Work}, "current overlay's"},
			{"non-empty workdir", Layers{Lower: []string{e.gen(1)}, Upper: e.upper, Work: nonEmpty}, "not empty"},
			{"no lower", Layers{Upper: e.upper, Work: e.layers(t, 1).Work}, "no lower"},
			// Refused by the kernel itself, after the overlay is half built.
			{"work inside upper", Layers{Lower: []string{e.gen(1)}, Upper: e.upper, Work: filepath.Join(e.upper, "wk-"+method.String())}, "create overlay"},
		}
		for _, tc := range tests {
			t.Run(method.String()+"/"+tc.name, func(t *testing.T) {
				_, err := Swap(ctx, e.target, tc.l, SwapOptions{Method: method, StagingDir: e.staging})
				t.Logf("Swap: %v", err)
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("Swap = %v, want an error mentioning %q", err, tc.want)
				}
				ms := readMounts(t)
				after, _ := mountinfo.Top(ms, e.target)
				if after.ID != before.ID || len(mountinfo.At(ms, e.target)) != 1 {
					t.Errorf("failed swap changed the target: mount %d -> %d, %d mounts", before.ID, after.ID, len(mountinfo.At(ms, e.target)))
				}
				if c := readFile(t, filepath.Join(e.target, "common")); c != "gen 0\n" {
					t.Errorf("after a failed swap common = %q, want gen 0", c)
				}
				for _, m := range mountinfo.Under(ms, e.staging) {
					if m.Mountpoint != e.staging {
						t.Errorf("staging mount leaked: %+v", m)
					}
				}
			})
		}
	}

	// A target whose top mount is not an overlay is refused.
	plain := mountTmpfs(t, filepath.Join(e.srv, "plain"), "plain")
	if _, err := Swap(ctx, plain, e.layers(t, 1), SwapOptions{}); err == nil || !strings.Contains(err.Error(), "not overlay") {
		t.Errorf("Swap on a tmpfs = %v, want 'not overlay'", err)
	}
	if _, err := Swap(ctx, filepath.Join(e.srv, "nothing"), e.layers(t, 1), SwapOptions{}); err == nil || !strings.Contains(err.Error(), "nothing is mounted") {
		t.Errorf("Swap on an unmounted dir = %v, want 'nothing is mounted'", err)
	}
}
