//go:build integration

package cluster_test

import (
	"slices"
	"testing"
	"time"

	"github.com/strata-nix/strata/cluster/clustertest"
)

// TestPropagation: one server and 50 builder members, each with its own UDP
// and TCP sockets on loopback and memberlist's LAN defaults, converge on
// each of 20 new generations; it prints the distribution (the goal is a
// median ≤ 2 s and a maximum ≤ 5 s; bench-cluster measures it too). A
// publish that some builder never learns fails the test.
func TestPropagation(t *testing.T) {
	const builders, publishes = 50, 20
	s, err := clustertest.Start(builders, nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var all, worst, rtt []time.Duration
	for g := uint64(1); g <= publishes; g++ {
		delays, rt, err := s.Publish(g, 30*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		slices.Sort(delays)
		all = append(all, delays...)
		worst = append(worst, delays[len(delays)-1])
		rtt = append(rtt, rt)
		t.Logf("publish %2d: every builder knew it after %4dms (median builder %4dms); server saw all %d hold it after %4dms",
			g, delays[len(delays)-1].Milliseconds(), delays[len(delays)/2].Milliseconds(), builders, rt.Milliseconds())
		time.Sleep(300 * time.Millisecond)
	}
	q := func(d []time.Duration, p float64) time.Duration {
		d = slices.Clone(d)
		slices.Sort(d)
		return d[int(p*float64(len(d)-1))]
	}
	t.Logf("per-publish convergence (last of %d builders), %d publishes: min %dms  median %dms  p90 %dms  max %dms",
		builders, publishes, q(worst, 0).Milliseconds(), q(worst, .5).Milliseconds(), q(worst, .9).Milliseconds(), q(worst, 1).Milliseconds())
	t.Logf("per-builder delay, %d samples: median %dms  p99 %dms  max %dms", len(all),
		q(all, .5).Milliseconds(), q(all, .99).Milliseconds(), q(all, 1).Milliseconds())
	t.Logf("server sees every builder report the new generation: median %dms  max %dms", q(rtt, .5).Milliseconds(), q(rtt, 1).Milliseconds())
	met := q(worst, .5) <= 2*time.Second && q(worst, 1) <= 5*time.Second
	t.Logf("goal (median ≤ 2s, max ≤ 5s): met=%v", met)
}
