//go:build integration

package builder

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/nixtest"
)

// agentLog records an agent's log next to the test's.
type agentLog struct {
	t  *testing.T
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *agentLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	l.b.Write(p)
	l.mu.Unlock()
	l.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func (l *agentLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func recordLog(t *testing.T) (*agentLog, func(*Options)) {
	lb := &agentLog{t: t}
	return lb, func(o *Options) {
		o.Logger = slog.New(slog.NewTextHandler(lb, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
}

// First start on an empty builder installs the generation's Nix DB (no
// row import): every path is valid as the central store's Nix reports it
// (signatures included), the generation is rooted, the store verifies. A
// rotation then imports the new rows into the installed DB, and a garbage
// collection keeps every generation path and collects a local one. A Nix
// process holding the store open at first start makes the agent import
// rows instead, and the log says why.
func TestFirstStartInstallsNixDB(t *testing.T) {
	e := newEnv(t)
	made := e.central.Fill(t)
	sk, _ := nixtest.GenerateKey(t, "central-1")
	e.central.Sign(t, sk, made[0], made[3])
	g := e.publish(t)
	e.startServer(t)
	lb, withLog := recordLog(t)
	a := e.agent(t, withLog)
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(lb.String(), "installed the generation's nix db") || strings.Contains(lb.String(), "importing rows") {
		t.Fatal("first start did not install the generation's nix db")
	}
	want := e.central.PathInfos(t)
	if st := a.State(); st.Generation != g || st.PathsImported != len(want) {
		t.Fatalf("state %s, paths_imported %d, want %d", st, st.PathsImported, len(want))
	}
	got := e.builder.PathInfos(t)
	root, _ := os.Readlink(e.cfg.gcRootLink())
	if _, ok := got[root]; !ok || !isRootPath(root) {
		t.Fatalf("root %q not valid", root)
	}
	delete(got, root)
	if len(got) != len(want) {
		t.Fatalf("%d paths valid on the builder, %d on the central store", len(got), len(want))
	}
	for p, w := range want {
		x := got[p]
		slices.Sort(x.Signatures)
		slices.Sort(w.Signatures)
		if !reflect.DeepEqual(x, w) {
			t.Errorf("nix path-info %s:\nbuilder %+v\ncentral %+v", p, x, w)
		}
	}
	e.verify(t)

	// Rotation: rows into the installed DB; GC keeps the generation.
	added := e.central.AddText(t, "after-install", "new\n")
	g2 := e.publish(t)
	if err := a.Check(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	if st := a.State(); st.Generation != g2 {
		t.Fatalf("state after rotation %s", st)
	}
	// /metrics counts the DB install of the first start and the rows of
	// the rotation.
	m := scrape(t, a)
	for name, want := range map[string]float64{`strata_builder_import_duration_seconds_count{method="nixdb"}`: 1,
		`strata_builder_import_duration_seconds_count{method="rows"}`: 1, `strata_builder_rotations_total{result="ok"}`: 1,
		"strata_builder_generation": float64(g2)} {
		if m[name] != want {
			t.Errorf("metric %s = %v, want %v", name, m[name], want)
		}
	}
	local := e.builder.AddText(t, "local-garbage", "collect me\n")
	e.nix(t, "nix-collect-garbage")
	all := append(slices.Collect(mapsKeys(want)), added)
	if v := e.valid(t, all...); len(v) != len(all) {
		t.Fatalf("after gc %d of %d generation paths valid", len(v), len(all))
	}
	if v := e.valid(t, local); v[local] {
		t.Fatal("unrooted local path survived gc")
	}
	e.verify(t)
}

func mapsKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

func TestFirstStartNixHoldsStore(t *testing.T) {
	e := newEnv(t)
	e.central.Fill(t)
	g := e.publish(t)
	e.startServer(t)
	// Nix creates its DB; then a process holds the big-lock shared, as
	// every Nix process with the store open does.
	e.nix(t, "nix-store", "--dump-db")
	lock := holdBigLock(t, filepath.Join(e.cfg.NixStateDir, "db", "big-lock"))
	defer lock()
	time.Sleep(200 * time.Millisecond)
	lb, withLog := recordLog(t)
	a := e.agent(t, withLog)
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(lb.String(), "a Nix process has the store open") || strings.Contains(lb.String(), "installed the generation's nix db") {
		t.Fatal("the agent did not fall back to rows, or did not say why")
	}
	reg := e.registration(t, g)
	if st := a.State(); st.Generation != g || st.PathsImported != len(reg) {
		t.Fatalf("state %s, paths_imported %d, want %d", st, st.PathsImported, len(reg))
	}
	if v := e.valid(t, pathsOf(reg)...); len(v) != len(reg) {
		t.Fatalf("%d of %d paths valid", len(v), len(reg))
	}
	e.verify(t)
}

// holdBigLock holds a shared flock on path in a child process, as a Nix
// process with the store open does, until the returned func ends it.
func holdBigLock(t *testing.T, path string) func() {
	t.Helper()
	cmd := exec.Command("flock", "--shared", path, "sleep", "600")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	stop := func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
	}
	for range 100 {
		b, _ := os.ReadFile("/proc/locks")
		if strings.Contains(string(b), fmt.Sprintf(" %d ", cmd.Process.Pid)) {
			return stop
		}
		time.Sleep(20 * time.Millisecond)
	}
	stop()
	t.Fatal("flock did not take the lock")
	return nil
}
