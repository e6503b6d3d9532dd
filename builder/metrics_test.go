package builder

import (
	"bufio"
	"context"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/apiserve"
	"github.com/strata-nix/strata/mountinfo"
	"github.com/strata-nix/strata/overlay"
)

// scrape reads the agent's GET /metrics (no token: as on the server, a
// read-only call) and returns each sample line's value by its name with
// labels.
func scrape(t *testing.T, a *Agent) map[string]float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	a.Handler(apiserve.NewToken("")).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 {
		t.Fatalf("GET /metrics: %d %s", rec.Code, rec.Body)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(rec.Body)
	for sc.Scan() {
		l := sc.Text()
		if strings.HasPrefix(l, "#") || !strings.HasPrefix(l, "strata_") {
			continue
		}
		i := strings.LastIndexByte(l, ' ')
		v, err := strconv.ParseFloat(l[i+1:], 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", l, err)
		}
		out[l[:i]] = v
	}
	return out
}

// devMounter gives every mount of the fake mounter a device number (made
// up: InUse is faked too), so that a swap records the detached overlay.
type devMounter struct{ *fakeMounter }

func (d devMounter) Mounts() ([]mountinfo.Mount, error) {
	ms, err := d.fakeMounter.Mounts()
	for i := range ms {
		ms[i].Major, ms[i].Minor = 4095, uint32(ms[i].ID)
	}
	return ms, err
}

// The builder's metrics move with what it does, driven through the real
// agent loop on the fakes: the first import, a failover after the server
// in use stopped answering (unanswered seconds grow while no other server
// can take over), and a rotation whose old overlay a process still uses.
func TestMetricsMove(t *testing.T) {
	u := newUnitEnv(t)
	u.srv.publish(info("a"))
	dir := newFakeDir()
	primary, replica := u.srv, u.srv.replicaOf()
	dir.add("primary", primary)
	re := dir.add("replica", replica)
	u.cfg.FailoverAfter = time.Second
	var inUse atomic.Bool
	a := u.agent(t, func(o *Options) {
		o.Server, o.Servers, o.Mounter = nil, dir, devMounter{u.m}
		o.ProbeLower = func(string) error { return nil }
		o.InUse = func(ds []overlay.Detached) ([]bool, int, error) {
			used := make([]bool, len(ds))
			for i := range used {
				used[i] = inUse.Load()
			}
			return used, 0, nil
		}
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	defer func() { cancel(); <-done }()
	waitFor := func(what string, cond func(m map[string]float64) bool) map[string]float64 {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			m := scrape(t, a)
			if cond(m) {
				return m
			}
			if time.Now().After(deadline) {
				t.Fatalf("waiting for %s: metrics %v (state %s, failover %+v)", what, m, a.State(), a.Status().Failover)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	want := func(m map[string]float64, name string, v float64) {
		t.Helper()
		if got, ok := m[name]; !ok || got != v {
			t.Errorf("%s = %v (present %v), want %v", name, got, ok, v)
		}
	}

	m := waitFor("ready", func(m map[string]float64) bool { return m["strata_builder_ready"] == 1 })
	want(m, "strata_builder_generation", 1)
	want(m, "strata_builder_generation_latest", 1)
	want(m, `strata_builder_import_duration_seconds_count{method="rows"}`, 1)
	want(m, `strata_builder_rotations_total{result="ok"}`, 0)
	want(m, "strata_builder_failovers_total", 0)
	want(m, "strata_builder_server_unanswered_seconds", 0)
	want(m, "strata_builder_retired_overlays", 0)

	// The server in use stops answering while the replica is out of
	// reach: no failover, the unanswered time grows.
	dir.setDead("replica", true)
	primary.setDown(true)
	m = waitFor("unanswered time", func(m map[string]float64) bool { return m["strata_builder_server_unanswered_seconds"] > 1 })
	want(m, "strata_builder_failovers_total", 0)
	// The replica comes back: the next probe fails over to it.
	dir.setDead("replica", false)
	m = waitFor("failover", func(m map[string]float64) bool { return m["strata_builder_failovers_total"] == 1 })
	if a.Current() != re {
		t.Fatalf("after the failover on %v, want the replica", a.Current())
	}
	m = waitFor("answering server", func(m map[string]float64) bool { return m["strata_builder_server_unanswered_seconds"] == 0 })
	want(m, "strata_builder_generation", 1)
	// The overlay the failover detached is used by nothing: it goes.
	waitFor("no retired overlay", func(m map[string]float64) bool { return m["strata_builder_retired_overlays"] == 0 })

	// A rotation on the replica, with the old overlay still in use.
	inUse.Store(true)
	replica.publish(info("a"), info("b"))
	if err := a.RequestRotation(ctx, ""); err != nil {
		t.Fatal(err)
	}
	m = scrape(t, a)
	want(m, "strata_builder_generation", 2)
	want(m, `strata_builder_rotations_total{result="ok"}`, 1)
	want(m, `strata_builder_rotations_total{result="error"}`, 0)
	want(m, `strata_builder_import_duration_seconds_count{method="rows"}`, 2)
	want(m, "strata_builder_retired_overlays", 1)
	if m["strata_builder_rotation_last_seconds"] <= 0 {
		t.Errorf("strata_builder_rotation_last_seconds = %v after a rotation", m["strata_builder_rotation_last_seconds"])
	}

	// A rotation that fails counts as an error.
	replica.mu.Lock()
	replica.failDelta = errDown
	replica.mu.Unlock()
	replica.publish(info("a"), info("c"))
	if err := a.RequestRotation(ctx, ""); err == nil {
		t.Fatal("rotation with the delta failing worked")
	}
	m = scrape(t, a)
	want(m, `strata_builder_rotations_total{result="error"}`, 1)
	want(m, "strata_builder_generation", 2)
	want(m, "strata_builder_generation_latest", 3)
}
