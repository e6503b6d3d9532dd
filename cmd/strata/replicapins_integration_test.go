//go:build integration

package main

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// A replica keeps the generations its primary pins (README, Replicas). It
// learns the pins from each sync's list, but with gossip on it also runs
// retention whenever the builders' holds change, and the first such pass
// (the holds become known 15 s after the start) ran before any sync had
// listed the primary: a replica restarted while its primary was down (a
// site restarted at once, found by a new user) destroyed the generation the
// primary pins. Must show, with real binaries on loop btrfs: the replica
// (retention.keep 1, gossip on) serves the pinned generation 1 and the
// newest; restarted alone, it still serves generation 1 after the holds are
// known and says why it waits (`strata status`); once the primary answers
// again it keeps generation 1 for the primary's pin.
func TestReplicaKeepsPrimaryPinsBeforeFirstSync(t *testing.T) {
	s := newSite(t)
	prim := startPrimary(t, s) // generation 1
	if out, code := runStrata(t, nil, "pin", "1", "--name", "golden", "--api", prim.addr, "--token-file", prim.token); code != 0 {
		t.Fatalf("pin 1 on the primary: exit %d\n%s", code, out)
	}
	publishOne(t, s, prim.daemonProc, "second")
	g3 := publishOne(t, s, prim.daemonProc, "third")

	rmnt := filepath.Join(s.mnt, "replica") // same btrfs, own dirs
	rstate := filepath.Join(t.TempDir(), "rstate")
	cfg := prim.replicaConfig(t, replica{snaps: rmnt, state: rstate, keep: 1})
	f, err := os.OpenFile(cfg, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(f, "cluster:\n  bind: %s\n  insecure: true\n  node_name: replica\n", freePort(t))
	f.Close()
	repl := start(t, cfg, rstate, nil)
	want := []uint64{1, g3}
	l := repl.waitServes(t, want...)
	// It shows the primary's pin, which its retention keeps (before, PIN
	// said "-" on the replica).
	if g := l.Generations[0]; !g.Pinned || g.PinName != "golden" || g.PinFrom != "primary" {
		t.Errorf("replica's generation 1: pinned %v, pin_name %q, pin_from %q; want pinned, golden, primary", g.Pinned, g.PinName, g.PinFrom)
	}
	if g := l.Generations[1]; g.Pinned || g.PinFrom != "" {
		t.Errorf("replica's generation %d: pinned %v, pin_from %q; the primary does not pin it", g.ID, g.Pinned, g.PinFrom)
	}
	out, code := runStrata(t, nil, "generations", "--api", repl.api)
	if code != 0 || !regexp.MustCompile(`(?m)^1 .*\spinned\(primary\):golden\s+/gen/1\b`).MatchString(out) ||
		!regexp.MustCompile(fmt.Sprintf(`(?m)^%d .*\s-\s+/gen/%d\b`, g3, g3)).MatchString(out) {
		t.Errorf("strata generations on the replica: exit %d, want generation 1 pinned(primary):golden and %d not pinned\n%s", code, g3, out)
	}
	// An unpin on the replica removes its own pin only and says the
	// primary's stays (before, it said "unpinned generation 1" while the
	// list still showed pinned(primary), and the API answered "pinned":
	// false).
	if out, code := runStrata(t, nil, "pin", "1", "--name", "here", "--api", repl.api); code != 0 {
		t.Fatalf("pin 1 on the replica: exit %d\n%s", code, out)
	}
	if g := repl.generations(t).Generations[0]; !g.Pinned || g.PinName != "here" || g.PinFrom != "" {
		t.Errorf("replica's generation 1 pinned here: pinned %v, pin_name %q, pin_from %q; want pinned, here, \"\"", g.Pinned, g.PinName, g.PinFrom)
	}
	for range 2 { // its own pin, then none left
		out, code = runStrata(t, nil, "unpin", "1", "--api", repl.api)
		if code != 0 || !strings.Contains(out, "generation 1 is not pinned here, but its primary http://"+prim.addr+" pins it, so retention here still keeps it") {
			t.Errorf("unpin 1 on the replica (the primary pins it): exit %d, want it to say the primary's pin stays\n%s", code, out)
		}
		if g := repl.generations(t).Generations[0]; !g.Pinned || g.PinName != "golden" || g.PinFrom != "primary" {
			t.Errorf("replica's generation 1 after unpin: pinned %v, pin_name %q, pin_from %q; want pinned, golden, primary", g.Pinned, g.PinName, g.PinFrom)
		}
	}
	if out, code := runStrata(t, nil, "unpin", "1", "--api", prim.addr, "--token-file", prim.token); code != 0 || strings.TrimSpace(out) != "unpinned generation 1" {
		t.Errorf("unpin 1 on the primary: exit %d, want \"unpinned generation 1\"\n%s", code, out)
	}
	if out, code := runStrata(t, nil, "pin", "1", "--name", "golden", "--api", prim.addr, "--token-file", prim.token); code != 0 {
		t.Fatalf("pin 1 on the primary again: exit %d\n%s", code, out)
	}
	repl.stop(t)
	prim.stop(t)

	repl = start(t, cfg, rstate, nil)
	// The holds are known 15 s after the start (no cluster.join), and a
	// pass runs within a second of that.
	for end := time.Now().Add(18 * time.Second); time.Now().Before(end); time.Sleep(500 * time.Millisecond) {
		if got := ids(repl.generations(t).Generations); !slices.Equal(got, want) {
			t.Fatalf("replica restarted while its primary is down serves %v, want %v (generation 1 is pinned on the primary)\n%s", got, want, repl.logs)
		}
	}
	out, code = runStrata(t, nil, "status", "--api", repl.api)
	if code != 0 || !strings.Contains(out, "generation 1: the primary's pins not known yet") {
		t.Errorf("replica's status while its primary is down: exit %d, want a retention wait for the primary's pins\n%s", code, out)
	}

	prim.restart(t, s)
	repl.waitLog(t, "replica sync works again")
	if got := ids(repl.generations(t).Generations); !slices.Equal(got, want) {
		t.Errorf("replica after the primary came back serves %v, want %v", got, want)
	}
	out, _ = runStrata(t, nil, "status", "--api", repl.api)
	if strings.Contains(out, "pins not known") {
		t.Errorf("replica's status after a sync still waits for the primary's pins:\n%s", out)
	}
	repl.stop(t)
	prim.stop(t)
}

// A replica whose replica.token_file holds another token than the
// primary's says so at its first sync, while the primary has nothing new
// (before, nothing showed until the primary's next publish: listing needs
// no token). The generations it has stay served; with the right token it
// syncs again.
func TestReplicaWrongTokenShowsAtOnce(t *testing.T) {
	s := newSite(t)
	prim := startPrimary(t, s) // generation 1
	rstate := filepath.Join(t.TempDir(), "rstate")
	cfg := prim.replicaConfig(t, replica{snaps: filepath.Join(s.mnt, "replica"), state: rstate})
	repl := start(t, cfg, rstate, nil)
	repl.waitServes(t, 1)
	repl.stop(t)

	wrong := filepath.Join(t.TempDir(), "wrong")
	if err := os.WriteFile(wrong, []byte("not-the-primary-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	wcfg := prim.replicaConfig(t, replica{snaps: filepath.Join(s.mnt, "replica"), state: rstate, token: wrong})
	// --check-config asks the primary: a WARNING (the start goes ahead).
	out, code := runStrata(t, nil, "server", "--config", wcfg, "--check-config")
	if code != 0 || !strings.Contains(out, "WARNING: primary http://"+prim.addr+" refuses the token in replica.token_file "+wrong) || !strings.Contains(out, "configuration: ok") {
		t.Errorf("--check-config with a wrong token: exit %d\n%s", code, out)
	}
	out, code = runStrata(t, nil, "server", "--config", cfg, "--check-config")
	if code != 0 || !strings.Contains(out, "primary http://"+prim.addr+" accepts the token in replica.token_file") || strings.Contains(out, "WARNING") {
		t.Errorf("--check-config with the right token: exit %d\n%s", code, out)
	}
	repl = start(t, wcfg, rstate, nil)
	repl.waitLog(t, "check replica.token_file")
	out, code = runStrata(t, nil, "status", "--api", repl.api)
	if code != 0 || !strings.Contains(out, "last_error:") || !strings.Contains(out, "check replica.token_file") {
		t.Errorf("status of a replica with a wrong token: exit %d\n%s", code, out)
	}
	if got := ids(repl.generations(t).Generations); !slices.Equal(got, []uint64{1}) {
		t.Errorf("replica with a wrong token serves %v, want [1]", got)
	}
	repl.stop(t)
	repl = start(t, cfg, rstate, nil)
	g2 := publishOne(t, s, prim.daemonProc, "second")
	repl.waitServes(t, 1, g2)
	repl.stop(t)
	prim.stop(t)
}
