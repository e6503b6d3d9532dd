package cluster

import (
	"crypto/rand"
	"fmt"
	"log/slog"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/strata-nix/strata/internal/testenv"
)

// fast makes failure detection take about a second instead of ten.
func fast(c *memberlist.Config) {
	c.ProbeInterval = 100 * time.Millisecond
	c.ProbeTimeout = 50 * time.Millisecond
	c.GossipInterval = 50 * time.Millisecond
	c.PushPullInterval = time.Second
	c.SuspicionMult = 2
	c.GossipToTheDeadTime = 2 * time.Second
	c.TCPTimeout = 2 * time.Second
}

type testNode struct {
	*Node
	logs *testenv.Buffer
}

func startNode(t *testing.T, name string, role Role, kr *Keyring, cluster string, join ...string) (testNode, error) {
	t.Helper()
	logs := &testenv.Buffer{}
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	if cluster == "" {
		cluster = "test"
	}
	n, err := New(Config{Name: name, ClusterName: cluster, Bind: "127.0.0.1:0", Join: join, Keyring: kr,
		DeadGrace: 2 * time.Second, Settle: time.Hour, Meta: Meta{Role: role, Version: "test"}, Tune: fast}, log)
	if err != nil {
		return testNode{}, err
	}
	t.Cleanup(func() { n.Close() })
	return testNode{n, logs}, nil
}

func mustNode(t *testing.T, name string, role Role, kr *Keyring, join ...string) testNode {
	t.Helper()
	n, err := startNode(t, name, role, kr, "", join...)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// waitFor polls cond for up to d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	end := time.Now().Add(d)
	for !cond() {
		if time.Now().After(end) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func memberState(n *Node, name string) string {
	for _, m := range n.Members() {
		if m.Name == name {
			return m.State.String()
		}
	}
	return "unknown"
}

// hammer calls what the API and metrics call, in a loop, while members
// join, die and leave: memberlist calls the event delegate with its node
// lock held, so a Node method that took its own lock and then memberlist's
// would deadlock here (bench-cluster once hung on Members).
func hammer(t *testing.T, n *Node) {
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			n.Members()
			n.Holds()
			n.Servers()
			n.NewestGeneration()
		}
	}()
	t.Cleanup(func() { close(stop); <-done })
}

func TestHoldsLifecycle(t *testing.T) {
	srv := mustNode(t, "srv", RoleServer, nil)
	hammer(t, srv.Node)
	b1 := mustNode(t, "b1", RoleBuilder, nil, srv.Addr())
	b2 := mustNode(t, "b2", RoleBuilder, nil, srv.Addr())
	b3 := mustNode(t, "b3", RoleBuilder, nil, srv.Addr())
	b1.SetBuilderState("http://srv", "idle", []uint64{1})
	b2.SetBuilderState("http://srv", "idle", []uint64{2, 1})
	b3.SetBuilderState("http://srv", "idle", []uint64{2})
	want := map[uint64][]string{1: {"b1", "b2"}, 2: {"b2", "b3"}}
	waitFor(t, 5*time.Second, "the server to learn every hold", func() bool {
		h, _ := srv.Holds()
		return reflect.DeepEqual(h, want)
	})
	// A member without seeds (a server) waits Settle for builders to
	// re-join it; a member whose own join exchanged state knows at once.
	if _, known := srv.Holds(); known {
		t.Fatal("a member without seeds claims to know the holds before Settle")
	}
	waitFor(t, 2*time.Second, "b2's join to count as synced", func() bool { _, known := b2.Holds(); return known })
	srv.SetServerState([]Generation{{ID: 1}, {ID: 2}, {ID: 3}})
	waitFor(t, 5*time.Second, "builders to learn generation 3", func() bool {
		return b1.NewestGeneration() == 3 && b2.NewestGeneration() == 3 && b3.NewestGeneration() == 3
	})
	if s := b1.Servers(); len(s) != 1 || s[0].Name != "srv" || s[0].Newest != 3 {
		t.Fatalf("servers seen by b1: %+v", s)
	}

	// Graceful leave releases at once.
	if err := b1.Leave(time.Second); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 3*time.Second, "b1 to be left", func() bool { return memberState(srv.Node, "b1") == "left" })
	if h, _ := srv.Holds(); !reflect.DeepEqual(h[1], []string{"b2"}) {
		t.Fatalf("after b1 left, holders of 1: %v", h[1])
	}

	// A crash: suspect, then dead, still holding for DeadGrace.
	b3.Close()
	waitFor(t, 5*time.Second, "b3 to be dead", func() bool { return memberState(srv.Node, "b3") == "dead" })
	deadAt := time.Now()
	if h, _ := srv.Holds(); !reflect.DeepEqual(h[2], []string{"b2", "b3"}) {
		t.Fatalf("dead b3 no longer holds 2 right after death: %v", h[2])
	}
	waitFor(t, 4*time.Second, "b3's holds to expire", func() bool {
		h, _ := srv.Holds()
		return reflect.DeepEqual(h[2], []string{"b2"})
	})
	if d := time.Since(deadAt); d < time.Second {
		t.Fatalf("b3's holds expired %s after death; grace is 2s", d)
	}
	var b3m Member
	for _, m := range srv.Members() {
		if m.Name == "b3" {
			b3m = m
		}
	}
	if b3m.State != StateDead || b3m.Holds || b3m.LastSeen == nil || !reflect.DeepEqual(b3m.Generations, []uint64{2}) {
		t.Fatalf("members entry of b3: %+v", b3m)
	}
	if !strings.Contains(srv.logs.String(), "cluster member dead") {
		t.Fatal("no log line for the dead member")
	}
}

func key(t *testing.T) []byte {
	k := make([]byte, 32)
	rand.Read(k)
	return k
}

func ring(t *testing.T, keys ...[]byte) *Keyring {
	kr, err := NewKeyring(keys...)
	if err != nil {
		t.Fatal(err)
	}
	return kr
}

func TestEncryptionAndClusterName(t *testing.T) {
	k1, k2 := key(t), key(t)
	a := mustNode(t, "a", RoleServer, ring(t, k1))
	mustNode(t, "b", RoleBuilder, ring(t, k1), a.Addr())
	waitFor(t, 5*time.Second, "b to join a", func() bool { return memberState(a.Node, "b") == "alive" })

	// The refused member's own log says it failed to join, why, and what
	// to check; the seed's log says what it refused.
	refused := func(name string, kr *Keyring, cluster, wantSeedLog, wantOwnErr string) {
		t.Helper()
		n, err := startNode(t, name, RoleBuilder, kr, cluster, a.Addr())
		if err != nil {
			t.Fatal(err)
		}
		waitFor(t, 5*time.Second, name+"'s join failure in its log", func() bool {
			l := n.logs.String()
			return strings.Contains(l, "join cluster failed") && strings.Contains(l, wantOwnErr) && strings.Contains(l, "cluster.keyring_file")
		})
		if s := memberState(a.Node, name); s != "unknown" {
			t.Fatalf("%s is %s at a", name, s)
		}
		if len(n.Members()) != 1 {
			t.Fatalf("%s knows members: %+v", name, n.Members())
		}
		if !strings.Contains(a.logs.String(), wantSeedLog) {
			t.Fatalf("a logged no %q for %s; logs:\n%s", wantSeedLog, name, a.logs.String())
		}
		for _, l := range strings.Split(n.logs.String(), "\n") {
			if strings.Contains(l, "join cluster failed") {
				t.Logf("%s: %s", name, l)
				break
			}
		}
	}
	refused("wrongkey", ring(t, k2), "", "does not share this cluster's key", "no installed keys could decrypt the message")
	refused("nokey", nil, "", "does not share this cluster's key", "remote state is encrypted and encryption is not configured")
	refused("othercluster", ring(t, k1), "other", "another cluster.name", "EOF")
}

func TestKeyRotationWhileRunning(t *testing.T) {
	k1, k2 := key(t), key(t)
	nodes := []testNode{mustNode(t, "r0", RoleServer, ring(t, k1))}
	for i := 1; i < 4; i++ {
		nodes = append(nodes, mustNode(t, fmt.Sprintf("r%d", i), RoleBuilder, ring(t, k1), nodes[0].Addr()))
	}
	allAlive := func() bool {
		for _, n := range nodes {
			for _, m := range n.Members() {
				if m.State != StateAlive {
					return false
				}
			}
			if len(n.Members()) != len(nodes) {
				return false
			}
		}
		return true
	}
	waitFor(t, 5*time.Second, "all four joined", allAlive)
	steps := []struct {
		name string
		f    func(*Keyring) error
	}{
		{"install k2", func(k *Keyring) error { return k.Install(k2) }},
		{"use k2", func(k *Keyring) error { return k.Use(k2) }},
		{"remove k1", func(k *Keyring) error { return k.Remove(k1) }},
	}
	for _, s := range steps {
		for _, n := range nodes {
			if err := s.f(n.cfg.Keyring); err != nil {
				t.Fatalf("%s on %s: %v", s.name, n.Name(), err)
			}
			// Let gossip run between members, so a member using k2 talks
			// to members still on k1.
			time.Sleep(200 * time.Millisecond)
		}
		// Several suspicion timeouts: nobody may be declared dead.
		time.Sleep(1500 * time.Millisecond)
		if !allAlive() {
			for _, n := range nodes {
				t.Logf("%s sees %+v", n.Name(), n.Members())
			}
			t.Fatalf("after %s a member is not alive", s.name)
		}
	}
	for _, n := range nodes {
		if l := n.cfg.Keyring.List(); len(l) != 1 || l[0].Fingerprint != Fingerprint(k2) || !l[0].Primary {
			t.Fatalf("%s keyring after rotation: %+v", n.Name(), l)
		}
	}
	// The old key is now refused, the new one admitted.
	old, _ := startNode(t, "old", RoleBuilder, ring(t, k1), "")
	if k, err := old.ml.Join([]string{nodes[0].Addr()}); err == nil && k > 0 {
		t.Fatal("a member with the retired key joined")
	}
	mustNode(t, "new", RoleBuilder, ring(t, k2), nodes[0].Addr())
	waitFor(t, 5*time.Second, "a member with the new key to join", func() bool { return memberState(nodes[0].Node, "new") == "alive" })
	// Removing the primary or an unknown key is refused.
	if err := nodes[0].cfg.Keyring.Remove(k2); err == nil || !strings.Contains(err.Error(), "primary") {
		t.Fatalf("removing the primary: %v", err)
	}
	if err := nodes[0].cfg.Keyring.Use(k1); err == nil || !strings.Contains(err.Error(), "not installed") {
		t.Fatalf("using a removed key: %v", err)
	}
}

// TestRestartOutbidsOldState: a member restarted with a clock behind its
// previous run still gets its new state accepted.
func TestRestartOutbidsOldState(t *testing.T) {
	srv := mustNode(t, "srv", RoleServer, nil)
	// What the previous run said, as others still hold it: a seq far ahead.
	old := State{Node: "b", Seq: 1 << 62, Role: RoleBuilder, Mounted: []uint64{7}}
	if !srv.merge(old) {
		t.Fatal("old state not merged")
	}
	b := mustNode(t, "b", RoleBuilder, nil, srv.Addr())
	b.SetBuilderState("x", "idle", []uint64{9})
	waitFor(t, 5*time.Second, "the restarted member's state to win", func() bool {
		h, _ := srv.Holds()
		return reflect.DeepEqual(h, map[uint64][]string{9: {"b"}})
	})
}

// A builder measures its RTT to each server (memberlist's probes) and sees
// a killed server's member go dead: the two things failover ranks and
// detects by.
func TestServerRTTAndDeath(t *testing.T) {
	srv := mustNode(t, "srv", RoleServer, nil)
	b := mustNode(t, "b", RoleBuilder, nil, srv.Addr())
	waitFor(t, 10*time.Second, "an RTT to the server", func() bool {
		ss := b.Servers()
		return len(ss) == 1 && ss[0].Name == "srv" && ss[0].RTT > 0
	})
	if st, ok := b.MemberState("srv"); !ok || st != StateAlive {
		t.Fatalf("MemberState(srv) = %s %v, want alive", st, ok)
	}
	if _, ok := b.MemberState("nobody"); ok {
		t.Fatal("MemberState of an unknown member is known")
	}
	t.Logf("rtt to srv: %s", b.Servers()[0].RTT)
	srv.Close() // killed: no leave
	waitFor(t, 15*time.Second, "the server to be dead", func() bool {
		st, ok := b.MemberState("srv")
		return ok && st == StateDead && len(b.Servers()) == 0
	})
}

// A member that suspected another when it was closed logs and changes
// nothing afterwards: memberlist's suspicion timer outlives its Shutdown
// and still declares the suspect dead (in tests whose logger is the
// test's, that log line after the test ended was a panic).
func TestClosedNodeIgnoresLateEvents(t *testing.T) {
	srv := mustNode(t, "srv", RoleServer, nil)
	logs := &testenv.Buffer{}
	b, err := New(Config{Name: "b", ClusterName: "test", Bind: "127.0.0.1:0", Join: []string{srv.Addr()},
		DeadGrace: 2 * time.Second, Settle: time.Hour, Meta: Meta{Role: RoleBuilder, Version: "test"},
		Tune: func(c *memberlist.Config) {
			fast(c)
			c.SuspicionMult = 10 // a suspect is declared dead 1 s (10 probe intervals) later
		}}, slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	waitFor(t, 10*time.Second, "b to see srv alive", func() bool { st, ok := b.MemberState("srv"); return ok && st == StateAlive })
	srv.Close() // killed: no leave
	waitFor(t, 10*time.Second, "b to suspect srv", func() bool { return strings.Contains(logs.String(), "Suspect srv has failed") })
	if strings.Contains(logs.String(), "cluster member dead") {
		t.Fatal("srv declared dead before b was closed: the suspicion timeout is too short for this test")
	}
	b.Close()
	before, was := logs.String(), memberState(b, "srv")
	time.Sleep(2 * time.Second) // past the suspicion timeout
	if after := logs.String(); after != before {
		t.Errorf("b logged after Close:\n%s", strings.TrimPrefix(after, before))
	}
	if st := memberState(b, "srv"); st != was {
		t.Errorf("srv's state on b changed after Close: %s, was %s", st, was)
	}
}

// `strata members` tells a replica from the primary: both are role
// server, and the member list carries the replica mark of each, itself
// included (a new user saw two "server" rows and could not tell which one
// publishes).
func TestMembersMarkReplica(t *testing.T) {
	kr := ring(t, key(t))
	prim := mustNode(t, "primary", RoleServer, kr)
	n, err := New(Config{Name: "replica", ClusterName: "test", Bind: "127.0.0.1:0", Join: []string{prim.Addr()}, Keyring: kr,
		DeadGrace: 2 * time.Second, Settle: time.Hour, Meta: Meta{Role: RoleServer, Version: "test", Replica: true}, Tune: fast}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	replicaOf := func(ms []Member) map[string]bool {
		out := map[string]bool{}
		for _, m := range ms {
			out[m.Name] = m.Replica
		}
		return out
	}
	want := map[string]bool{"primary": false, "replica": true}
	waitFor(t, 5*time.Second, "both members on both sides", func() bool {
		return reflect.DeepEqual(replicaOf(prim.Members()), want) && reflect.DeepEqual(replicaOf(n.Members()), want)
	})
}
