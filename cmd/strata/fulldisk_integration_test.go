//go:build integration

package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/testenv"
)

// A replica (the real `strata server` with replica.of) whose btrfs has less
// room than the primary's next generation needs: its `btrfs receive` fails
// with ENOSPC, and the replica logs an error that names its snapshot dir and
// "No space left on device"; the half-received subvolume is deleted; the
// generation it already had stays served, unchanged (API, registration,
// file handles held by an NFS client read the same bytes), and its state
// dir gains no manifest. Once space is freed on the replica's filesystem,
// the running replica receives the generation on its own at its next
// replica.interval, with no restart.
func TestReplicaReceiveOnFullDisk(t *testing.T) {
	s := newSite(t)
	prim := startPrimary(t, s)
	g1 := prim.generations(t).Generations[0].ID

	// The replica's filesystem: 300 MB of btrfs, all but 60 MB of its data
	// space taken by a file that is not the replica's.
	rmnt := testenv.LoopBtrfs(t, "300M")
	rsnaps := filepath.Join(rmnt, "gens")
	rstate := filepath.Join(t.TempDir(), "rstate")
	rcfg := prim.replicaConfig(t, replica{snaps: rsnaps, state: rstate, interval: "2s"})
	repl := start(t, rcfg, rstate, nil)
	repl.waitServes(t, g1)
	file := s.noteFile(t)
	handles := holdHandles(t, repl.nfs, []uint64{g1}, file)
	sums := regSums(t, repl, []uint64{g1})
	free := testenv.Fill(t, rmnt, 60<<20)

	// Generation 2 adds a 100 MB file: more than the replica has room for.
	big := filepath.Join(t.TempDir(), "big")
	block := bytes.Repeat([]byte("strata full-disk test block\n"), 1<<15)
	f, err := os.Create(big)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 100<<20; i += len(block) {
		block[0] = byte(i >> 20) // no two blocks alike
		f.Write(block)
	}
	f.Close()
	s.store.Run(t, "nix-store", "--add", big)
	g2 := publishOne(t, s, prim.daemonProc, "second")

	repl.waitLog(t, "replica sync failed")
	logs := repl.logs.String()
	var failed string
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, "replica sync failed") {
			failed = l
			break
		}
	}
	t.Logf("the replica says: %s", failed)
	if !strings.Contains(failed, "No space left on device") || !strings.Contains(failed, rsnaps) {
		t.Errorf("the replica's error does not name its snapshot dir %s and ENOSPC: %s", rsnaps, failed)
	}
	// Right after a failed sync (the next is replica.interval away): the
	// half-received subvolume is gone, and nothing went live.
	var names []string
	ents, _ := os.ReadDir(rsnaps)
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".labels") && !strings.HasPrefix(e.Name(), "strata.owner.") {
			names = append(names, e.Name())
		}
	}
	if !slices.Equal(names, []string{fmt.Sprintf("strata-%d", g1)}) {
		t.Errorf("replica snapshot dir after the failed receive: %v, want only strata-%d", names, g1)
	}
	// A full disk is not cured by another base or a whole stream: the
	// replica asks for nothing else until the next sync.
	if strings.Contains(logs, "trying an older base or a whole stream") || !strings.Contains(failed, fmt.Sprintf("from %d", g1)) {
		t.Errorf("after ENOSPC on the incremental stream from %d the replica asked for another stream:\n%s", g1, logs)
	}
	if got := manifests(t, rstate); !slices.Equal(got, []string{fmt.Sprint(g1)}) {
		t.Errorf("replica state dir manifests %v, want only %d", got, g1)
	}
	if got := ids(repl.generations(t).Generations); !slices.Equal(got, []uint64{g1}) {
		t.Errorf("replica serves %v, want [%d]", got, g1)
	}
	if got := regSums(t, repl, []uint64{g1}); got[g1] != sums[g1] {
		t.Errorf("generation %d's registration changed on the replica", g1)
	}
	if st1, st2, data := resolve(t, repl.nfs, handles[g1]); st1 != 0 || st2 != 0 || !bytes.Equal(data, handles[g1].data) {
		t.Errorf("held handles of generation %d on the full replica: GETATTR %d, READ %d, %q (want %q)", g1, st1, st2, data, handles[g1].data)
	}
	if out, code := runStrata(t, nil, "status", "--api", repl.api); code != 0 || !strings.Contains(out, "last_error:") ||
		!strings.Contains(out, "No space left on device") || !strings.Contains(out, rsnaps) {
		t.Errorf("strata status on the full replica does not say why it is behind: exit %d\n%s", code, out)
	}

	// The replica keeps trying every replica.interval while the disk is
	// full: the problem is logged once (btrfs names another file each
	// time, it is still one problem), the half-received snapshot's
	// removal once, and on the primary the failed stream once.
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(metrics(t, repl), `strata_replica_syncs_total{result="error"} 4`) {
		if time.Now().After(deadline) {
			t.Fatalf("the replica did not retry 4 times within 60 s:\n%s", repl.logs)
		}
		time.Sleep(200 * time.Millisecond)
	}
	for proc, lines := range map[*daemonProc][]string{repl: {"replica sync failed", "removing half-received snapshot"}, prim.daemonProc: {`msg="stream failed"`}} {
		for _, l := range lines {
			if n := strings.Count(proc.logs.String(), l); n != 1 {
				t.Errorf("after 4 failed syncs %q is logged %d times, want once:\n%s", l, n, proc.logs)
			}
		}
	}
	free()
	repl.waitServes(t, g1, g2)
	repl.waitLog(t, fmt.Sprintf("generation=%d from=%d kind=incremental", g2, g1))
	repl.waitLog(t, "replica sync works again")
	prim.waitLog(t, "streams of the generation work again")
	if out, code := runStrata(t, nil, "status", "--api", repl.api); code != 0 || strings.Contains(out, "last_error") {
		t.Errorf("strata status on the replica that caught up: exit %d\n%s", code, out)
	}
	if a, b := regSums(t, prim.daemonProc, []uint64{g2}), regSums(t, repl, []uint64{g2}); a[g2] != b[g2] {
		t.Errorf("generation %d: registration sha256 differs between primary and replica", g2)
	}
	if st1, st2, data := resolve(t, repl.nfs, handles[g1]); st1 != 0 || st2 != 0 || !bytes.Equal(data, handles[g1].data) {
		t.Errorf("held handles of generation %d after the catch-up: GETATTR %d, READ %d", g1, st1, st2)
	}
	repl.stop(t)
	prim.stop(t)
}

// A replica whose state dir (its own tmpfs) has room for a received
// generation's manifest and registration but not for its path rows, which
// are written after the generation went live: the generation is served,
// the failed write is logged naming the file, and builders get a 404 for
// its rows (they import its registration meanwhile). Once the space is
// freed the running replica writes the rows by itself, without a restart,
// equal to the primary's.
func TestReplicaRowsOnFullStateDir(t *testing.T) {
	s := newSite(t)
	prim := startPrimary(t, s)
	g1 := prim.generations(t).Generations[0].ID

	rmnt := testenv.LoopBtrfs(t, "1G")
	rstateMnt := t.TempDir()
	testenv.Run(t, "mount", "-t", "tmpfs", "-o", "size=16m", "strata-replica-state", rstateMnt)
	t.Cleanup(func() { testenv.Run(t, "umount", "-l", rstateMnt) })
	rstate := filepath.Join(rstateMnt, "state")
	rcfg := prim.replicaConfig(t, replica{snaps: filepath.Join(rmnt, "gens"), state: rstate})
	repl := start(t, rcfg, rstate, nil)
	repl.waitServes(t, g1)
	repl.stop(t)

	// Generation 2 adds 3,000 paths; the replica's state dir keeps room
	// for its registration and manifest, not for its rows too.
	s.store.AddMany(t, "many", 3000)
	g2 := publishOne(t, s, prim.daemonProc, "second")
	reg, err := prim.client().Registration(t.Context(), g2)
	if err != nil {
		t.Fatal(err)
	}
	rows := pathRows(t, prim.daemonProc, g2)
	t.Logf("generation %d: registration %d bytes, rows %d bytes", g2, len(reg), len(rows))
	if len(rows) < 128<<10 {
		t.Fatalf("rows of %d bytes are too small for this test", len(rows))
	}
	free := testenv.Fill(t, rstateMnt, int64(len(reg))+64<<10)
	repl = start(t, rcfg, rstate, nil)
	repl.waitServes(t, g1, g2)
	repl.waitLog(t, "write path rows")
	if !strings.Contains(repl.logs.String(), "no space left on device") {
		t.Errorf("the failed write of the rows does not say the disk is full:\n%s", repl.logs)
	}
	if _, err := repl.client().Paths(t.Context(), g2, 0); err == nil || !strings.Contains(err.Error(), "their write failed") {
		t.Errorf("rows of generation %d whose write failed: %v, want a 404 saying so", g2, err)
	}
	free()
	deadline := time.Now().Add(30 * time.Second)
	for {
		body, err := repl.client().Paths(t.Context(), g2, 0)
		if err == nil {
			got, _ := io.ReadAll(body)
			body.Close()
			if !bytes.Equal(got, rows) {
				t.Fatalf("rows of generation %d written after the space was freed differ from the primary's", g2)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the running replica did not write the rows of generation %d after the space was freed: %v", g2, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	repl.stop(t)
	prim.stop(t)
}

// pathRows returns the path rows file of generation id as srv serves it.
func pathRows(t *testing.T, srv *daemonProc, id uint64) []byte {
	t.Helper()
	body, err := srv.client().Paths(t.Context(), id, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer body.Close()
	b, err := io.ReadAll(body)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
