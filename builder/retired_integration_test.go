//go:build integration

package builder

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/server"
)

// After an immediate rotation the old overlay lives on, detached, for
// whatever still uses it: here a process in another mount namespace cloned
// while it was mounted (as a Nix sandbox is), then a process whose cwd is
// in it, in the agent's own namespace. While each lives, its overlay's
// generation stays held (Holding, which gossip reports to the servers'
// retention, and status) and its workdir survives later rotations; once it
// exits, the next check releases both. An overlay nothing uses is released
// by the rotation itself.
func TestDetachedOverlayHeldWhileInUse(t *testing.T) {
	testenv.RequireCommands(t, "unshare", "sleep")
	e := newEnv(t)
	tree := e.central.AddTree(t, "cwd-tree", map[string]string{"f": "a file\n"})
	g1 := e.publish(t)
	e.startServer(t)
	a := e.agent(t)
	ctx := context.Background()
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	work1 := a.State().Work
	rotate := func(name string) (uint64, State) {
		t.Helper()
		e.central.AddText(t, name, name+"\n")
		g := e.publish(t)
		if err := a.Check(ctx, false); err != nil {
			t.Fatalf("rotation to %d: %v", g, err)
		}
		st := a.State()
		if st.Generation != g || st.Phase != PhaseIdle {
			t.Fatalf("after rotation: %s, want idle(%d)", st, g)
		}
		e.checkMounts(t, st)
		return g, st
	}
	check := func() State {
		t.Helper()
		if err := a.Check(ctx, false); err != nil {
			t.Fatal(err)
		}
		return a.State()
	}
	holds := func(st State, g uint64) bool { return slices.Contains(Holding(st), g) }
	exists := func(p string) bool { _, err := os.Stat(p); return err == nil }

	// A process in a mount namespace of its own, cloned now: it has the
	// overlay of generation 1 mounted, as a sandboxed build has its inputs.
	sandbox := exec.Command("unshare", "--mount", "--propagation", "private", "sleep", "600")
	if err := sandbox.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sandbox.Process.Kill(); _ = sandbox.Wait() })
	waitOtherNS(t, sandbox.Process.Pid)

	g2, st := rotate("two")
	if !holds(st, g1) || !holds(st, g2) {
		t.Fatalf("after rotating to %d with a namespace still holding the overlay of %d: holding %v, want both", g2, g1, Holding(st))
	}
	g3, st := rotate("three")
	if !holds(st, g1) || holds(st, g2) {
		t.Fatalf("after rotating to %d: holding %v, want %d (in use in the other namespace) and not %d (nothing uses its overlay)",
			g3, Holding(st), g1, g2)
	}
	if len(st.Retired) != 1 || !slices.Equal(st.Retired[0].Generations, []uint64{g1}) || st.Retired[0].Overlay.Work != work1 {
		t.Fatalf("retired overlays %+v, want only generation %d's (workdir %s)", st.Retired, g1, work1)
	}
	if !exists(work1) {
		t.Fatalf("workdir %s of the overlay still in use was pruned", work1)
	}
	s := a.Status()
	if !slices.Contains(s.Holding, g1) || len(s.Retired) != 1 || !slices.Equal(s.Retired[0].Generations, []uint64{g1}) {
		t.Fatalf("status holding %v retired %+v, want generation %d held by a detached overlay", s.Holding, s.Retired, g1)
	}
	if st = check(); !holds(st, g1) {
		t.Fatalf("a check released generation %d while the namespace still uses it", g1)
	}

	// A process whose cwd is a directory of generation 3's overlay, in
	// the agent's own namespace.
	work3 := st.Work
	cwd := exec.Command("sleep", "600")
	cwd.Dir = e.local(tree)
	if err := cwd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cwd.Process.Kill(); _ = cwd.Wait() })
	waitExec(t, cwd.Process.Pid)
	g4, st := rotate("four")
	g5, st := rotate("five")
	if !holds(st, g1) || !holds(st, g3) || holds(st, g4) {
		t.Fatalf("after rotating to %d: holding %v, want %d and %d (in use) and not %d", g5, Holding(st), g1, g3, g4)
	}
	if !exists(work1) || !exists(work3) {
		t.Fatalf("workdirs of overlays in use pruned: %s %v, %s %v", work1, exists(work1), work3, exists(work3))
	}

	// The namespace ends: generation 1 is released at the next check.
	_ = sandbox.Process.Kill()
	_ = sandbox.Wait()
	st = check()
	if holds(st, g1) || !holds(st, g3) {
		t.Fatalf("after the namespace ended: holding %v, want %d released and %d still held", Holding(st), g1, g3)
	}
	if exists(work1) {
		t.Fatalf("workdir %s of a released overlay is still there", work1)
	}
	// The cwd process ends: generation 3 is released.
	_ = cwd.Process.Kill()
	_ = cwd.Wait()
	st = check()
	if h := Holding(st); !slices.Equal(h, []uint64{g5}) || len(st.Retired) != 0 {
		t.Fatalf("after every user ended: holding %v, retired %+v; want only %d", h, st.Retired, g5)
	}
	if exists(work3) {
		t.Fatalf("workdir %s of a released overlay is still there", work3)
	}
	if s := a.Status(); !slices.Equal(s.Holding, []uint64{g5}) || len(s.Retired) != 0 {
		t.Fatalf("status holding %v retired %+v, want only %d", s.Holding, s.Retired, g5)
	}
	e.verify(t)
}

// waitOtherNS waits until process pid runs in a mount namespace other
// than the caller's and has exec'd its command.
func waitOtherNS(t *testing.T, pid int) {
	t.Helper()
	self, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join("/proc", strconv.Itoa(pid))
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		ns, _ := os.Readlink(filepath.Join(p, "ns", "mnt"))
		comm, _ := os.ReadFile(filepath.Join(p, "comm"))
		if ns != "" && ns != self && string(comm) == "sleep\n" {
			return
		}
	}
	t.Fatalf("process %d not in a mount namespace of its own after 10s", pid)
}

// waitExec waits until process pid has exec'd sleep.
func waitExec(t *testing.T, pid int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if comm, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "comm")); string(comm) == "sleep\n" {
			return
		}
	}
	t.Fatalf("process %d did not start sleep", pid)
}

// A builder stopped while its generation was retired (here: the machine
// rebooted, and generation 1 was destroyed by retention meanwhile) starts
// on the newest generation: the retired generation's paths that the newest
// lacks are invalid, and so is every local path that refers to them (Nix
// needs the DB closed under references); local paths that do not stay
// valid. Every path valid in the DB is readable and nix-store --verify
// --check-contents is clean (DESIGN.md invariant 2).
func TestStartAfterGenerationRetired(t *testing.T) {
	e := newEnvWith(t, func(o *server.Options) { o.Config.Keep = 1 })
	stays := e.central.AddText(t, "stays", "in both generations\n")
	only1 := e.central.AddText(t, "only-in-1", "leaves with generation 1\n")
	lib := e.central.AddTree(t, "lib-only-in-1", map[string]string{"lib.txt": "a library\n"})
	g1 := e.publish(t)
	e.startServer(t)
	a := e.agent(t)
	ctx := context.Background()
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	uses := e.builder.Build(t, "uses-lib", `mkdir $out; echo $in0 > $out/ref`, lib)
	own := e.builder.Build(t, "own", `mkdir $out; echo mine > $out/x`)
	if v := e.valid(t, stays, only1, lib, uses, own); len(v) != 5 {
		t.Fatalf("before: valid %v, want all 5", v)
	}

	// The machine reboots; meanwhile generation 1 leaves the central
	// store with two of its paths, and retention destroys it.
	unmountAll(t, e)
	e.central.Delete(t, only1)
	e.central.Delete(t, lib)
	e.central.AddText(t, "new-in-2", "2\n")
	g2 := e.publish(t)
	if _, ok := e.srv.Generation(g1); ok {
		t.Fatalf("generation %d still live with retention.keep 1", g1)
	}
	b := e.agent(t)
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if st := b.State(); st.Phase != PhaseIdle || st.Generation != g2 || len(st.Lowers) != 1 {
		t.Fatalf("after start: %s lowers %+v, want idle(%d) on it alone", st, st.Lowers, g2)
	}
	v := e.valid(t, stays, only1, lib, uses, own)
	for p, want := range map[string]bool{stays: true, only1: false, lib: false, uses: false, own: true} {
		if v[p] != want {
			t.Errorf("%s valid=%v, want %v", p, v[p], want)
		}
	}
	for _, p := range dbPaths(t, e) {
		if _, err := os.Lstat(e.local(p)); err != nil {
			t.Errorf("valid path unreadable: %v", err)
		}
	}
	checkGeneration(t, e, g2)
	e.verify(t)
}
