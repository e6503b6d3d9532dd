//go:build integration

package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/testenv"
)

// The real `strata server` as primary and as replica (replica.of,
// replica.token_file): the replica starts only with the primary's token,
// receives what the primary publishes on its own (replica.interval), shows
// origin and arrival in `strata generations --json`, refuses `strata
// publish`, and after a kill -9 and restart serves the same generations and
// catches up.
func TestReplicaDaemon(t *testing.T) {
	s := newSite(t)
	prim := startPrimary(t, s) // with the publish at start
	papi := prim.addr
	publishOne(t, s, prim.daemonProc, "first")

	rmnt := testenv.LoopBtrfs(t, "1G")
	rstate := filepath.Join(t.TempDir(), "rstate")
	missing := replica{snaps: filepath.Join(rmnt, "gens"), state: rstate, token: filepath.Join(t.TempDir(), "missing")}
	// No token file: the replica does not start.
	out := refused(t, prim.replicaConfig(t, missing))
	if !strings.Contains(out, "replica.token_file") {
		t.Errorf("replica without a token file: %s", out)
	}
	cfg := prim.replicaConfig(t, replica{snaps: missing.snaps, state: rstate})
	repl := start(t, cfg, rstate, nil)
	// waitGens waits until the replica serves what the primary serves.
	waitGens := func(d *daemonProc) api.GenerationList {
		t.Helper()
		return d.waitServes(t, ids(prim.generations(t).Generations)...)
	}
	waitGens(repl)
	g2 := publishOne(t, s, prim.daemonProc, "second")
	if l := waitGens(repl); len(l.Generations) < 2 || l.Generations[len(l.Generations)-1].ID != g2 {
		t.Fatalf("replica serves %v, want up to %d", ids(l.Generations), g2)
	}

	jsonOut, code := runStrata(t, nil, "generations", "--json", "--api", repl.api)
	var list api.GenerationList
	if code != 0 || json.Unmarshal([]byte(jsonOut), &list) != nil {
		t.Fatalf("strata generations --json on the replica: exit %d\n%s", code, jsonOut)
	}
	for _, g := range list.Generations {
		if g.Origin != "http://"+papi || g.Arrived == nil {
			t.Errorf("generation %d: origin %q, arrived %v", g.ID, g.Origin, g.Arrived)
		}
		pg, _ := prim.client().Generation(t.Context(), g.ID)
		if pg.RegistrationSHA256 != g.RegistrationSHA256 || pg.Paths != g.Paths {
			t.Errorf("generation %d on the replica %+v, on the primary %+v", g.ID, g, pg)
		}
	}
	if out, code := runStrata(t, nil, "generations", "--api", repl.api); code != 0 || !strings.Contains(out, "replica of http://"+papi) || !strings.Contains(out, "ARRIVED") {
		t.Errorf("strata generations on the replica: exit %d\n%s", code, out)
	}
	if out, code := runStrata(t, nil, "publish", "--api", repl.api); code == 0 || !strings.Contains(out, "replica") {
		t.Errorf("strata publish on the replica: exit %d\n%s", code, out)
	}

	// kill -9 the replica; the primary publishes; the restarted replica
	// serves what it had and catches up.
	repl.cmd.Process.Kill()
	<-repl.done
	g3 := publishOne(t, s, prim.daemonProc, "third")
	repl = start(t, cfg, rstate, nil)
	if l := waitGens(repl); l.Generations[len(l.Generations)-1].ID != g3 {
		t.Fatalf("restarted replica serves %v, want up to %d", ids(l.Generations), g3)
	}
	repl.waitLog(t, fmt.Sprintf("generation=%d from=%d kind=incremental", g3, g2))
	repl.stop(t)
	prim.stop(t)

	// --check-config of a replica: reports what it would serve; a missing
	// token file is an error.
	out, code = runStrata(t, nil, "server", "--config", cfg, "--check-config")
	if code != 0 || !strings.Contains(out, "replica of http://"+papi) || !strings.Contains(out, fmt.Sprintf("would serve generations")) ||
		!strings.HasSuffix(strings.TrimSpace(out), "configuration: ok") || strings.Contains(out, "ERROR") ||
		strings.Contains(out, "store identity") || strings.Contains(out, "next generation id") {
		t.Errorf("--check-config of the replica: exit %d, want 0, ok, and no store identity or next id\n%s", code, out)
	}
	out, code = runStrata(t, nil, "server", "--config", prim.replicaConfig(t, missing), "--check-config")
	if code == 0 || !strings.Contains(out, "replica.token_file") {
		t.Errorf("--check-config of a replica without its token: exit %d\n%s", code, out)
	}
}

// A replica killed (-9) after a stream arrived in full but before the
// generation went live finds the received snapshot at its next start: the
// record of its own receive (state_dir/replica-receiving) names it, so the
// first sync makes it live after the registration check against the
// primary's manifest instead of failing forever with "snapshot exists". A
// snapshot received by hand (no record) is kept, reported, and no stream is
// asked for it, until an operator removes it.
func TestReplicaKilledBeforeLive(t *testing.T) {
	s := newSite(t)
	prim := startPrimary(t, s)
	g1 := prim.generations(t).Generations[0].ID

	rmnt := testenv.LoopBtrfs(t, "1G")
	rsnaps := filepath.Join(rmnt, "gens")
	rstate := filepath.Join(t.TempDir(), "rstate")
	cfg := prim.replicaConfig(t, replica{snaps: rsnaps, state: rstate})

	repl := start(t, cfg, rstate, []string{"STRATA_DEBUG_REPLICA_PAUSE=received"})
	repl.waitLog(t, "replica receive paused")
	repl.cmd.Process.Kill()
	<-repl.done
	if _, err := os.Stat(filepath.Join(rsnaps, fmt.Sprintf("strata-%d", g1))); err != nil {
		t.Fatalf("the received snapshot is not there after the kill: %v", err)
	}
	if l := len(manifests(t, rstate)); l != 0 {
		t.Fatalf("the killed replica has %d manifests, want none (never live)", l)
	}
	out, code := runStrata(t, nil, "server", "--config", cfg, "--check-config")
	if code != 0 || !strings.Contains(out, "own unfinished receive") {
		t.Errorf("--check-config after the kill: exit %d\n%s", code, out)
	}

	repl = start(t, cfg, rstate, nil)
	repl.waitLog(t, "adopted this replica's own unfinished receive")
	repl.waitServes(t, g1)
	pg, _ := prim.client().Generation(t.Context(), g1)
	rg, _ := repl.client().Generation(t.Context(), g1)
	if pg.RegistrationSHA256 == "" || pg.RegistrationSHA256 != rg.RegistrationSHA256 {
		t.Errorf("registration sha256: primary %q, replica %q", pg.RegistrationSHA256, rg.RegistrationSHA256)
	}
	if _, err := os.Stat(filepath.Join(rstate, "replica-receiving")); err == nil {
		t.Error("the receive record is still there after the generation went live")
	}
	g2 := publishOne(t, s, prim.daemonProc, "second")
	repl.waitServes(t, g1, g2)
	repl.stop(t)

	// By hand: generation 3 received without the replica knowing.
	g3 := publishOne(t, s, prim.daemonProc, "third")
	send := fmt.Sprintf("btrfs send -q -p %s/strata-%d %s/strata-%d | btrfs receive -e %s",
		s.snaps, g2, s.snaps, g3, rsnaps)
	if out, err := exec.Command("sh", "-c", send).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", send, err, out)
	}
	out, code = runStrata(t, nil, "server", "--config", cfg, "--check-config")
	if !strings.Contains(out, fmt.Sprintf("snapshot strata-%d is kept but not served", g3)) {
		t.Errorf("--check-config with a snapshot received by hand: exit %d\n%s", code, out)
	}
	repl = start(t, cfg, rstate, nil)
	repl.waitLog(t, fmt.Sprintf("snapshot strata-%d is here but not live, and it is not this replica's own unfinished receive", g3))
	time.Sleep(2 * time.Second) // two more syncs
	if strings.Contains(repl.logs.String(), "incremental stream failed") || strings.Contains(repl.logs.String(), "snapshot exists") {
		t.Errorf("the replica asked the primary for streams it cannot receive:\n%s", repl.logs)
	}
	if _, err := os.Stat(filepath.Join(rsnaps, fmt.Sprintf("strata-%d", g3))); err != nil {
		t.Fatalf("the snapshot received by hand is gone: %v", err)
	}
	repl.waitServes(t, g1, g2)
	// The operator removes it: the replica catches up.
	testenv.Run(t, "btrfs", "subvolume", "delete", filepath.Join(rsnaps, fmt.Sprintf("strata-%d", g3)))
	repl.waitServes(t, g1, g2, g3)
	repl.stop(t)
	prim.stop(t)
}
