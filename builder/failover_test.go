package builder

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/strata-nix/strata/cluster"
	"github.com/strata-nix/strata/nixstore"
)

func TestRankCandidates(t *testing.T) {
	c := func(name string, rtt time.Duration) Candidate {
		return Candidate{Endpoint: Endpoint{Name: name, API: "http://" + name + ":7480"}, RTT: rtt}
	}
	cs := []Candidate{c("far", 9*time.Millisecond), c("unknown", 0), c("near", time.Millisecond), c("api", 5*time.Millisecond),
		c("second", 20*time.Millisecond), c("first", 30*time.Millisecond)}
	rankCandidates(cs, []string{"first", "http://second:7480/"}, "http://api:7480")
	var got []string
	for _, x := range cs {
		got = append(got, x.Name)
	}
	if want := []string{"first", "second", "api", "near", "far", "unknown"}; !slices.Equal(got, want) {
		t.Fatalf("order %v, want %v (server.prefer by name and URL, then server.api, then RTT, unknown RTT last)", got, want)
	}
}

func TestShouldFailover(t *testing.T) {
	now := time.Now()
	refused := errors.New("connection refused")
	for _, tc := range []struct {
		name        string
		since       time.Time
		api, nfs    error
		dead        bool
		want        bool
		wantInWhy   string
		wantNoWhyAt bool
	}{
		{name: "all answer", since: now.Add(-time.Hour), wantNoWhyAt: true},
		{name: "api down, not long enough", since: now.Add(-4 * time.Second), api: refused, wantInWhy: "api: connection refused"},
		{name: "api down for failover.after", since: now.Add(-5 * time.Second), api: refused, want: true, wantInWhy: "unanswered for 5s"},
		{name: "nfs hung for failover.after", since: now.Add(-6 * time.Second), nfs: errors.New("statfs unanswered"), want: true, wantInWhy: "nfs: statfs unanswered"},
		{name: "gossip dead and api down: at once", since: now, api: refused, dead: true, want: true, wantInWhy: "gossip: member p is dead"},
		{name: "gossip dead but api answers, nfs slow", since: now, nfs: errors.New("statfs unanswered"), dead: true, wantInWhy: "nfs:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			do, why := shouldFailover(now, tc.since, 5*time.Second, tc.api, tc.nfs, tc.dead, "gossip: member p is dead")
			if do != tc.want || !strings.Contains(why, tc.wantInWhy) || (tc.wantNoWhyAt && why != "") {
				t.Fatalf("shouldFailover = %v, %q; want %v containing %q", do, why, tc.want, tc.wantInWhy)
			}
		})
	}
	if do, _ := shouldFailover(now, now.Add(-time.Hour), 0, refused, nil, false, ""); do {
		t.Fatal("failover.after 0 failed over on unanswered calls")
	}
}

type fakeGossip struct {
	servers []cluster.Server
	states  map[string]cluster.MemberState
}

func (g fakeGossip) Servers() []cluster.Server { return g.servers }
func (g fakeGossip) MemberState(n string) (cluster.MemberState, bool) {
	s, ok := g.states[n]
	return s, ok
}

func TestServersMergesConfigAndGossip(t *testing.T) {
	g := fakeGossip{
		servers: []cluster.Server{
			{Name: "central", API: "http://10.0.0.1:7480", NFS: "10.0.0.1:2049", RTT: 3 * time.Millisecond},
			{Name: "replica-a", API: "http://10.0.0.2:7480", NFS: "10.0.0.2:2049", Replica: true, RTT: time.Millisecond},
			{Name: "no-api", NFS: "10.0.0.9:2049"},
		},
		states: map[string]cluster.MemberState{"central": cluster.StateAlive, "replica-a": cluster.StateAlive, "gone": cluster.StateDead},
	}
	cfg := Config{ServerAPI: "http://10.0.0.1:7480", ServerNFS: "central.nfs:2049", Prefer: []string{"http://10.0.0.3:7480"}}
	s := NewServers(cfg, g, func(string) Server { return &fakeServer{} })
	var got []string
	for _, c := range s.Candidates() {
		got = append(got, fmt.Sprintf("%s %s %s", c.Name, c.API, c.NFS))
	}
	want := []string{
		"http://10.0.0.3:7480 http://10.0.0.3:7480 ",    // server.prefer (a URL: a candidate without gossip)
		"central http://10.0.0.1:7480 central.nfs:2049", // server.api, known by gossip as central; server.nfs applies
		"replica-a http://10.0.0.2:7480 10.0.0.2:2049",  // then by RTT
	}
	if !slices.Equal(got, want) {
		t.Fatalf("candidates\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if d, why := s.Dead(Endpoint{Name: "gone", API: "http://10.0.0.4:7480"}); !d || !strings.Contains(why, "gone is dead") {
		t.Fatalf("Dead(gone) = %v %q", d, why)
	}
	if d, _ := s.Dead(Endpoint{Name: "central", API: "http://10.0.0.1:7480"}); d {
		t.Fatal("an alive member is dead")
	}
	if s.Client(Endpoint{API: "http://x:1"}) != s.Client(Endpoint{API: "http://x:1/"}) {
		t.Fatal("one server, two clients")
	}
}

// failoverEnv is a builder on server "primary" with a replica "replica"
// serving the same generations.
type failoverEnv struct {
	*unitEnv
	dir      *fakeDir
	primary  *fakeServer
	replica  *fakeServer
	pe, re   Endpoint
	a        *Agent
	loadsAt0 int
}

func newFailoverEnv(t *testing.T, gens int) *failoverEnv {
	t.Helper()
	u := newUnitEnv(t)
	for i := range gens {
		u.srv.publish(info("a"), info(fmt.Sprintf("p%d", i)))
	}
	f := &failoverEnv{unitEnv: u, dir: newFakeDir(), primary: u.srv, replica: u.srv.replicaOf()}
	f.pe = f.dir.add("primary", f.primary)
	f.re = f.dir.add("replica", f.replica)
	f.cfg.FailoverAfter = time.Second
	f.a = u.agent(t, func(o *Options) { o.Config = f.cfg; o.Server, o.Servers = nil, f.dir })
	if err := f.a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if c := f.a.Current(); c != f.pe {
		t.Fatalf("started on %v, want the first candidate %v", c, f.pe)
	}
	f.loadsAt0 = u.nix.loads
	return f
}

// topLower is the mountpoint name of the visible overlay's top lower.
func (f *failoverEnv) topLower(t *testing.T) string {
	t.Helper()
	ms, _ := f.m.Mounts()
	_, top, ok := f.a.ourOverlays(ms)
	if !ok {
		t.Fatalf("no overlay of ours at the store dir: %+v calls %v", ms, f.m.calls)
	}
	ls, _, err := f.a.lowersOf(top)
	if err != nil {
		t.Fatal(err)
	}
	return ls[0].name()
}

func TestFailoverSameGeneration(t *testing.T) {
	f := newFailoverEnv(t, 2)
	f.primary.setDown(true)
	f.dir.setDead("primary", true)
	if err := f.a.Failover(context.Background(), "gossip: member primary is dead"); err != nil {
		t.Fatal(err)
	}
	st := f.a.State()
	if st.String() != "idle(2)" || st.Server != f.re || st.Failovers != 1 || st.LastFailover == nil ||
		st.LastFailover.From != "primary ("+f.pe.API+")" || st.LastFailover.Generation != 2 || st.LastFailover.Rotated {
		t.Fatalf("state after failover %+v (last %+v)", st, st.LastFailover)
	}
	if got := f.topLower(t); got != "2@replica_7480" {
		t.Fatalf("top lower %q, want 2@replica_7480 (same generation, the replica's mount)", got)
	}
	if m := f.lowerMounts(f.a); len(m) != 1 || m["2@replica_7480"] != 1 {
		t.Fatalf("lower mounts %v, want only the replica's", m)
	}
	if !slices.Contains(f.m.calls, "forceunmount "+filepath.Join(f.cfg.lowerRoot(), "2")) {
		t.Fatalf("the dead server's lower was not force-unmounted: calls %v", f.m.calls)
	}
	if f.nix.loads != f.loadsAt0 {
		t.Fatalf("failover imported (%d loads, %d before): the registration is the same", f.nix.loads, f.loadsAt0)
	}
	if st.Lowers[0].Server != f.re.API || st.Lowers[0].SHA256 == "" {
		t.Fatalf("lower %+v: want the replica's, with its registration sha256", st.Lowers[0])
	}
	s := f.a.Status()
	if s.Server != f.re.API || s.ServerName != "replica" || s.NFS != "replica:3049" || s.Failover.Count != 1 ||
		s.Failover.Last == nil || s.Failover.Last.To != "replica ("+f.re.API+")" {
		t.Fatalf("status %+v failover %+v", s, s.Failover)
	}

	// The primary comes back: no flap, the check finds nothing newer.
	f.primary.setDown(false)
	f.dir.setDead("primary", false)
	if err := f.a.Check(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if c := f.a.Current(); c != f.re {
		t.Fatalf("after the primary came back: on %v, want still the replica", c)
	}
	// rotate --server primary moves back, detaching (not forcing) the replica's lower.
	calls := len(f.m.calls)
	if err := f.a.SwitchServer(context.Background(), "primary"); err != nil {
		t.Fatal(err)
	}
	if c, top := f.a.Current(), f.topLower(t); c != f.pe || top != "2" {
		t.Fatalf("after rotate --server primary: on %v with top lower %q, want primary's 2", c, top)
	}
	for _, c := range f.m.calls[calls:] {
		if strings.HasPrefix(c, "forceunmount") {
			t.Fatalf("a requested move forced an unmount of a live server's lower: %v", f.m.calls[calls:])
		}
	}
	if st := f.a.State(); st.Failovers != 1 || st.LastFailover.Reason != "requested (strata builder rotate --server)" {
		t.Fatalf("after a requested move: %d failovers, last %+v", st.Failovers, st.LastFailover)
	}
	if err := f.a.SwitchServer(context.Background(), "nosuch"); err == nil || !strings.Contains(err.Error(), `"nosuch": not a live server`) {
		t.Fatalf("rotate --server nosuch: %v", err)
	}
}

func TestFailoverSwapFailures(t *testing.T) {
	t.Run("fails before switching: stays and releases the new lowers", func(t *testing.T) {
		f := newFailoverEnv(t, 1)
		f.primary.setDown(true)
		f.m.failSwap = errors.New("move_mount: no space left on device")
		err := f.a.Failover(context.Background(), "test")
		if err == nil || !strings.Contains(err.Error(), "no space left") {
			t.Fatalf("failover with a failing swap: %v", err)
		}
		st := f.a.State()
		if st.String() != "idle(1)" || st.Server != f.pe || st.Failovers != 0 || !strings.Contains(st.LastError, "no space left") {
			t.Fatalf("state %+v", st)
		}
		if top := f.topLower(t); top != "1" {
			t.Fatalf("top lower %q, want the old 1", top)
		}
		if m := f.lowerMounts(f.a); len(m) != 1 || m["1"] != 1 {
			t.Fatalf("lower mounts %v, want only the old one", m)
		}
		// The next attempt works.
		f.m.failSwap = nil
		if err := f.a.Failover(context.Background(), "test"); err != nil {
			t.Fatal(err)
		}
		if f.a.Current() != f.re {
			t.Fatal("second attempt did not fail over")
		}
	})
	t.Run("fails after switching: carries on", func(t *testing.T) {
		f := newFailoverEnv(t, 1)
		f.primary.setDown(true)
		f.m.failAfterSwitch = errors.New("read mountinfo: too many open files")
		if err := f.a.Failover(context.Background(), "test"); err != nil {
			t.Fatalf("failover whose swap failed after switching: %v, want it to carry on", err)
		}
		st := f.a.State()
		if st.String() != "idle(1)" || st.Server != f.re || st.Failovers != 1 || st.Lowers[0].name() != "1@replica_7480" {
			t.Fatalf("state %+v", st)
		}
		if m := f.lowerMounts(f.a); len(m) != 1 || m["1@replica_7480"] != 1 {
			t.Fatalf("lower mounts %v, want only the replica's", m)
		}
	})
	t.Run("no other server answers", func(t *testing.T) {
		f := newFailoverEnv(t, 1)
		f.primary.setDown(true)
		f.replica.setDown(true)
		err := f.a.Failover(context.Background(), "test")
		if err == nil || !strings.Contains(err.Error(), "replica") {
			t.Fatalf("failover with every server down: %v", err)
		}
		if st := f.a.State(); st.String() != "idle(1)" || st.Server != f.pe {
			t.Fatalf("state %+v", st)
		}
	})
}

// A replica that lacks the mounted generation but has a newer one: the
// failover is a rotation through it, the delta worked out from the GC root.
func TestFailoverRotatesWhenGenerationMissing(t *testing.T) {
	f := newFailoverEnv(t, 1)
	keep, leaving, fresh := info("a"), info("p0"), info("fresh")
	f.replica.mu.Lock()
	f.replica.gens = map[uint64][]nixstore.PathInfo{2: {keep, fresh}}
	f.replica.mu.Unlock()
	f.primary.setDown(true)
	if err := f.a.Failover(context.Background(), "test"); err != nil {
		t.Fatal(err)
	}
	st := f.a.State()
	if st.String() != "idle(2)" || st.Server != f.re || st.Failovers != 1 || !st.LastFailover.Rotated {
		t.Fatalf("state %+v last %+v", st, st.LastFailover)
	}
	if !f.nix.isValid(keep.Path) || !f.nix.isValid(fresh.Path) || f.nix.isValid(leaving.Path) {
		t.Fatalf("validity keep=%v fresh=%v leaving=%v, want true true false",
			f.nix.isValid(keep.Path), f.nix.isValid(fresh.Path), f.nix.isValid(leaving.Path))
	}
}

// The monitor: a lower whose statfs hangs (a hard mount of a dead server)
// makes the running agent fail over within failover.after plus a probe.
func TestMonitorFailsOverOnHungNFS(t *testing.T) {
	u := newUnitEnv(t)
	u.srv.publish(info("a"))
	dir := newFakeDir()
	primary, replica := u.srv, u.srv.replicaOf()
	dir.add("primary", primary)
	re := dir.add("replica", replica)
	u.cfg.FailoverAfter = time.Second
	probe := newHungProbe(t)
	a := u.agent(t, func(o *Options) { o.Server, o.Servers, o.ProbeLower = nil, dir, probe.probe })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	defer func() { cancel(); <-done }()
	wait := func(what string, d time.Duration, cond func() bool) time.Duration {
		t.Helper()
		start := time.Now()
		for !cond() {
			if time.Since(start) > d {
				t.Fatalf("timed out after %s waiting for %s (state %s, status %+v)", d, what, a.State(), a.Status().Failover)
			}
			time.Sleep(20 * time.Millisecond)
		}
		return time.Since(start)
	}
	wait("ready", 10*time.Second, a.Ready)
	time.Sleep(500 * time.Millisecond) // a few healthy probes
	if a.Current() == re {
		t.Fatal("failed over from a healthy server")
	}
	// The API still answers; only NFS hangs.
	probe.kill()
	took := wait("failover to the replica", 10*time.Second, func() bool { return a.Current() == re && a.State().Phase == PhaseIdle })
	t.Logf("NFS hung -> failed over in %s (failover.after 1s)", took.Round(10*time.Millisecond))
	if took < time.Second {
		t.Fatalf("failed over after %s, before failover.after", took)
	}
	if st := a.State(); st.Failovers != 1 || !strings.Contains(st.LastFailover.Reason, "nfs: statfs") {
		t.Fatalf("failover record %+v", st.LastFailover)
	}
}

// A kill between the failover's move_mount beneath and the detach: the
// next start completes the swap and serves the replica's lower.
func TestRestartCompletesInterruptedFailover(t *testing.T) {
	f := newFailoverEnv(t, 1)
	f.primary.setDown(true)
	stop := errors.New("killed")
	f.a.m = &killMounter{fakeMounter: f.m, kill: stop}
	if err := f.a.Failover(context.Background(), "test"); !errors.Is(err, stop) {
		t.Fatalf("failover: %v", err)
	}
	// The killed process's deferred handling never ran.
	st := f.a.State()
	st.Phase, st.Target, st.LastError, st.Server = PhaseSwapping, 1, "", f.pe
	st.Next = []Lower{{Gen: 1, Server: f.re.API, Dir: "1@replica_7480"}}
	if err := saveState(f.cfg.stateFile(), st); err != nil {
		t.Fatal(err)
	}
	b := f.agent(t, func(o *Options) { o.Config = f.cfg; o.Server, o.Servers = nil, f.dir })
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.a = b
	if st := b.State(); st.String() != "idle(1)" || st.Server != f.re || b.Current() != f.re {
		t.Fatalf("after restart: %s on %v (state server %v), want idle(1) on the replica", st, b.Current(), st.Server)
	}
	if top := f.topLower(t); top != "1@replica_7480" {
		t.Fatalf("top lower %q", top)
	}
	if m := f.lowerMounts(b); len(m) != 1 || m["1@replica_7480"] != 1 {
		t.Fatalf("lower mounts %v, want only the replica's", m)
	}
	if f.nix.loads != f.loadsAt0 {
		t.Fatal("the restart imported again")
	}
}

// After a failover the builder stays on the replica while the primary is
// back, until a rotation: the primary, ranked first, has the new
// generation, so the rotation goes through it.
func TestNextRotationReturnsToPreferred(t *testing.T) {
	f := newFailoverEnv(t, 1)
	f.primary.setDown(true)
	if err := f.a.Failover(context.Background(), "test"); err != nil {
		t.Fatal(err)
	}
	f.primary.setDown(false)
	if err := f.a.Check(context.Background(), false); err != nil || f.a.Current() != f.re {
		t.Fatalf("check with nothing new: %v, on %v: want the replica still", err, f.a.Current())
	}
	g := f.primary.publish(info("a"), info("new"))
	// The replica has not caught up yet: the check rotates through the primary.
	if err := f.a.Check(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if st := f.a.State(); st.Generation != g || f.a.Current() != f.pe || st.Lowers[0].Server != f.pe.API {
		t.Fatalf("after the next rotation: %s on %v, lowers %+v: want generation %d from the primary", st, f.a.Current(), st.Lowers, g)
	}
	if m := f.lowerMounts(f.a); len(m) != 1 || m["2"] != 1 {
		t.Fatalf("lower mounts %v, want only the primary's 2", m)
	}
}

func TestFailoverConfig(t *testing.T) {
	load := func(yaml string) (Config, error) { return loadConfig(t, yaml, nil) }
	c, err := load("server:\n  api: http://a:7480\n  prefer: [replica-1, http://b:7480]\nfailover:\n  after: 5s\n")
	if err != nil || c.FailoverAfter != 5*time.Second || !slices.Equal(c.Prefer, []string{"replica-1", "http://b:7480"}) {
		t.Fatalf("config %+v, %v", c, err)
	}
	if c, err := load("server:\n  api: http://a:7480\n"); err != nil || c.FailoverAfter != 30*time.Second {
		t.Fatalf("default failover.after: %v %v", c.FailoverAfter, err)
	}
	if _, err := load("server:\n  api: \"\"\n  prefer: [http://b:7480]\n"); err != nil {
		t.Fatalf("empty server.api with a URL in server.prefer: %v", err)
	}
	for yaml, key := range map[string]string{
		"failover:\n  after: 10ms\n":         `"failover.after"`,
		"server:\n  prefer: [\"ftp://x\"]\n": `"server.prefer"`,
		"server:\n  prefer: [\"\"]\n":        `"server.prefer"`,
	} {
		if _, err := load(yaml); err == nil || !strings.Contains(err.Error(), key) {
			t.Errorf("%q: %v, want an error naming %s", yaml, err, key)
		}
	}
}

// A reboot while the server in use is down: nothing is mounted, so the
// agent starts on another server instead of waiting.
func TestStartElsewhereWhenServerDown(t *testing.T) {
	f := newFailoverEnv(t, 1)
	f.m = newFakeMounter() // reboot: every mount gone
	f.primary.setDown(true)
	b := f.agent(t, func(o *Options) { o.Config = f.cfg; o.Server, o.Servers = nil, f.dir })
	if b.Current() != f.pe {
		t.Fatalf("state names %v, want the primary", b.Current())
	}
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.a = b
	if st := b.State(); st.String() != "idle(1)" || b.Current() != f.re || st.Server != f.re || st.Lowers[0].Server != f.re.API {
		t.Fatalf("after a start with the primary down: %s on %v, lowers %+v", st, b.Current(), st.Lowers)
	}
	if top := f.topLower(t); top != "1" {
		t.Fatalf("top lower %q, want 1 (nothing else mounted)", top)
	}
}
