//go:build integration

package main

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// Review 18 #1: a replica given the primary's snapshot.snapshot_dir (its
// own state_dir) adopted the primary's live generations and its retention
// destroyed the primary's strata-1. Must show, with the real binary on a
// loop btrfs: the replica is refused while the primary runs (the dir's
// lock) and after it stopped (the owner record), by --check-config too,
// naming the dir, the owner and the fix, also with --new-handle-key; the
// refused start creates no state_dir. A dir of an older strata (no owner
// record) is not claimed by the replica; forced with --claim-snapshot-dir
// the replica still adopts none of the primary's snapshots. The primary
// takes the dir back with --claim-snapshot-dir, without the record claims
// it on its own, and with its state_dir wiped at the same path takes its
// identity back. No snapshot is ever destroyed, nothing the primary
// serves is lost.
func TestSnapshotDirOwnedByOneServer(t *testing.T) {
	s := newSite(t)
	prim := startPrimary(t, s)
	publishOne(t, s, prim.daemonProc, "second")
	want := []uint64{1, 2}
	if got := ids(prim.generations(t).Generations); !slices.Equal(got, want) {
		t.Fatalf("primary serves %v, want %v", got, want)
	}
	snaps := s.snapshots(t)
	unchanged := func(when string) {
		t.Helper()
		if got := s.snapshots(t); !slices.Equal(got, snaps) {
			t.Fatalf("%s: snapshots %v, want %v", when, got, snaps)
		}
	}

	rstate := filepath.Join(t.TempDir(), "rstate")
	rcfg := prim.replicaConfig(t, replica{snaps: s.snaps, state: rstate, keep: 1})
	has := func(what, out string, wants ...string) {
		t.Helper()
		for _, w := range wants {
			if !strings.Contains(out, w) {
				t.Errorf("%s lacks %q:\n%s", what, w, out)
			}
		}
	}

	// The primary runs: its lock stops the replica.
	out, code := refusedExit(t, rcfg, "--new-handle-key")
	if code != 2 {
		t.Errorf("replica start while the primary runs exited %d, want 2 (a configuration error)", code)
	}
	has("replica start while the primary runs", out, "snapshot.snapshot_dir "+s.snaps+" is in use by a running server", "a primary with state_dir "+s.state, "give this server its own snapshot dir")
	prim.stop(t)

	// Stopped: the owner record stops it, and check-config says so first.
	out, code = runStrata(t, nil, "server", "--config", rcfg, "--check-config")
	if code != 1 || !strings.Contains(out, "\nconfiguration: refused\n") {
		t.Errorf("check-config of the replica: exit %d, want 1 and refused\n%s", code, out)
	}
	has("check-config of the replica", out, "snapshot.snapshot_dir "+s.snaps+" is owned by server", "a primary with state_dir "+s.state,
		filepath.Join(s.snaps, "strata.owner.json"), "Give this server its own snapshot.snapshot_dir", "--claim-snapshot-dir",
		"if they are another server's, do neither") // the handle-key hint no longer leads here alone
	for _, args := range [][]string{nil, {"--new-handle-key"}} {
		out, code = refusedExit(t, rcfg, args...)
		if code != 2 {
			t.Errorf("replica start %v on the primary's dir exited %d, want 2 (a configuration error)", args, code)
		}
		has(fmt.Sprintf("replica start %v", args), out, "is owned by server", s.snaps, "--claim-snapshot-dir")
	}
	if _, err := os.Stat(rstate); !os.IsNotExist(err) {
		t.Errorf("refused starts created state_dir %s: %v", rstate, err)
	}
	unchanged("after the refused replica starts")

	// A dir of an older strata: no owner record. The replica cannot
	// account for the primary's live snapshots: refused.
	if err := os.Remove(filepath.Join(s.snaps, "strata.owner.json")); err != nil {
		t.Fatal(err)
	}
	out = refused(t, rcfg, "--new-handle-key")
	has("replica start on an old dir", out, "has no owner record", "strata-1 (labelled live by the server that published it, but this replica did not receive it", "strata-2", "--claim-snapshot-dir")

	// Forced: it claims the dir but adopts none of the primary's snapshots
	// (no origin label: it did not receive them), so retention (keep 1)
	// has nothing of them to destroy, this start or the next.
	repl := start(t, rcfg, rstate, nil, "--new-handle-key", "--claim-snapshot-dir")
	if got := ids(repl.generations(t).Generations); len(got) != 0 {
		t.Errorf("forced replica serves %v, want none of the primary's", got)
	}
	st, code := runStrata(t, nil, "status", "--api", repl.api)
	has("forced replica's status", st, "did not receive it")
	repl.stop(t)
	repl = start(t, rcfg, rstate, nil)
	if got := ids(repl.generations(t).Generations); len(got) != 0 {
		t.Errorf("restarted replica serves %v, want none", got)
	}
	repl.stop(t)
	unchanged("after the forced replica ran twice with keep 1")

	// Now the replica owns it: the primary is refused, then takes it back.
	out = refused(t, prim.cfg)
	has("primary start on the replica's dir", out, "is owned by server", "a replica with state_dir "+rstate, "--claim-snapshot-dir")
	prim.restart(t, s, "--claim-snapshot-dir")
	if got := ids(prim.generations(t).Generations); !slices.Equal(got, want) {
		t.Errorf("primary after --claim-snapshot-dir serves %v, want %v", got, want)
	}
	prim.stop(t)
	// Without a record the primary claims the dir on its own: its state
	// dir accounts for every snapshot it serves.
	if err := os.Remove(filepath.Join(s.snaps, "strata.owner.json")); err != nil {
		t.Fatal(err)
	}
	prim.restart(t, s)
	prim.waitLog(t, "claiming snapshot dir")
	if got := ids(prim.generations(t).Generations); !slices.Equal(got, want) {
		t.Errorf("primary on its old dir serves %v, want %v", got, want)
	}
	prim.stop(t)
	// A state_dir wiped at the same path (its key kept, as from a backup):
	// the record names this host and state_dir, so the start takes that
	// identity back and rebuilds the generations from their labels.
	if err := os.Remove(filepath.Join(s.state, "server-id")); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(s.state, "generations")); err != nil {
		t.Fatal(err)
	}
	prim.restart(t, s)
	prim.waitLog(t, "this start takes that identity back")
	if got := ids(prim.generations(t).Generations); !slices.Equal(got, want) {
		t.Errorf("primary after its state_dir was wiped serves %v, want %v", got, want)
	}
	prim.stop(t)
	// Wiped with its key: the refusal names the key, and since the owner
	// record proves the snapshots are this server's, it does not add
	// "if they are another server's, do neither" (a new user found that
	// right after the owner line said they are its own).
	key, err := os.ReadFile(filepath.Join(s.state, "nfs-handle.key"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(s.state); err != nil {
		t.Fatal(err)
	}
	out, code = runStrata(t, nil, "server", "--config", prim.cfg, "--check-config")
	if code != 1 || !strings.Contains(out, "this start takes that identity back") || !strings.Contains(out, "the snapshots are this server's own, its state_dir was lost") || strings.Contains(out, "do neither") {
		t.Errorf("check-config of a wiped state_dir without its key: exit %d\n%s", code, out)
	}
	if err := os.MkdirAll(s.state, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(s.state, "nfs-handle.key"), key, 0o600); err != nil {
		t.Fatal(err)
	}
	prim.restart(t, s)
	if got := ids(prim.generations(t).Generations); !slices.Equal(got, want) {
		t.Errorf("primary after its key was put back serves %v, want %v", got, want)
	}
	prim.stop(t)
	unchanged("at the end")
}

// Review 18 #7: a replica whose replica.of is its own API, or another
// replica, ran for ever receiving nothing. Must show: both starts are
// refused (the primary they name answers: the replica's own API is up by
// then) with an error naming the URL and what it is, while a replica of
// the real primary starts and serves its generations.
func TestReplicaOfItselfOrOfAReplicaRefused(t *testing.T) {
	s := newSite(t)
	prim := startPrimary(t, s)
	papi := prim.addr

	rmnt := filepath.Join(s.mnt, "replicas") // same btrfs, own dirs
	dir := t.TempDir()
	replicaCfg := func(name, of, listen string) (string, string) {
		state := filepath.Join(dir, name)
		return prim.replicaConfig(t, replica{of: of, snaps: filepath.Join(rmnt, name), state: state, listen: listen}), state
	}
	aapi := freePort(t)
	acfg, astate := replicaCfg("a", papi, aapi)
	a := start(t, acfg, astate, nil)
	a.waitLog(t, "received generation is live")

	self := freePort(t)
	bcfg, _ := replicaCfg("b", self, self)
	out, code := refusedExit(t, bcfg)
	if code != 2 {
		t.Errorf("replica of itself exited %d, want 2 (a configuration error: systemd does not restart into it)", code)
	}
	for _, w := range []string{"replica.of http://" + self + " is this server itself", "set replica.of to the primary's API URL"} {
		if !strings.Contains(out, w) {
			t.Errorf("replica of itself: refusal lacks %q:\n%s", w, out)
		}
	}
	ccfg, _ := replicaCfg("c", aapi, freePort(t))
	// --check-config asks replica.of and refuses as the start does.
	if out, code := runStrata(t, nil, "server", "--config", ccfg, "--check-config"); code != 1 ||
		!strings.Contains(out, "ERROR: replica.of http://"+aapi+" is itself a replica (of http://"+papi+")") {
		t.Errorf("--check-config of a replica of a replica: exit %d, want 1 and the ERROR\n%s", code, out)
	}
	out, code = refusedExit(t, ccfg)
	if code != 2 {
		t.Errorf("replica of a replica exited %d, want 2", code)
	}
	for _, w := range []string{"replica.of http://" + aapi + " is itself a replica (of http://" + papi + ")"} {
		if !strings.Contains(out, w) {
			t.Errorf("replica of a replica: refusal lacks %q:\n%s", w, out)
		}
	}
	a.stop(t)
	prim.stop(t)
}
