//go:build integration

package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/cluster"
	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
)

// netnsLab is a server network namespace with a bridge (10.212.0.1/24) and
// builder namespaces linked to it by veth pairs; names are unique per run.
type netnsLab struct {
	server   string
	builders []string
}

func newNetnsLab(t *testing.T, builders int) *netnsLab {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireCommands(t, "ip", "nsenter")
	b := make([]byte, 3)
	rand.Read(b)
	tag := hex.EncodeToString(b)
	l := &netnsLab{server: "strata12s-" + tag}
	run := func(args ...string) { testenv.Run(t, "ip", args...) }
	run("netns", "add", l.server)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", l.server).Run() })
	run("-n", l.server, "link", "set", "lo", "up")
	run("-n", l.server, "link", "add", "br0", "type", "bridge")
	run("-n", l.server, "addr", "add", "10.212.0.1/24", "dev", "br0")
	run("-n", l.server, "link", "set", "br0", "up")
	for i := range builders {
		ns := fmt.Sprintf("strata12b%d-%s", i+1, tag)
		run("netns", "add", ns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
		run("-n", ns, "link", "set", "lo", "up")
		run("-n", l.server, "link", "add", fmt.Sprintf("vs%d", i+1), "type", "veth", "peer", "name", "vb", "netns", ns)
		run("-n", l.server, "link", "set", fmt.Sprintf("vs%d", i+1), "master", "br0", "up")
		run("-n", ns, "addr", "add", fmt.Sprintf("10.212.0.%d/24", 11+i), "dev", "vb")
		run("-n", ns, "link", "set", "vb", "up")
		l.builders = append(l.builders, ns)
	}
	return l
}

// builderLink sets builder i's link (its veth end on the server's bridge).
func (l *netnsLab) builderLink(t *testing.T, i int, up bool) {
	state := map[bool]string{true: "up", false: "down"}[up]
	testenv.Run(t, "ip", "-n", l.server, "link", "set", fmt.Sprintf("vs%d", i+1), state)
}

// in returns a command running name in network namespace ns (only the
// network namespace: mounts are shared with the test).
func in(ns string, name string, args ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"--net=/run/netns/" + ns, name}, args...)...)
}

func writeKeyring(t *testing.T, keys ...string) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "cluster.keys")
	if err := os.WriteFile(f, []byte(strings.Join(keys, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

func newKey() string {
	k := make([]byte, 32)
	rand.Read(k)
	return base64.StdEncoding.EncodeToString(k)
}

// TestClusterRetention: a real `strata server` on a loop btrfs store, in its
// own network namespace, gossiping (encrypted) with builder members in
// three other namespaces, with retention.keep 1 and cluster.dead_grace 15s:
//   - before gossip settles, retention destroys nothing and says why;
//   - each builder's held generation outlives keep; generations and status
//     name the holders;
//   - SIGTERM: the builder leaves, its generation is destroyed at once;
//   - kill -9: dead, its generation kept for dead_grace, then destroyed;
//   - its namespace link down past the suspicion timeout: the same; when the
//     link comes back the builder re-joins.
func TestClusterRetention(t *testing.T) {
	lab := newNetnsLab(t, 3)
	mnt := testenv.LoopBtrfs(t, "1G")
	testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(mnt, "nix"))
	st := nixtest.New(t, mnt)
	st.Fill(t)
	snaps := filepath.Join(mnt, "snaps")
	state := filepath.Join(t.TempDir(), "state")
	keys := writeKeyring(t, newKey())
	cfg := filepath.Join(t.TempDir(), "server.yaml")
	os.WriteFile(cfg, []byte(`store:
  root: `+st.NixRoot()+`
snapshot:
  snapshot_dir: `+snaps+`
state_dir: `+state+`
publish:
  interval: 0s
retention:
  keep: 1
api:
  listen: ""
nfs:
  listen: 127.0.0.1:0
cluster:
  bind: 10.212.0.1:7946
  name: strata-test
  node_name: central
  keyring_file: `+keys+`
  dead_grace: 15s
`), 0o644)
	sock, ch := testenv.NotifySocket(t)
	srv := in(lab.server, os.Args[0], "server", "--config", cfg)
	srv.Env = append(os.Environ(), "STRATA_TEST_RUN_MAIN=1", "NOTIFY_SOCKET="+sock)
	srv.Stderr = os.Stderr
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	started := time.Now()
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
	waitFor(t, ch, "STATUS=serving generation 1")
	apiAddr := "unix:" + filepath.Join(state, "api.sock")
	c := api.NewClient(apiAddr, "")
	ctx := context.Background()

	publish := func(name string) uint64 {
		t.Helper()
		st.AddText(t, name, name+"\n")
		r, err := c.Publish(ctx)
		if err != nil || !r.Published {
			t.Fatalf("publish %s: %+v %v", name, r, err)
		}
		return r.Generation.ID
	}
	live := func() map[uint64][]string {
		t.Helper()
		l, err := c.Generations(ctx)
		if err != nil {
			t.Fatal(err)
		}
		out := map[uint64][]string{}
		for _, g := range l.Generations {
			out[g.ID] = l.Holders[g.ID]
		}
		return out
	}
	hasSnapshot := func(id uint64) bool {
		_, err := os.Stat(filepath.Join(snaps, fmt.Sprintf("strata-%d", id)))
		return err == nil
	}
	members := func() map[string]cluster.Member {
		t.Helper()
		var ms []cluster.Member
		if err := c.Do(ctx, http.MethodGet, "/v1/members", &ms); err != nil {
			t.Fatal(err)
		}
		out := map[string]cluster.Member{}
		for _, m := range ms {
			out[m.Name] = m
		}
		return out
	}
	poll := func(d time.Duration, what string, cond func() bool) {
		t.Helper()
		end := time.Now().Add(d)
		for !cond() {
			if time.Now().After(end) {
				t.Fatalf("timed out after %s waiting for %s", d, what)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}

	// Before gossip settles (15 s after start), nothing is destroyed.
	g2, g3 := publish("two"), publish("three")
	if l := live(); len(l) != 3 {
		t.Fatalf("retention destroyed generations before gossip settled: live %v", l)
	}
	var status map[string]any
	c.Do(ctx, http.MethodGet, "/v1/status", &status)
	if b, _ := json.Marshal(status["retention_waits"]); !strings.Contains(string(b), "not known yet") {
		t.Fatalf("status does not say retention waits for gossip: %s", b)
	}

	// Three builders, each holding one generation.
	var procs []*exec.Cmd
	for i, hold := range []uint64{1, g2, g3} {
		p := in(lab.builders[i], os.Args[0])
		p.Env = append(os.Environ(), gossipMemberEnv+"=b"+fmt.Sprint(i+1), "STRATA_TEST_GOSSIP_BIND="+fmt.Sprintf("10.212.0.%d:7946", 11+i),
			"STRATA_TEST_GOSSIP_JOIN=10.212.0.1:7946", "STRATA_TEST_GOSSIP_KEYS="+keys, "STRATA_TEST_GOSSIP_HOLD="+fmt.Sprint(hold))
		p.Stderr = os.Stderr
		if err := p.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Process.Kill(); p.Wait() })
		procs = append(procs, p)
	}
	poll(20*time.Second, "three builders alive at the server", func() bool {
		m := members()
		return m["b1"].State == cluster.StateAlive && m["b2"].State == cluster.StateAlive && m["b3"].State == cluster.StateAlive
	})
	g4 := publish("four")
	time.Sleep(time.Until(started.Add(17 * time.Second)))
	want := map[uint64][]string{1: {"b1"}, g2: {"b2"}, g3: {"b3"}, g4: nil}
	poll(5*time.Second, "holders of every generation", func() bool { return fmt.Sprint(live()) == fmt.Sprint(want) })
	out, code := runStrata(t, nil, "status", "--api", apiAddr)
	if code != 0 || !strings.Contains(out, "retention waits:") || !strings.Contains(out, "[b2]") {
		t.Fatalf("status: exit %d\n%s", code, out)
	}
	t.Logf("strata status:\n%s", out)
	out, _ = runStrata(t, nil, "generations", "--api", apiAddr)
	t.Logf("strata generations:\n%s", out)

	// SIGTERM: leaves, released at once.
	procs[0].Process.Signal(syscall.SIGTERM)
	if err := procs[0].Wait(); err != nil {
		t.Fatalf("builder b1 after SIGTERM: %v", err)
	}
	left := time.Now()
	poll(5*time.Second, "generation 1 destroyed after b1 left", func() bool { _, ok := live()[1]; return !ok })
	t.Logf("b1 left: generation 1 destroyed %s later", time.Since(left).Round(10*time.Millisecond))
	if hasSnapshot(1) {
		t.Fatal("snapshot strata-1 survives its generation")
	}
	if m := members()["b1"]; m.State != cluster.StateLeft || m.Holds {
		t.Fatalf("b1 after leaving: %+v", m)
	}

	// kill -9 and a partition: dead, kept for dead_grace, then destroyed.
	deadThenGone := func(name string, gen uint64, cut func()) {
		t.Helper()
		cut()
		cutAt := time.Now()
		poll(30*time.Second, name+" dead at the server", func() bool { return members()[name].State == cluster.StateDead })
		dead := time.Now()
		t.Logf("%s declared dead %s after the cut", name, dead.Sub(cutAt).Round(10*time.Millisecond))
		time.Sleep(3 * time.Second)
		if h, ok := live()[gen]; !ok || !hasSnapshot(gen) || !slices.Equal(h, []string{name}) {
			t.Fatalf("generation %d of dead %s not kept within dead_grace (live %v, holders %v)", gen, name, ok, h)
		}
		poll(30*time.Second, fmt.Sprintf("generation %d destroyed after dead_grace", gen), func() bool { _, ok := live()[gen]; return !ok })
		t.Logf("%s: generation %d destroyed %s after death (dead_grace 15s)", name, gen, time.Since(dead).Round(10*time.Millisecond))
		if hasSnapshot(gen) {
			t.Fatalf("snapshot strata-%d survives its generation", gen)
		}
	}
	deadThenGone("b2", g2, func() { procs[1].Process.Kill(); procs[1].Wait() })
	deadThenGone("b3", g3, func() { lab.builderLink(t, 2, false) })
	out, _ = runStrata(t, nil, "members", "--api", apiAddr)
	t.Logf("strata members:\n%s", out)
	for _, want := range []string{"b1  ", "left", "dead", "central (self)"} {
		if !strings.Contains(out, want) {
			t.Fatalf("strata members lacks %q", want)
		}
	}
	if out, code := runStrata(t, nil, "cluster", "keys", "--api", apiAddr); code != 0 || !strings.HasSuffix(strings.TrimSpace(out), "primary") {
		t.Fatalf("strata cluster keys: exit %d %q", code, out)
	}
	lab.builderLink(t, 2, true)
	poll(30*time.Second, "b3 to re-join after the link came back", func() bool { return members()["b3"].State == cluster.StateAlive })
	if l := live(); len(l) != 1 || l[g4] != nil {
		t.Fatalf("live generations at the end: %v, want only %d", l, g4)
	}
}
