//go:build integration

package server

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/server/replica"
	"github.com/strata-nix/strata/snapshot/btrfs"
)

// A generation the primary pins that the replica does not have comes back
// at the next sync (before, a replica asked only for generations newer than
// its newest, so a pinned one its retention had destroyed before the pin
// came, or one lost here, never did). Must show, on real btrfs and Nix
// stores: a replica with retention.keep 2 has 2 and 3 of the primary's 1,
// 2, 3; the primary pins 1 and the next sync receives 1 whole, which the
// replica then lists pinned (by the primary) and serves with the
// primary's files and registration; a further sync receives nothing; after
// two more publishes (the replica destroys 2 and 3) a pin of 3 brings 3
// incrementally from 1, the nearest older generation both have; 3's
// snapshot removed by hand here is missing after a restart and comes back
// at the next sync, no longer missing.
func TestReplicaReceivesLostPins(t *testing.T) {
	prim := primaryOfThree(t)

	re := newReplicaEnv(t, prim.api.URL)
	re.cfg.Keep = 2
	rs, p := re.start(t, "primary-token")
	syncOnce(t, p)
	wantIDs := func(want string) {
		t.Helper()
		if got := fmt.Sprint(ids(rs.Generations())); got != want {
			t.Fatalf("replica serves %s, want %s", got, want)
		}
	}
	wantIDs("[2 3]")
	// same checks that generation id is served here as on the primary,
	// pinned by the primary with name.
	same := func(id uint64, name string) {
		t.Helper()
		g, ok := rs.Generation(id)
		if !ok || !g.Pinned || g.PinName != name || g.PinFrom != "primary" {
			t.Errorf("replica's generation %d: %+v, want it pinned by the primary (%q)", id, g, name)
		}
		if a, b := regSHA(t, prim.srv.Server, id), regSHA(t, rs.Server, id); a != b {
			t.Errorf("generation %d: registration sha256 %s here, %s on the primary", id, b, a)
		}
		if a, b := exportWalk(t, prim.srv.nfsAddr, id), exportWalk(t, rs.nfsAddr, id); a != b {
			t.Errorf("generation %d: the replica's export walk differs from the primary's:\n%s\nprimary:\n%s", id, b, a)
		}
	}

	if _, err := prim.srv.Pin(1, "golden"); err != nil {
		t.Fatal(err)
	}
	res := syncOnce(t, p)
	if len(res.Received) != 1 || res.Received[0].ID != 1 || res.Received[0].From != 0 {
		t.Fatalf("after the primary pinned 1 the replica received %+v, want 1 whole", res.Received)
	}
	wantIDs("[1 2 3]")
	same(1, "golden")
	if res := syncOnce(t, p); len(res.Received) != 0 {
		t.Errorf("a sync in step received %+v", res.Received)
	}
	wantIDs("[1 2 3]")

	prim.add(t, "four", "4\n")
	prim.add(t, "five", "5\n")
	syncOnce(t, p)
	wantIDs("[1 4 5]") // 1 is pinned on the primary
	if _, err := prim.srv.Pin(3, ""); err != nil {
		t.Fatal(err)
	}
	testenv.Run(t, "btrfs", "filesystem", "sync", prim.c.cfg.SnapshotDir)
	res = syncOnce(t, p)
	if len(res.Received) != 1 || res.Received[0].ID != 3 || res.Received[0].From != 1 {
		t.Fatalf("after the primary pinned 3 the replica received %+v, want 3 from 1", res.Received)
	}
	wantIDs("[1 3 4 5]")
	same(3, "")

	// 3's snapshot removed by hand: missing after a restart, back after
	// the next sync.
	rs.Shutdown()
	testenv.Run(t, "btrfs", "subvolume", "delete", filepath.Join(re.snapDir, "strata-3"))
	rs, p = re.start(t, "primary-token")
	if got := fmt.Sprint(ids(rs.Missing())); got != "[3]" {
		t.Fatalf("restarted replica reports missing %s, want [3]", got)
	}
	res = syncOnce(t, p)
	if len(res.Received) != 1 || res.Received[0].ID != 3 {
		t.Fatalf("the replica with 3 missing received %+v, want 3", res.Received)
	}
	wantIDs("[1 3 4 5]")
	if m := rs.Missing(); len(m) != 0 {
		t.Errorf("after 3 came back the replica still reports missing %v", ids(m))
	}
	same(3, "")
}

// failAdd is the replica's NFS export with Add of generation id failing.
type failAdd struct {
	Exporter
	id uint64
}

func (f failAdd) Add(id uint64, dir string) error {
	if id == f.id {
		return fmt.Errorf("export of generation %d refused by the test", id)
	}
	return f.Exporter.Add(id, dir)
}

// A missing generation the primary pins whose receive fails after its
// manifest kept here was replaced (here: the export refuses it) keeps that
// manifest and the pin made here: after a restart it is still reported
// missing, and once received it carries the replica's own pin (before, the
// kept manifest was removed first and not put back, so the restart forgot
// the generation and reconcile dropped the replica's pin with it).
func TestReplicaLostPinFailureKeepsManifest(t *testing.T) {
	prim := primaryOfThree(t)

	re := newReplicaEnv(t, prim.api.URL)
	rs, p := re.start(t, "primary-token")
	syncOnce(t, p)
	if _, err := rs.Pin(3, "mine"); err != nil {
		t.Fatal(err)
	}
	rs.Shutdown()
	testenv.Run(t, "btrfs", "subvolume", "delete", filepath.Join(re.snapDir, "strata-3"))
	if _, err := prim.srv.Pin(3, "golden"); err != nil {
		t.Fatal(err)
	}

	// The receive of 3 fails at its export.
	exp, _ := serveNFS(t, re.cfg.StateDir)
	b, err := btrfs.NewReplica(re.snapDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(context.Background(), Options{Config: re.cfg, Backend: b, Export: failAdd{exp, 3}})
	if err != nil {
		t.Fatal(err)
	}
	pl := replica.New(replica.Options{Primary: replica.Fixed(api.NewClient(re.cfg.ReplicaOf, "primary-token"), re.cfg.ReplicaOf),
		Backend: b, Target: s, StateDir: re.cfg.StateDir, Registry: prometheus.NewRegistry()})
	if _, err := pl.Sync(context.Background()); err == nil || !strings.Contains(err.Error(), "refused by the test") {
		t.Fatalf("sync with generation 3's export failing: %v, want that failure", err)
	}
	if got := fmt.Sprint(ids(s.Missing())); got != "[3]" {
		t.Errorf("after the failed receive the replica reports missing %s, want [3]", got)
	}
	s.Shutdown()

	rs, p = re.start(t, "primary-token")
	if got := fmt.Sprint(ids(rs.Missing())); got != "[3]" {
		t.Fatalf("restarted after the failed receive, the replica reports missing %s, want [3] (its manifest kept)", got)
	}
	syncOnce(t, p)
	g, ok := rs.Generation(3)
	if !ok || !g.Pinned || g.PinName != "mine" || g.PinFrom != "" {
		t.Errorf("generation 3 received back: %+v (live %v), want the replica's own pin \"mine\"", g, ok)
	}
	if m := rs.Missing(); len(m) != 0 {
		t.Errorf("after 3 came back the replica still reports missing %v", ids(m))
	}
}

// A missing generation's receive that the process did not live to check
// (its stream arrived in full, the snapshot is here and the record names
// it; killed before it went live) is not served at the next start on the
// manifest kept for it: it stays missing until the first sync checks it as
// this replica's own unfinished receive and makes it live (before, the
// start served the unchecked snapshot under the kept manifest at once).
func TestReplicaLostPinKilledBeforeLive(t *testing.T) {
	prim := primaryOfThree(t)

	re := newReplicaEnv(t, prim.api.URL)
	rs, p := re.start(t, "primary-token")
	syncOnce(t, p)
	rs.Shutdown()
	testenv.Run(t, "btrfs", "subvolume", "delete", filepath.Join(re.snapDir, "strata-3"))
	rs, _ = re.start(t, "primary-token")
	if got := fmt.Sprint(ids(rs.Missing())); got != "[3]" {
		t.Fatalf("replica reports missing %s, want [3]", got)
	}
	if _, err := prim.srv.Pin(3, "golden"); err != nil {
		t.Fatal(err)
	}
	// What a sync does up to the check, then the process ends: the
	// record, the whole stream received, nothing made live.
	if err := os.WriteFile(replica.ReceivingFile(re.cfg.StateDir), []byte("3\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	st, err := api.NewClient(prim.api.URL, "primary-token").Stream(ctx, api.StreamRequest{ID: 3, Backend: "btrfs"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rs.Backend().(replica.Backend).Receive(ctx, st, 3, 0); err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, st)
	st.Close()
	rs.Shutdown()

	rs, p = re.start(t, "primary-token")
	if g, ok := rs.Generation(3); ok {
		t.Errorf("restarted, the replica serves generation 3 (%+v) before any check of the snapshot received for it", g)
	}
	if got := fmt.Sprint(ids(rs.Missing())); got != "[3]" {
		t.Errorf("restarted, the replica reports missing %s, want [3] until the receive is checked", got)
	}
	res := syncOnce(t, p)
	if len(res.Received) != 1 || res.Received[0].ID != 3 {
		t.Errorf("first sync after the restart received %+v, want 3 (its own unfinished receive, checked)", res.Received)
	}
	if g, ok := rs.Generation(3); !ok || g.PinFrom != "primary" {
		t.Errorf("after the sync generation 3 is %+v (live %v), want it live, pinned by the primary", g, ok)
	}
	if m := rs.Missing(); len(m) != 0 {
		t.Errorf("after the sync the replica still reports missing %v", ids(m))
	}
	if a, b := regSHA(t, prim.srv.Server, 3), regSHA(t, rs.Server, 3); a != b {
		t.Errorf("generation 3: registration sha256 %s here, %s on the primary", b, a)
	}
}

// primaryOfThree is a primary (retention.keep 10) that has published
// generations 1 (a filled store), 2 and 3 (a path added each).
func primaryOfThree(t *testing.T) *primaryEnv {
	t.Helper()
	prim := newPrimary(t, 10)
	prim.c.store.Fill(t)
	publish(t, prim.srv.Server)
	prim.add(t, "two", "2\n")
	prim.add(t, "three", "3\n")
	return prim
}
