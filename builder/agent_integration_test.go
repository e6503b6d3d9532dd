//go:build integration

package builder

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/strata-nix/strata/mountinfo"

	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/overlay"
)

// First start: the generation's paths are valid and pass a full content
// check; a build whose input exists only in the generation succeeds and
// copies nothing: the upper holds only what the build made.
func TestFirstStartAndLocalBuild(t *testing.T) {
	e := newEnv(t)
	paths := e.central.Fill(t)
	g := e.publish(t)
	e.startServer(t)

	if ents, _ := os.ReadDir(e.cfg.StoreDir); len(ents) != 0 {
		t.Fatalf("store dir not empty before start: %v", ents)
	}
	a := e.agent(t)
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	st := a.State()
	if st.Phase != PhaseIdle || st.Generation != g {
		t.Fatalf("state after start: %s, want idle(%d)", st, g)
	}
	e.checkMounts(t, st)
	reg := e.registration(t, g)
	var all []string
	for _, in := range reg {
		all = append(all, in.Path)
	}
	if v := e.valid(t, all...); len(v) != len(all) {
		t.Fatalf("%d of %d generation paths valid after start", len(v), len(all))
	}
	if st.PathsImported != len(all) {
		t.Fatalf("paths_imported %d, want %d", st.PathsImported, len(all))
	}
	e.verify(t)

	tool := paths[0]
	out := e.builder.Build(t, "local-build", `mkdir $out; $in0/bin/run > $out/said; echo $in0 > $out/ref`, tool)
	if got := readFile(t, filepath.Join(e.local(out), "said")); got != "a\n" {
		t.Fatalf("local build output says %q, want \"a\\n\"", got)
	}
	if v := e.valid(t, out); !v[out] {
		t.Fatalf("local output %s not valid", out)
	}
	upper := upperNames(t, e)
	if !slices.Contains(upper, filepath.Base(out)) {
		t.Fatalf("upper %v does not hold the local output %s", upper, out)
	}
	for _, p := range all {
		if slices.Contains(upper, filepath.Base(p)) {
			t.Fatalf("upper holds %s from the generation: it was copied", p)
		}
	}
	e.verify(t)
}

// Rotation under load, with each swap method: a statloop stats a path in
// both generations and holds a file of the first one open; rotations lose
// no lookup, the held file keeps its bytes, new paths are valid and
// readable at once, the local output stays valid, and the mounts are
// exactly the state's.
func TestRotationUnderLoad(t *testing.T) {
	for _, m := range []overlay.Method{overlay.MethodBeneath, overlay.MethodPropagation} {
		t.Run(m.String(), func(t *testing.T) {
			if m == overlay.MethodBeneath {
				testenv.Require(t, overlay.BeneathSupported(), "kernel has MOVE_MOUNT_BENEATH (Linux 6.5+)")
			}
			e := newEnv(t)
			e.cfg.SwapMethod = m
			paths := e.central.Fill(t)
			held := e.central.AddTree(t, "held", map[string]string{"big": strings.Repeat("held bytes of gen 1\n", 4000)})
			e.publish(t)
			e.startServer(t)
			a := e.agent(t)
			if err := a.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			local := e.builder.Build(t, "local", `mkdir $out; cat $in0/data.txt > $out/copy`, paths[1])
			bin := buildStatloop(t)
			l := startLoop(t, bin, filepath.Join(e.local(held), "big"),
				filepath.Join(e.local(paths[1]), "data.txt"), filepath.Join(e.local(paths[0]), "bin", "run"))
			for i := range 3 {
				fresh := e.central.AddText(t, "fresh-"+string(rune('a'+i)), strings.Repeat("new content ", i+1))
				g := e.publish(t)
				began := time.Now()
				if err := a.Check(context.Background(), false); err != nil {
					t.Fatalf("rotation to %d: %v", g, err)
				}
				took := time.Since(began)
				st := a.State()
				if st.Generation != g || st.Phase != PhaseIdle {
					t.Fatalf("after rotation: %s, want idle(%d)", st, g)
				}
				if v := e.valid(t, fresh, local); !v[fresh] || !v[local] {
					t.Fatalf("after rotation to %d: new path valid=%v, local output valid=%v", g, v[fresh], v[local])
				}
				if got := readFile(t, e.local(fresh)); got != strings.Repeat("new content ", i+1) {
					t.Fatalf("new path reads %q", got)
				}
				e.checkMounts(t, st)
				if s := a.Status(); s.SwapMethod != m.String() || s.PathsImported != 1 {
					t.Fatalf("status after rotation: method %q imported %d, want %s and 1", s.SwapMethod, s.PathsImported, m)
				}
				t.Logf("rotation to %d (%s) took %v", g, m, took)
			}
			r := l.finish(t)
			t.Logf("statloop: %d iterations, %d failures, %d held failures", r.iterations, r.failures, r.heldFail)
			if got := readFile(t, filepath.Join(e.local(local), "copy")); got != strings.Repeat("b", 10000) {
				t.Fatalf("local output content changed")
			}
			e.verify(t)
		})
	}
}

// A path that leaves the central store while a local output refers to it
// stays valid and readable: its generation stays mounted below the new one
// and status reports it. Paths nobody refers to are invalidated. Once the
// local referrer is gone, the next rotation releases the old generation.
func TestRemovedPathStillReferenced(t *testing.T) {
	e := newEnv(t)
	// A directory: Nix's sandbox hard-links file inputs into the build
	// chroot, which on an overlay copies them up into the upper.
	keep := e.central.AddTree(t, "lib-kept", map[string]string{"lib.txt": "a library the local build uses\n"})
	gone := e.central.AddText(t, "gone", "nobody refers to me\n")
	g1 := e.publish(t)
	e.startServer(t)
	a := e.agent(t)
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	local := e.builder.Build(t, "uses-lib", `mkdir $out; echo $in0 > $out/ref`, keep)

	e.central.Delete(t, keep)
	e.central.Delete(t, gone)
	e.central.AddText(t, "new-in-2", "2\n")
	g2 := e.publish(t)
	if err := a.Check(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	st := a.State()
	v := e.valid(t, keep, gone, local)
	if !v[keep] || v[gone] || !v[local] {
		t.Fatalf("after rotation: kept valid=%v (want true), gone valid=%v (want false), local valid=%v (want true)",
			v[keep], v[gone], v[local])
	}
	if got := readFile(t, filepath.Join(e.local(keep), "lib.txt")); got != "a library the local build uses\n" {
		t.Fatalf("kept path reads %q", got)
	}
	want := []Lower{{Gen: g2}, {Gen: g1, Kept: []string{keep}}}
	if len(st.Lowers) != 2 || st.Lowers[0].Gen != g2 || st.Lowers[1].Gen != g1 || !slices.Equal(st.Lowers[1].Kept, want[1].Kept) {
		t.Fatalf("state lowers %+v, want %+v", st.Lowers, want)
	}
	e.checkMounts(t, st)
	s := statusJSON(t, a)
	mounts, _ := s["mounts"].([]any)
	if len(mounts) != 2 {
		t.Fatalf("status mounts %v, want generations %d and %d", s["mounts"], g2, g1)
	}
	if m1, _ := mounts[1].(map[string]any); m1["generation"] != float64(g1) || m1["kept_paths"] != float64(1) {
		t.Fatalf("status reports %v, want generation %d kept for 1 path", mounts[1], g1)
	}
	e.verify(t)

	// Another rotation keeps generation 1 below the newest.
	e.central.AddText(t, "new-in-3", "3\n")
	g3 := e.publish(t)
	if err := a.Check(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	st = a.State()
	if len(st.Lowers) != 2 || st.Lowers[0].Gen != g3 || st.Lowers[1].Gen != g1 {
		t.Fatalf("after rotation to %d: lowers %+v, want [%d %d]", g3, st.Lowers, g3, g1)
	}
	e.checkMounts(t, st)
	e.verify(t)

	// The local referrers go (the output, and its .drv, which refers to
	// its input too): the next rotation invalidates the kept path and
	// releases generation 1.
	drv, _ := e.nix(t, "nix-store", "-q", "--deriver", local)
	e.nix(t, "nix-store", "--delete", local)
	e.nix(t, "nix-store", "--delete", strings.TrimSpace(drv))
	e.central.AddText(t, "new-in-4", "4\n")
	g4 := e.publish(t)
	if err := a.Check(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	st = a.State()
	if len(st.Lowers) != 1 || st.Lowers[0].Gen != g4 {
		t.Fatalf("after rotation to %d: lowers %+v, want only %d", g4, st.Lowers, g4)
	}
	if v := e.valid(t, keep); v[keep] {
		t.Fatalf("%s still valid after its last referrer went", keep)
	}
	for _, p := range []string{keep, gone} {
		if _, err := os.Lstat(e.local(p)); !os.IsNotExist(err) {
			t.Fatalf("%s still visible after generation %d was released: %v", p, g1, err)
		}
	}
	e.checkMounts(t, st)
	e.verify(t)
}

// Server down at start: the agent retries, is not ready and leaves the
// store dir alone; once the server is up it mounts and sends READY=1.
func TestServerDownAtStart(t *testing.T) {
	e := newEnv(t)
	e.central.Fill(t)
	g := e.publish(t)
	notes := make(chan string, 16)
	a := e.agent(t, func(o *Options) { o.Notify = func(s string) { notes <- s } })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	defer func() {
		cancel()
		<-done
	}()
	time.Sleep(2500 * time.Millisecond)
	if a.Ready() {
		t.Fatal("ready while the server is down")
	}
	if s := a.Status(); !strings.Contains(s.LastError, "connection refused") {
		t.Fatalf("status last_error %q, want the connection error", s.LastError)
	}
	ms, _ := mountinfo.Read()
	if len(mountinfo.At(ms, e.cfg.StoreDir)) != 0 {
		t.Fatal("store dir mounted while the server is down")
	}
	e.startServer(t)
	deadline := time.After(20 * time.Second)
	for {
		select {
		case n := <-notes:
			if n == "READY=1" {
				st := a.State()
				if st.Generation != g || st.Phase != PhaseIdle {
					t.Fatalf("ready in state %s, want idle(%d)", st, g)
				}
				e.checkMounts(t, st)
				e.verify(t)
				return
			}
		case <-deadline:
			t.Fatalf("not ready 20s after the server came back; state %s, error %q", a.State(), a.Status().LastError)
		}
	}
}

// Busy sees a running nix-build through its output lock, and stops seeing
// it once the build is over; an idle-policy check defers meanwhile.
func TestBusyDetectsRunningBuild(t *testing.T) {
	e := newEnv(t)
	e.central.Fill(t)
	e.publish(t)
	e.startServer(t)
	e.cfg.Policy = PolicyIdle
	a := e.agent(t)
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if busy, why, err := Busy(e.cfg.StoreDir, e.cfg.upperDir()); err != nil || busy {
		t.Fatalf("busy before any build: %v %s %v", busy, why, err)
	}
	expr := filepath.Join(t.TempDir(), "slow.nix")
	os.WriteFile(expr, []byte(`derivation { name = "slow"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "sleep 4; echo done > $out" ]; }`), 0o644)
	sh, _ := filepath.EvalSymlinks("/usr/bin/busybox")
	cmd := e.builder.Command("nix-build", expr, "--no-out-link", "--option", "sandbox-paths", "/bin/sh="+sh)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(4 * time.Second)
	seen := ""
	for time.Now().Before(deadline) {
		if busy, why, _ := Busy(e.cfg.StoreDir, e.cfg.upperDir()); busy {
			seen = why
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if seen == "" {
		t.Fatal("Busy never saw the running build")
	}
	e.central.AddText(t, "next", "next\n")
	e.publish(t)
	if err := a.Check(context.Background(), false); !errors.Is(err, ErrBusy) {
		t.Fatalf("idle-policy check during a build: %v, want ErrBusy", err)
	}
	b, _ := io.ReadAll(out)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("nix-build: %v", err)
	}
	if busy, why, err := Busy(e.cfg.StoreDir, e.cfg.upperDir()); err != nil || busy {
		t.Fatalf("busy after the build (%s): %v %s %v", b, busy, why, err)
	}
	if err := a.Check(context.Background(), false); err != nil || a.State().Generation != 2 {
		t.Fatalf("idle-policy check after the build: %v, generation %d", err, a.State().Generation)
	}
	t.Logf("lock seen: %s", seen)
}
