//go:build integration

package builder

import (
	"context"
	"reflect"
	"testing"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/cluster"
	"github.com/strata-nix/strata/internal/lifecycle"
	"github.com/strata-nix/strata/server"
)

// TestGossipDiscoveryAndWake: the real agent (bind-mounted generations of a
// real btrfs server, real overlay) with cluster.join and no server.api, and
// polling set to an hour. It finds the server by gossip and becomes ready;
// a publish announced by the server's member makes it rotate; the server
// sees it hold exactly its generation; stopping it (as SIGTERM does) leaves
// the cluster and releases the hold.
func TestGossipDiscoveryAndWake(t *testing.T) {
	var node *cluster.Node
	e := newEnvWith(t, func(o *server.Options) {
		o.Announce = func(gs []api.Generation) {
			if node != nil {
				node.SetServerState(server.ClusterGenerations(gs))
			}
		}
		o.InUse = func() (map[uint64][]string, bool) { return node.Holds() }
	})
	var err error
	node, err = cluster.New(cluster.Config{Name: "central", ClusterName: "t", Bind: "127.0.0.1:0", DeadGrace: time.Hour,
		Meta: cluster.Meta{Role: cluster.RoleServer, API: "http://" + e.addr, NFS: "127.0.0.1:1"}}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer node.Close()
	e.central.Fill(t)
	e.startServer(t)
	g1 := e.publish(t)

	cfg := e.cfg
	cfg.ServerAPI, cfg.CheckInterval = "", time.Hour
	cfg.Cluster = cluster.Settings{Enabled: true, Bind: "127.0.0.1:0", Join: []string{node.Addr()}, ClusterName: "t",
		NodeName: "b1", DeadGrace: time.Hour, Insecure: true}
	e.cfg = cfg
	g, err := NewGossip(cfg, "test", testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer g.Node().Close()
	ag := e.agent(t, func(o *Options) {
		o.Config = cfg
		o.Server, o.Servers = nil, NewServers(cfg, g.Node(), func(u string) Server { return api.NewClient(u, "") })
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Serve(ctx, ag, cfg, testLogger(t), DaemonOptions{Notify: lifecycle.Systemd(testLogger(t)), Gossip: g})
	}()
	wait := func(d time.Duration, what string, cond func() bool) time.Duration {
		t.Helper()
		start := time.Now()
		for !cond() {
			if time.Since(start) > d {
				t.Fatalf("timed out after %s waiting for %s", d, what)
			}
			time.Sleep(20 * time.Millisecond)
		}
		return time.Since(start)
	}
	wait(60*time.Second, "ready on the first generation", func() bool { return ag.Ready() && ag.State().Generation == g1 })
	e.verify(t)
	wait(10*time.Second, "the server to see b1 hold the first generation", func() bool {
		h, _ := node.Holds()
		return reflect.DeepEqual(h, map[uint64][]string{g1: {"b1"}})
	})

	e.central.AddText(t, "announced", "announced by gossip\n")
	g2 := e.publish(t)
	took := wait(60*time.Second, "rotation to the announced generation (polling is hourly)", func() bool { return ag.State().Generation == g2 })
	t.Logf("publish -> rotated to generation %d by gossip in %s", g2, took.Round(time.Millisecond))
	wait(10*time.Second, "the server to see b1 hold only the new generation", func() bool {
		h, _ := node.Holds()
		return reflect.DeepEqual(h, map[uint64][]string{g2: {"b1"}})
	})
	e.verify(t)

	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	wait(10*time.Second, "b1's hold to be released after it left", func() bool {
		h, _ := node.Holds()
		return len(h) == 0
	})
	for _, m := range node.Members() {
		if m.Name == "b1" && m.State != cluster.StateLeft {
			t.Fatalf("b1 after stop: %s", m.State)
		}
	}
}
