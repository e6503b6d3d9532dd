//go:build integration

package builder

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/strata-nix/strata/mountinfo"

	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/apiserve"
	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/nixstore"
	"github.com/strata-nix/strata/overlay"
	"github.com/strata-nix/strata/server"
	"github.com/strata-nix/strata/snapshot/btrfs"
)

// TestMain re-runs the test binary in a private mount namespace
// (testenv.PrivateMountNS), so every mount the tests make (and any a failing
// test leaves) dies with it. The agent helper processes the tests start
// inherit that namespace.
func TestMain(m *testing.M) {
	testenv.PrivateMountNS()
	if os.Getenv(helperEnv) != "" {
		os.Exit(agentHelper())
	}
	os.Exit(m.Run())
}

// recExporter records where the server keeps each generation's store dir:
// the test's generation mounter bind-mounts it.
type recExporter struct {
	mu   sync.Mutex
	dirs map[uint64]string
}

func (r *recExporter) Add(id uint64, dir string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.dirs[id] = dir
	return nil
}
func (r *recExporter) Remove(id uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.dirs, id)
}
func (r *recExporter) dir(id uint64) (string, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	d, ok := r.dirs[id]
	return d, ok
}

// bindGenerations is the test seam for the NFS mount: a read-only bind
// mount of the server's snapshot store dir (the same read-only lower the
// NFS export serves, minus NFS, which this kernel lacks).
func bindGenerations(dirOf func(uint64) (string, bool)) GenerationMounter {
	return func(ctx context.Context, _ string, gen uint64, dir string) error {
		src, ok := dirOf(gen)
		if !ok {
			return fmt.Errorf("bind generation %d: not exported", gen)
		}
		if err := unix.Mount(src, dir, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind generation %d: %w", gen, err)
		}
		if err := unix.Mount("", dir, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			unix.Unmount(dir, unix.MNT_DETACH)
			return fmt.Errorf("bind generation %d read-only: %w", gen, err)
		}
		return nil
	}
}

// env is a real strata server (btrfs snapshots of a nix-bin chroot store,
// HTTP API on 127.0.0.1) and a builder node: a tmpfs at node/ holding the
// chroot store root node/nix (store dir node/nix/store, DB node/nix/var)
// and the agent's state dir node/state.
type env struct {
	central nixtest.Store
	srv     *server.Server
	exp     *recExporter
	addr    string // API host:port, reserved: refused until startServer
	listen  func() net.Listener
	httpSrv *http.Server

	node    string
	builder nixtest.Store // chroot store whose store dir is the overlay
	cfg     Config
}

func newEnv(t *testing.T) *env { t.Helper(); return newEnvWith(t, nil) }

// newEnvWith is newEnv with a hook on the server's options (gossip tests).
func newEnvWith(t *testing.T, serverOpts func(*server.Options)) *env {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireCommands(t, "nix-store", "nix-build", "busybox")
	testenv.RequireOverlay(t)
	mnt := testenv.LoopBtrfs(t, "1G")
	testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(mnt, "nix"))
	e := &env{central: nixtest.New(t, mnt), exp: &recExporter{dirs: map[uint64]string{}}}
	scfg := server.Config{StoreRoot: e.central.NixRoot(), StoreDir: "/nix/store", Backend: "btrfs",
		SnapshotDir: filepath.Join(mnt, "snaps"), StateDir: filepath.Join(t.TempDir(), "server"), Keep: 100}
	if err := os.MkdirAll(scfg.SnapshotDir, 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := btrfs.New(scfg.StoreRoot, scfg.SnapshotDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	so := server.Options{Config: scfg, Backend: b, Export: e.exp}
	if serverOpts != nil {
		serverOpts(&so)
	}
	e.srv, err = server.New(context.Background(), so)
	if err != nil {
		t.Fatal(err)
	}
	e.addr, e.listen = testenv.ReservePort(t)

	base := t.TempDir()
	e.node = filepath.Join(base, "node")
	if err := os.MkdirAll(e.node, 0o755); err != nil {
		t.Fatal(err)
	}
	testenv.Run(t, "mount", "-t", "tmpfs", "-o", "size=512m", "node", e.node)
	e.builder = nixtest.Store{Root: e.node}
	e.cfg = Config{
		ServerAPI:     "http://" + e.addr,
		StoreDir:      filepath.Join(e.node, "nix", "store"),
		NixStateDir:   filepath.Join(e.node, "nix", "var", "nix"),
		NixStore:      e.node,
		NixBin:        "nix-store",
		StateDir:      filepath.Join(e.node, "state"),
		NConnect:      1,
		Policy:        PolicyImmediate,
		MaxWait:       time.Minute,
		CheckInterval: 200 * time.Millisecond,
		SwapMethod:    overlay.MethodAuto,
		StagingDir:    filepath.Join(base, "staging"),
		LogLevel:      "debug",
	}
	e.cfg.Socket = filepath.Join(e.cfg.StateDir, "api.sock")
	t.Setenv("NIX_CONFIG", "build-users-group =\nsubstituters =")
	t.Cleanup(func() {
		e.stopServer()
		for range 6 {
			_ = unix.Unmount(e.cfg.StoreDir, unix.MNT_DETACH)
		}
		ms, _ := mountinfo.Read()
		for _, m := range slices.Backward(mountinfo.Under(ms, e.node)) {
			_ = unix.Unmount(m.Mountpoint, unix.MNT_DETACH)
		}
		_ = unix.Unmount(e.node, unix.MNT_DETACH)
		_ = unix.Unmount(e.cfg.StagingDir, unix.MNT_DETACH)
	})
	return e
}

// startServer serves the server API on the address newEnv reserved
// (connections to it are refused until then).
func (e *env) startServer(t *testing.T) {
	t.Helper()
	if e.httpSrv != nil {
		return
	}
	e.httpSrv = &http.Server{Handler: e.srv.Handler(apiserve.NewToken(""), nil, func() any { return map[string]any{"role": "server"} })}
	go e.httpSrv.Serve(e.listen())
}

func (e *env) stopServer() {
	if e.httpSrv != nil {
		e.httpSrv.Close()
		e.httpSrv = nil
	}
}

func (e *env) publish(t *testing.T) uint64 {
	t.Helper()
	res, err := e.srv.Publish(context.Background())
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	if !res.Published {
		t.Fatalf("publish: nothing published: %s", res.Reason)
	}
	return res.Generation.ID
}

func (e *env) registration(t *testing.T, id uint64) []nixstore.PathInfo {
	t.Helper()
	b, err := e.srv.Registration(id)
	if err != nil {
		t.Fatal(err)
	}
	infos, err := nixstore.ParseRegistration(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	return infos
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func (e *env) agent(t *testing.T, opts ...func(*Options)) *Agent {
	t.Helper()
	o := Options{
		Config:  e.cfg,
		Logger:  testLogger(t),
		Server:  api.NewClient(e.cfg.ServerAPI, ""),
		Mounter: NewSystem(bindGenerations(e.exp.dir), e.cfg.SwapMethod, e.cfg.StagingDir, nil),
		Nix:     NewNixStore(e.cfg, testLogger(t)),
	}
	for _, f := range opts {
		f(&o)
	}
	a, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// nixOut runs a nix tool on the builder node's store and returns stdout and
// stderr; a failure fails t.
func (e *env) nix(t *testing.T, tool string, args ...string) (string, string) {
	t.Helper()
	cmd := e.builder.Command(tool, args...)
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s", tool, strings.Join(args, " "), err, se.String())
	}
	return so.String(), se.String()
}

// verify runs nix-store --verify --check-contents on the builder node and
// fails t unless it succeeds without reporting anything wrong.
func (e *env) verify(t *testing.T) {
	t.Helper()
	_, stderr := e.nix(t, "nix-store", "--verify", "--check-contents")
	for _, bad := range []string{"disappeared", "was modified", "error", "invalid"} {
		if strings.Contains(stderr, bad) {
			t.Fatalf("nix-store --verify --check-contents reports problems:\n%s", stderr)
		}
	}
}

// valid reports which of paths are valid in the builder node's DB.
func (e *env) valid(t *testing.T, paths ...string) map[string]bool {
	t.Helper()
	v, err := NewNixStore(e.cfg, nil).CLI.Valid(context.Background(), paths)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]bool{}
	for _, p := range v {
		m[p] = true
	}
	return m
}

// local maps a logical store path to its place under the builder's store
// dir.
func (e *env) local(p string) string { return filepath.Join(e.cfg.StoreDir, filepath.Base(p)) }

// checkMounts checks the mount table against the agent's state: exactly one
// overlay at the store dir whose lowers are the state's, and exactly one
// mount per state lower under lower/, nothing else there.
func (e *env) checkMounts(t *testing.T, st State) {
	t.Helper()
	ms, err := mountinfo.Read()
	if err != nil {
		t.Fatal(err)
	}
	at := mountinfo.At(ms, e.cfg.StoreDir)
	if len(at) != 1 || at[0].FSType != "overlay" {
		t.Fatalf("store dir has %d mounts %+v, want exactly one overlay", len(at), at)
	}
	l, err := overlay.LayersOf(at[0])
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, x := range st.Lowers {
		want = append(want, e.cfg.lowerDir(x.Gen))
	}
	if !slices.Equal(l.Lower, append(slices.Clone(want), e.cfg.localDir())) {
		t.Fatalf("overlay lowers %v, state says %v above the local store %s", l.Lower, want, e.cfg.localDir())
	}
	if len(mountinfo.At(ms, e.cfg.localDir())) != 1 {
		t.Fatalf("local store layer %s: want exactly one bind mount", e.cfg.localDir())
	}
	got := map[string]int{}
	for _, m := range mountinfo.Under(ms, e.cfg.lowerRoot()) {
		got[m.Mountpoint]++
	}
	if len(got) != len(want) {
		t.Fatalf("mounts under %s: %v, want one each at %v", e.cfg.lowerRoot(), got, want)
	}
	for _, w := range want {
		if got[w] != 1 {
			t.Fatalf("mounts under %s: %v, want one each at %v", e.cfg.lowerRoot(), got, want)
		}
	}
	if ents, _ := os.ReadDir(e.cfg.workRoot()); len(ents) > 2+len(st.Retired) {
		t.Fatalf("work dir holds %d workdirs, want at most the current, the previous and %d of detached overlays in use", len(ents), len(st.Retired))
	}
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

type loop struct {
	cmd            *exec.Cmd
	stdout, stderr bytes.Buffer
	stop           string
	done           chan error
}

func startLoop(t *testing.T, bin, hold string, paths ...string) *loop {
	t.Helper()
	dir := t.TempDir()
	l := &loop{stop: filepath.Join(dir, "stop"), done: make(chan error, 1)}
	ready := filepath.Join(dir, "ready")
	args := []string{"-stop", l.stop, "-ready", ready}
	if hold != "" {
		args = append(args, "-hold", hold)
	}
	l.cmd = exec.Command(bin, append(args, paths...)...)
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
			t.Fatalf("statloop exited early: %v\n%s%s", err, l.stdout.String(), l.stderr.String())
		case <-time.After(2 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("statloop not ready after 20s")
		}
	}
}

var loopLine = regexp.MustCompile(`statloop iterations=(\d+) failures=(\d+) heldfail=(\d+) changes=(\d+)`)

type loopResult struct{ iterations, failures, heldFail int }

func (l *loop) finish(t *testing.T) loopResult {
	t.Helper()
	if err := os.WriteFile(l.stop, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	select {
	case <-l.done:
	case <-time.After(30 * time.Second):
		t.Fatal("statloop did not stop")
	}
	m := loopLine.FindStringSubmatch(l.stdout.String())
	if m == nil {
		t.Fatalf("statloop printed no result: %q %q", l.stdout.String(), l.stderr.String())
	}
	n := func(s string) int { v, _ := strconv.Atoi(s); return v }
	r := loopResult{n(m[1]), n(m[2]), n(m[3])}
	if r.failures != 0 || r.heldFail != 0 || r.iterations < 100 {
		t.Errorf("statloop: %d iterations, %d failures, %d held-file failures (want ≥100, 0, 0)\n%s",
			r.iterations, r.failures, r.heldFail, l.stderr.String())
	}
	return r
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func upperNames(t *testing.T, e *env) []string {
	t.Helper()
	ents, err := os.ReadDir(e.cfg.upperDir())
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, d := range ents {
		out = append(out, d.Name())
	}
	return out
}

func statusJSON(t *testing.T, a *Agent) map[string]any {
	t.Helper()
	b, err := json.Marshal(a.Status())
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}
