package builder

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/nixstore"
)

// logBuffer collects an agent's log lines for a test.
type logBuffer struct{ testenv.Buffer }

// count returns how many lines hold every one of words.
func (l *logBuffer) count(words ...string) int {
	n := 0
	for _, line := range strings.Split(l.String(), "\n") {
		all := line != ""
		for _, w := range words {
			all = all && strings.Contains(line, w)
		}
		if all {
			n++
		}
	}
	return n
}

func (l *logBuffer) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// With one server that stops answering, nothing to fail over to: the
// outage is logged once (and its end once), however many probes fail,
// and status counts the failed attempts.
func TestMonitorLogsOutageOnce(t *testing.T) {
	u := newUnitEnv(t)
	u.srv.publish(info("a"))
	dir := newFakeDir()
	dir.add("primary", u.srv)
	u.cfg.FailoverAfter = time.Second
	var logs logBuffer
	a := u.agent(t, func(o *Options) {
		o.Server, o.Servers, o.Logger = nil, dir, logs.logger()
		o.ProbeLower = func(string) error { return nil }
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	defer func() { cancel(); <-done }()
	wait := func(what string, d time.Duration, cond func() bool) {
		t.Helper()
		for start := time.Now(); !cond(); time.Sleep(20 * time.Millisecond) {
			if time.Since(start) > d {
				t.Fatalf("timed out after %s waiting for %s (status %+v)", d, what, a.Status().Failover)
			}
		}
	}
	wait("ready", 10*time.Second, a.Ready)
	u.srv.setDown(true)
	// failover.after 1s, a probe every 200 ms: at least 5 attempts.
	wait("five failed failover attempts", 20*time.Second, func() bool { return a.Status().Failover.Attempts >= 5 })
	s := a.Status().Failover
	if s.UnansweredSince == nil || !strings.Contains(s.AttemptError, "no other server known") {
		t.Fatalf("status while down: %+v", s)
	}
	if n := logs.count("level=WARN", "failing over"); n != 1 {
		t.Errorf("%d WARN lines \"failing over\" for one outage, want 1:\n%s", n, logs.String())
	}
	if n := logs.count("level=ERROR", "failover failed"); n != 1 {
		t.Errorf("%d ERROR lines \"failover failed\" for one outage, want 1:\n%s", n, logs.String())
	}
	if n := logs.count("level=WARN", "server does not answer"); n != 1 {
		t.Errorf("%d WARN lines \"server does not answer\", want 1", n)
	}
	u.srv.setDown(false)
	wait("the outage to end", 10*time.Second, func() bool { return a.Status().Failover.UnansweredSince == nil })
	if s := a.Status().Failover; s.Attempts != 0 || s.AttemptError != "" || s.Reason != "" {
		t.Fatalf("status after the outage: %+v", s)
	}
	if n := logs.count("level=INFO", "server answers again"); n != 1 {
		t.Errorf("%d INFO lines \"server answers again\", want 1", n)
	}
	// A second outage is logged again, once.
	u.srv.setDown(true)
	wait("a failed attempt in the second outage", 20*time.Second, func() bool { return a.Status().Failover.Attempts >= 2 })
	if n := logs.count("level=WARN", "failing over"); n != 2 {
		t.Errorf("%d WARN lines \"failing over\" after two outages, want 2", n)
	}
}

// server.api's default (this host) is no candidate when servers are found
// by gossip or listed as URLs in server.prefer, unless it is set.
func TestServerAPIDefaultWithJoin(t *testing.T) {
	for yaml, want := range map[string]string{
		"cluster:\n  insecure: true\n  join: [\"central:7946\"]\n":                                        "",
		"server:\n  prefer: [http://b:7480]\n":                                                            "",
		"cluster:\n  insecure: true\n  join: [\"central:7946\"]\nserver:\n  api: http://a:7480\n":         "http://a:7480",
		"cluster:\n  insecure: true\n  join: [\"central:7946\"]\nserver:\n  api: http://127.0.0.1:7480\n": "http://127.0.0.1:7480",
		"server:\n  nfs: central:2049\n":                                                                  "http://127.0.0.1:7480",
	} {
		c := mustConfig(t, yaml, nil)
		if c.ServerAPI != want {
			t.Errorf("%q: server.api %q, want %q", yaml, c.ServerAPI, want)
		}
		var got []string
		for _, x := range NewServers(c, nil, func(string) Server { return &fakeServer{} }).Candidates() {
			got = append(got, x.API)
		}
		if want == "" && len(got) > 0 && got[0] == "http://127.0.0.1:7480" {
			t.Errorf("%q: candidates %v: the default server.api ranks first", yaml, got)
		}
	}
}

// overlayLowerDirs returns the lowerdir names (under lower/) of the
// visible overlay.
func (f *failoverEnv) overlayLowerDirs(t *testing.T) []string {
	t.Helper()
	ms, _ := f.m.Mounts()
	_, top, ok := f.a.ourOverlays(ms)
	if !ok {
		t.Fatalf("no overlay of ours at the store dir")
	}
	ls, _, err := f.a.lowersOf(top)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range ls {
		out = append(out, l.name())
	}
	return out
}

func (f *failoverEnv) forced() []string {
	f.m.mu.Lock()
	defer f.m.mu.Unlock()
	var out []string
	for _, c := range f.m.calls {
		if d, ok := strings.CutPrefix(c, "forceunmount "); ok {
			out = append(out, filepath.Base(d))
		}
	}
	slices.Sort(out)
	return out
}

// A failover done as a rotation (the replica lacks the mounted
// generation) while a local path refers to a path only the dead server's
// generation holds: no lower of the new overlay stays on the dead server.
// The replica does not serve that generation, so the kept path and its
// local referrer are invalidated; the dead server's lower is forced off.
func TestFailoverRotationKeepsNothingOnDeadServer(t *testing.T) {
	f := newFailoverEnv(t, 1) // generation 1: a, p0
	a, p0, fresh := info("a"), info("p0"), info("fresh")
	local := info("local-out", p0.Path)
	f.nix.Load(context.Background(), nixstore.RowsFromInfos([]nixstore.PathInfo{local}), nil)
	f.replica.mu.Lock()
	f.replica.gens = map[uint64][]nixstore.PathInfo{2: {a, fresh}}
	f.replica.mu.Unlock()
	f.primary.setDown(true)
	if err := f.a.Failover(context.Background(), "test"); err != nil {
		t.Fatal(err)
	}
	st := f.a.State()
	if st.String() != "idle(2)" || st.Server != f.re || !st.LastFailover.Rotated {
		t.Fatalf("state %s on %v, last %+v", st, st.Server, st.LastFailover)
	}
	for _, x := range st.Lowers {
		if x.Server != f.re.API {
			t.Fatalf("lower %+v is not the replica's: lowers %+v", x, st.Lowers)
		}
	}
	if got := f.overlayLowerDirs(t); !slices.Equal(got, []string{"2"}) {
		t.Fatalf("overlay lowers %v, want [2]: nothing of the dead server", got)
	}
	if m := f.lowerMounts(f.a); len(m) != 1 || m["2"] != 1 {
		t.Fatalf("lower mounts %v, want only the replica's 2", m)
	}
	if got := f.forced(); !slices.Equal(got, []string{"1"}) {
		t.Fatalf("forced unmounts %v, want the dead server's lower 1", got)
	}
	if f.nix.isValid(p0.Path) || f.nix.isValid(local.Path) || !f.nix.isValid(a.Path) || !f.nix.isValid(fresh.Path) {
		t.Fatalf("validity p0=%v local=%v a=%v fresh=%v, want false false true true", f.nix.isValid(p0.Path),
			f.nix.isValid(local.Path), f.nix.isValid(a.Path), f.nix.isValid(fresh.Path))
	}
	if len(st.ForceRelease) != 0 {
		t.Fatalf("force_release %v left after the release", st.ForceRelease)
	}
}

// The same, when the replica serves the kept generation (not the top
// one): the kept lower is mounted again from the replica.
func TestFailoverRotationRemountsKeptFromReplica(t *testing.T) {
	f := newFailoverEnv(t, 1) // generation 1: a, p0 on both
	a, p0, x, y := info("a"), info("p0"), info("x"), info("y")
	local := info("local-out", p0.Path)
	f.nix.Load(context.Background(), nixstore.RowsFromInfos([]nixstore.PathInfo{local}), nil)
	f.primary.publish(a, x)
	if err := f.a.Check(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if got := f.overlayLowerDirs(t); !slices.Equal(got, []string{"2", "1"}) {
		t.Fatalf("before: overlay lowers %v, want [2 1] (1 kept for local-out)", got)
	}
	f.replica.mu.Lock()
	f.replica.gens[3] = []nixstore.PathInfo{a, y}
	f.replica.mu.Unlock()
	f.primary.setDown(true)
	if err := f.a.Failover(context.Background(), "test"); err != nil {
		t.Fatal(err)
	}
	st := f.a.State()
	if st.String() != "idle(3)" || st.Server != f.re {
		t.Fatalf("state %s on %v", st, st.Server)
	}
	if got := f.overlayLowerDirs(t); !slices.Equal(got, []string{"3", "1@replica_7480"}) {
		t.Fatalf("overlay lowers %v, want [3 1@replica_7480]", got)
	}
	if m := f.lowerMounts(f.a); len(m) != 2 || m["3"] != 1 || m["1@replica_7480"] != 1 {
		t.Fatalf("lower mounts %v, want only the replica's", m)
	}
	if got := f.forced(); !slices.Equal(got, []string{"1", "2"}) {
		t.Fatalf("forced unmounts %v, want the dead server's 1 and 2", got)
	}
	if !f.nix.isValid(p0.Path) || !f.nix.isValid(local.Path) || f.nix.isValid(x.Path) || !f.nix.isValid(y.Path) {
		t.Fatalf("validity p0=%v local=%v x=%v y=%v, want true true false true", f.nix.isValid(p0.Path),
			f.nix.isValid(local.Path), f.nix.isValid(x.Path), f.nix.isValid(y.Path))
	}
}

// A check never rotates through a preferred server that lacks a mounted
// generation (it would leave that lower on the other server); rotate
// --server to it says why.
func TestCheckViaPreferredNeedsEveryLower(t *testing.T) {
	f := newFailoverEnv(t, 1) // generation 1: a, p0 on both
	a, p0 := info("a"), info("p0")
	local := info("local-out", p0.Path)
	f.nix.Load(context.Background(), nixstore.RowsFromInfos([]nixstore.PathInfo{local}), nil)
	f.primary.setDown(true)
	if err := f.a.Failover(context.Background(), "test"); err != nil || f.a.Current() != f.re {
		t.Fatalf("failover: %v, on %v", err, f.a.Current())
	}
	// The primary comes back without generation 1, with a newer one.
	f.primary.mu.Lock()
	f.primary.gens = map[uint64][]nixstore.PathInfo{2: {a, info("new")}}
	f.primary.down = false
	f.primary.mu.Unlock()
	if err := f.a.Check(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if st := f.a.State(); st.String() != "idle(1)" || f.a.Current() != f.re {
		t.Fatalf("after the check: %s on %v, want still 1 on the replica", st, f.a.Current())
	}
	err := f.a.SwitchServer(context.Background(), "primary")
	if err == nil || !strings.Contains(err.Error(), "does not serve generation 1") {
		t.Fatalf("rotate --server primary: %v, want a refusal naming generation 1", err)
	}
	if st := f.a.State(); st.String() != "idle(1)" || f.a.Current() != f.re || !f.nix.isValid(local.Path) {
		t.Fatalf("after the refused switch: %s on %v", st, f.a.Current())
	}
	if got := f.overlayLowerDirs(t); !slices.Equal(got, []string{"1@replica_7480"}) {
		t.Fatalf("overlay lowers %v after the refused switch", got)
	}
	// The replica catches up: the rotation goes through it, the kept
	// generation stays the replica's.
	f.replica.mu.Lock()
	f.replica.gens[2] = []nixstore.PathInfo{a, info("new")}
	f.replica.mu.Unlock()
	if err := f.a.Check(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	for _, x := range f.a.State().Lowers {
		if x.Server != f.re.API {
			t.Fatalf("lowers %+v: want every one the replica's", f.a.State().Lowers)
		}
	}
}

// A restart between a failover's swap and its release forces the dead
// server's lowers off, as the failover would have.
func TestRestartMidFailoverForces(t *testing.T) {
	for _, rotated := range []bool{false, true} {
		t.Run(fmt.Sprintf("rotated=%v", rotated), func(t *testing.T) {
			f := newFailoverEnv(t, 1)
			if rotated {
				f.replica.mu.Lock()
				f.replica.gens = map[uint64][]nixstore.PathInfo{2: {info("a"), info("fresh")}}
				f.replica.mu.Unlock()
			}
			f.primary.setDown(true)
			// The process dies right after the swap: the state as it was
			// persisted at Swapping is what the restart finds.
			var atSwap *State
			stop := errors.New("killed")
			b := f.agent(t, func(o *Options) {
				o.Config = f.cfg
				o.Server, o.Servers, o.Mounter = nil, f.dir, &killMounter{fakeMounter: f.m, kill: stop}
				o.OnTransition = func(s State) {
					if s.Phase == PhaseSwapping && atSwap == nil {
						c := s
						atSwap = &c
					}
				}
			})
			f.a = b
			if err := b.Failover(context.Background(), "test"); !errors.Is(err, stop) {
				t.Fatalf("failover: %v", err)
			}
			if atSwap == nil {
				t.Fatal("never reached Swapping")
			}
			if err := saveState(f.cfg.stateFile(), *atSwap); err != nil {
				t.Fatal(err)
			}
			c := f.agent(t, func(o *Options) { o.Config = f.cfg; o.Server, o.Servers = nil, f.dir })
			f.a = c
			if err := c.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			if got := f.forced(); !slices.Equal(got, []string{"1"}) {
				t.Fatalf("forced unmounts %v, want the dead server's lower 1 (calls %v)", got, f.m.calls)
			}
			if st := c.State(); st.Phase != PhaseIdle || st.Server != f.re || len(st.ForceRelease) != 0 {
				t.Fatalf("after restart: %s on %v, force_release %v", st, st.Server, st.ForceRelease)
			}
		})
	}
}

// The monitor probes every lower, not only the top one: a kept lower
// that hangs makes the agent fail over too.
func TestMonitorProbesKeptLowers(t *testing.T) {
	u := newUnitEnv(t)
	a0, p0 := info("a"), info("p0")
	u.srv.publish(a0, p0)
	dir := newFakeDir()
	primary := u.srv
	dir.add("primary", primary)
	u.cfg.FailoverAfter = time.Second
	probe := newHungProbe(t)
	a := u.agent(t, func(o *Options) { o.Server, o.Servers, o.ProbeLower = nil, dir, probe.probe })
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	u.nix.Load(context.Background(), nixstore.RowsFromInfos([]nixstore.PathInfo{info("local-out", p0.Path)}), nil)
	primary.publish(a0, info("x"))
	if err := a.Check(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if g := gens(a.State().Lowers); !slices.Equal(g, []uint64{2, 1}) {
		t.Fatalf("lowers %v, want [2 1]", g)
	}
	re := dir.add("replica", primary.replicaOf())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	defer func() { cancel(); <-done }()
	time.Sleep(500 * time.Millisecond)
	probe.kill()
	for start := time.Now(); a.Current() != re || a.State().Phase != PhaseIdle; time.Sleep(20 * time.Millisecond) {
		if time.Since(start) > 10*time.Second {
			t.Fatalf("no failover with the kept lower 1 hung (status %+v)", a.Status().Failover)
		}
	}
	if st := a.State(); !strings.Contains(st.LastFailover.Reason, "/lower/1") {
		t.Fatalf("failover reason %q, want the kept lower's statfs", st.LastFailover.Reason)
	}
}

// A server that dies while a rotation fetches from it (the call hangs)
// does not hold the failover up for the API client's 10 minutes: the call
// is given up after the stall time without progress, and the monitor's
// failover request runs next.
func TestStalledRotationFailsOver(t *testing.T) {
	f := newFailoverEnv(t, 1)
	f.a.minStall = time.Second
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.a.Run(ctx) }()
	defer func() { cancel(); <-done }()
	wait := func(what string, d time.Duration, cond func() bool) time.Duration {
		t.Helper()
		start := time.Now()
		for !cond() {
			if time.Since(start) > d {
				t.Fatalf("timed out after %s waiting for %s (state %s, status %+v)", d, what, f.a.State(), f.a.Status().Failover)
			}
			time.Sleep(20 * time.Millisecond)
		}
		return time.Since(start)
	}
	wait("ready", 10*time.Second, f.a.Ready)
	f.primary.mu.Lock()
	f.primary.stall = true
	f.primary.mu.Unlock()
	f.primary.publish(info("a"), info("new"))
	wait("the rotation's call to hang", 10*time.Second, func() bool {
		f.primary.mu.Lock()
		defer f.primary.mu.Unlock()
		return f.primary.stalled > 0
	})
	f.primary.setDown(true)
	took := wait("failover to the replica", 20*time.Second, func() bool {
		return f.a.Current() == f.re && f.a.State().Phase == PhaseIdle
	})
	t.Logf("rotation hung -> failed over in %s (failover.after 1s, stall 1s)", took.Round(10*time.Millisecond))
	if st := f.a.State(); st.Failovers != 1 || st.String() != "idle(1)" {
		t.Fatalf("state %s, %d failovers", st, st.Failovers)
	}
}

// A failover whose swap fails leaves no lower marked to be forced: the
// old server's lower is still the one in use, and the server may come
// back.
func TestFailedFailoverForgetsForce(t *testing.T) {
	f := newFailoverEnv(t, 1)
	f.primary.setDown(true)
	f.m.failSwap = errors.New("move_mount: no space left on device")
	if err := f.a.Failover(context.Background(), "test"); err == nil {
		t.Fatal("failover with a failing swap succeeded")
	}
	if st := f.a.State(); len(st.ForceRelease) != 0 || st.String() != "idle(1)" {
		t.Fatalf("after the failed failover: %s, force_release %v", st, st.ForceRelease)
	}
	f.m.failSwap = nil
	f.primary.setDown(false)
	f.primary.publish(info("a"), info("b"))
	if err := f.a.Check(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if got := f.forced(); len(got) != 0 {
		t.Fatalf("a rotation on the live primary forced %v", got)
	}
}
