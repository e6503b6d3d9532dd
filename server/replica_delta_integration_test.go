//go:build integration

package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/phase"
	"github.com/strata-nix/strata/nixstore"
	"github.com/strata-nix/strata/server/replica"
	"github.com/strata-nix/strata/snapshot"
	"github.com/strata-nix/strata/snapshot/btrfs"
)

// tamperedPrimary is the primary's API with its registration deltas
// changed by tamper.
type tamperedPrimary struct {
	replica.Primary
	tamper func(*api.Delta)
}

func (p tamperedPrimary) Delta(ctx context.Context, from, to uint64) (api.Delta, error) {
	d, err := p.Primary.Delta(ctx, from, to)
	if err == nil {
		p.tamper(&d)
	}
	return d, err
}

func stepNames(l *phase.Log) []string {
	var out []string
	for _, s := range l.Spans() {
		out = append(out, s.Name)
	}
	return out
}

// TestReplicaRegistrationFromDelta: an incremental receive takes its
// registration from the primary's delta (not from the received snapshot's
// DB) and serves exactly the primary's registration and, once written, its
// rows; a delta that does not give the manifest's registration is not
// used: the snapshot's DB gives it, and the generation still goes live
// equal to the primary's; a snapshot whose own DB disagrees with the
// manifest gets no rows.
func TestReplicaRegistrationFromDelta(t *testing.T) {
	prim := newPrimary(t, 10)
	prim.add(t, "one", "1\n")
	re, rs, p := prim.replica(t)
	syncOnce(t, p)

	check := func(id uint64, p *replica.Puller, wantStep, notStep string) {
		t.Helper()
		log := phase.New()
		res, err := p.Sync(phase.With(context.Background(), log))
		if err != nil || len(res.Received) != 1 || res.Received[0].ID != id || res.Received[0].From == 0 {
			t.Fatalf("sync: %v %+v, want generation %d incrementally", err, res, id)
		}
		steps := stepNames(log)
		if !slices.ContainsFunc(steps, func(s string) bool { return strings.HasPrefix(s, wantStep) }) ||
			notStep != "" && slices.ContainsFunc(steps, func(s string) bool { return strings.HasPrefix(s, notStep) }) {
			t.Errorf("generation %d: steps %q, want %q and not %q", id, steps, wantStep, notStep)
		}
		if a, b := regSHA(t, prim.srv.Server, id), regSHA(t, rs.Server, id); a != b {
			t.Errorf("generation %d: registration sha256 %s on the replica, %s on the primary", id, b, a)
		}
		if a, b := rowsOf(t, prim.srv.Server, id), rowsOf(t, rs.Server, id); !bytes.Equal(a, b) {
			t.Errorf("generation %d: rows differ from the primary's", id)
		}
		pg, _ := prim.srv.Generation(id)
		rg, _ := rs.Generation(id)
		if pg.Paths != rg.Paths || pg.NarBytes != rg.NarBytes {
			t.Errorf("generation %d: %d paths, %d NAR bytes on the replica; %d, %d on the primary", id, rg.Paths, rg.NarBytes, pg.Paths, pg.NarBytes)
		}
		if w, r := exportWalk(t, prim.srv.nfsAddr, id), exportWalk(t, rs.nfsAddr, id); w != r {
			t.Errorf("generation %d: the replica's export differs from the primary's", id)
		}
	}

	prim.add(t, "two", "2\n")
	check(2, p, "prepare: registration from the primary's delta", "live: read the snapshot's db")

	// A delta that does not lead to the manifest's registration (it leaves
	// the new paths out).
	b, err := btrfs.NewReplica(re.snapDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	bad := replica.New(replica.Options{Backend: b, Target: rs.Server, StateDir: re.cfg.StateDir, Registry: prometheus.NewRegistry(),
		Primary: tamperedPrimary{replica.Fixed(api.NewClient(prim.api.URL, "primary-token"), prim.api.URL), func(d *api.Delta) { d.Added = "" }}})
	prim.add(t, "three", "3\n")
	check(3, bad, "live: read the snapshot's db", "")

	// The gate of the rows written after going live: a snapshot whose DB
	// gives another registration than the manifest's gets none.
	g, _ := rs.Generation(3)
	if _, err := rs.snapshotRows(context.Background(), fmt.Sprintf("%s/%s", re.snapDir, g.Snapshot), strings.Repeat("0", 64)); err == nil ||
		!strings.Contains(err.Error(), "not the manifest's") {
		t.Errorf("rows of a snapshot whose DB disagrees with the manifest: %v, want refused", err)
	}
}

// failingReceive is a real replica backend whose Receive takes the whole
// stream and then fails, once the registration from the primary's delta
// is staged (so that the failure comes after it).
type failingReceive struct {
	*btrfs.Backend
	staged string
}

func (f failingReceive) Receive(ctx context.Context, r io.Reader, id, from uint64) (snapshot.Snapshot, error) {
	io.Copy(io.Discard, r)
	for i := 0; i < 500; i++ {
		if _, err := os.Stat(f.staged); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	return snapshot.Snapshot{}, errors.New("injected receive failure")
}

// TestReplicaStagedRegistrationRemoved: the registration a replica staged
// from the primary's delta is removed when the receive fails after it
// (nothing of a failed receive stays in the state dir), and the next sync
// receives the generation.
func TestReplicaStagedRegistrationRemoved(t *testing.T) {
	prim := newPrimary(t, 10)
	prim.add(t, "one", "1\n")
	re, rs, p := prim.replica(t)
	syncOnce(t, p)
	prim.add(t, "two", "2\n")

	b, err := btrfs.NewReplica(re.snapDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	staged := rs.state.stagedFile()
	bad := replica.New(replica.Options{Backend: failingReceive{b, staged}, Target: rs.Server, StateDir: re.cfg.StateDir, Registry: prometheus.NewRegistry(),
		Primary: replica.Fixed(api.NewClient(prim.api.URL, "primary-token"), prim.api.URL)})
	if _, err := bad.Sync(context.Background()); err == nil || !strings.Contains(err.Error(), "injected") {
		t.Fatalf("sync with a failing receive: %v", err)
	}
	if _, err := os.Stat(staged); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("staged registration after a failed receive: %v, want it removed", err)
	}
	if res := syncOnce(t, p); len(res.Received) != 1 || res.Received[0].ID != 2 {
		t.Fatalf("next sync received %+v, want generation 2", res.Received)
	}
	if _, err := os.Stat(staged); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("staged registration after a receive: %v", err)
	}
}

// TestReplicaDeltaAddedPathMissing: with a registration from the delta,
// going live looks up the paths the delta added (the others were in the
// base's store): a received snapshot that lacks them (here the base's own
// snapshot stands in for generation 3's) is refused, naming them, nothing
// goes live and nothing stays staged; the real stream then goes live.
func TestReplicaDeltaAddedPathMissing(t *testing.T) {
	prim := newPrimary(t, 10)
	prim.add(t, "one", "1\n")
	re, rs, p := prim.replica(t)
	syncOnce(t, p)
	prim.add(t, "two", "2\n")

	ctx := context.Background()
	client := api.NewClient(prim.api.URL, "primary-token")
	d, err := client.Delta(ctx, 1, 2)
	if err != nil {
		t.Fatal(err)
	}
	added, _, err := nixstore.RegistrationPaths([]byte(d.Added))
	if err != nil || len(added) == 0 {
		t.Fatalf("delta's added paths %v: %v", added, err)
	}
	g, ok := prim.srv.Generation(2)
	if !ok {
		t.Fatal("no generation 2 on the primary")
	}
	rs.PrepareReceived(ctx, g, d)
	base, _ := rs.Generation(1)
	_, err = rs.AddReceived(ctx, g, snapshot.Snapshot{ID: 2, Name: snapshot.Name(2), Path: filepath.Join(re.snapDir, base.Snapshot)}, prim.api.URL)
	var ve *nixstore.VerifyError
	if !errors.As(err, &ve) || !slices.Equal(ve.Missing, added) {
		t.Fatalf("received snapshot without the added paths %v: %v, want them missing", added, err)
	}
	if _, live := rs.Generation(2); live {
		t.Error("generation 2 live after its check failed")
	}
	if _, err := os.Stat(rs.state.stagedFile()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("staged registration after the refusal: %v", err)
	}
	res := syncOnce(t, p)
	if len(res.Received) != 1 || res.Received[0].ID != 2 || res.Received[0].From != 1 {
		t.Fatalf("sync after the refusal: %+v, want generation 2 from 1", res)
	}
	if a, b := regSHA(t, prim.srv.Server, 2), regSHA(t, rs.Server, 2); a != b {
		t.Errorf("registration sha256 %s on the replica, %s on the primary", b, a)
	}
}
