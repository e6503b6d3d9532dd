package server

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/snapshot"
)

// listBackend lists fixed snapshots; the plan never changes anything.
type listBackend []snapshot.Snapshot

func (listBackend) Kind() string { return "btrfs" }
func (listBackend) Create(context.Context, uint64, snapshot.Labels) (snapshot.Snapshot, error) {
	panic("inspect created a snapshot")
}
func (listBackend) SetLabels(context.Context, uint64, snapshot.Labels) error {
	panic("inspect set labels")
}
func (b listBackend) List(context.Context) ([]snapshot.Snapshot, error) { return b, nil }
func (listBackend) Destroy(context.Context, uint64) error {
	panic("inspect destroyed a snapshot")
}

func snap(id uint64, labels snapshot.Labels) snapshot.Snapshot {
	if labels == nil {
		labels = snapshot.Labels{}
	}
	return snapshot.Snapshot{ID: id, Name: snapshot.Name(id), Path: "/snaps/" + snapshot.Name(id), Labels: labels}
}

func live(id string, extra ...string) snapshot.Labels {
	l := snapshot.Labels{labelGeneration: id, labelState: "live", labelStore: "store-a"}
	for i := 0; i+1 < len(extra); i += 2 {
		l[extra[i]] = extra[i+1]
	}
	return l
}

type fixture struct {
	cfg Config
	st  state
}

func newFixture(t *testing.T) fixture {
	t.Helper()
	dir := t.TempDir()
	st := state{dir: filepath.Join(dir, "state")}
	if err := st.init(); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(dir, "nix")
	if err := os.MkdirAll(filepath.Join(root, "var/nix"), 0o755); err != nil {
		t.Fatal(err)
	}
	return fixture{cfg: Config{StoreRoot: root, StateDir: st.dir, Backend: "btrfs", SnapshotDir: "/snaps"}, st: st}
}

func (f fixture) manifest(t *testing.T, id uint64, sum string) {
	t.Helper()
	if err := f.st.writeGeneration(api.Generation{ID: id, Snapshot: snapshot.Name(id), RegistrationSHA256: sum}, []byte("reg"), []byte("rows")); err != nil {
		t.Fatal(err)
	}
}

func (f fixture) plan(t *testing.T, snaps ...snapshot.Snapshot) *plan {
	t.Helper()
	p, err := inspect(context.Background(), f.cfg, f.st, listBackend(snaps))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestPlanEmptyStateAdoptsLiveAndKeepsTheRest(t *testing.T) {
	f := newFixture(t)
	p := f.plan(t,
		snap(1, live("1", labelPinned, "true", labelPinName, "golden")),
		snap(2, snapshot.Labels{labelGeneration: "2", labelState: "publishing"}), // another state dir's publish
		snap(3, nil),                         // no labels: older than labels, or a crash inside Create
		snap(4, live("7")),                   // renamed by hand
		snap(5, live("5", labelParent, "1")), // adopted
	)
	if !slices.Equal(p.rebuild, []uint64{1, 5}) || len(p.serve) != 0 || p.destroy != 0 {
		t.Errorf("rebuild %v serve %v destroy %d; want rebuild [1 5], nothing served from state, nothing destroyed", p.rebuild, p.serve, p.destroy)
	}
	if got := slices.Sorted(maps.Keys(p.kept)); !slices.Equal(got, []uint64{2, 3, 4}) {
		t.Errorf("kept %v, want [2 3 4]", got)
	}
	if p.nextID != 6 {
		t.Errorf("next id %d, want 6", p.nextID)
	}
	if p.pins[1] != "golden" || len(p.pins) != 1 {
		t.Errorf("pins %v, want 1:golden from its label", p.pins)
	}
	if p.storeWant != "store-a" || !strings.Contains(p.storeFrom, "generation 5") {
		t.Errorf("store %q from %q, want store-a from generation 5's label", p.storeWant, p.storeFrom)
	}
	if err := p.refusal(f.cfg); err != nil {
		t.Errorf("refusal %v", err)
	}
	if err := p.storeMismatch(f.cfg); err == nil || !strings.Contains(err.Error(), "store-a") || !strings.Contains(err.Error(), "none (no var/nix/strata-store-id)") {
		t.Errorf("store mismatch %v, want one naming store-a and none", err)
	}
}

func TestPlanDestroysOnlyTheReservedUnfinishedPublish(t *testing.T) {
	for _, c := range []struct {
		name    string
		labels  snapshot.Labels
		destroy bool
	}{
		{"publishing label", snapshot.Labels{labelGeneration: "3", labelState: "publishing"}, true},
		{"no labels (crash inside Create)", nil, true},
		{"live label (state restored from an old backup)", live("3"), false},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t)
			f.manifest(t, 1, "s1")
			if err := f.st.setPublishing(3); err != nil {
				t.Fatal(err)
			}
			p := f.plan(t, snap(1, live("1", labelSHA256, "s1")), snap(2, snapshot.Labels{labelState: "publishing"}), snap(3, c.labels))
			if got := p.destroy == 3; got != c.destroy {
				t.Errorf("destroy %d, want destroy of 3: %v", p.destroy, c.destroy)
			}
			if _, kept := p.kept[2]; !kept {
				t.Errorf("strata-2 (publishing, not reserved) not kept: %v", p.kept)
			}
			if !slices.Equal(p.serve, []uint64{1}) {
				t.Errorf("serve %v, want [1]", p.serve)
			}
		})
	}
}

func TestPlanMissingAndMistypedLocation(t *testing.T) {
	f := newFixture(t)
	f.manifest(t, 1, "s1")
	f.manifest(t, 2, "s2")
	p := f.plan(t, snap(2, live("2", labelSHA256, "s2")))
	if !slices.Equal(p.missing, []uint64{1}) || !slices.Equal(p.serve, []uint64{2}) {
		t.Errorf("missing %v serve %v, want [1] and [2]", p.missing, p.serve)
	}
	if err := p.refusal(f.cfg); err != nil {
		t.Errorf("one missing of two refused the start: %v", err)
	}
	p = f.plan(t) // nothing where the config points
	err := p.refusal(f.cfg)
	if err == nil || !strings.Contains(err.Error(), "none of the 2 generations") || !strings.Contains(err.Error(), "/snaps") {
		t.Errorf("refusal %v, want one naming the 2 generations and the snapshot dir", err)
	}
	// A snapshot whose registration label disagrees with the manifest is
	// another server's: kept, not served, nothing dropped.
	p = f.plan(t, snap(1, live("1", labelSHA256, "other")), snap(2, live("2")))
	if _, kept := p.kept[1]; !kept || slices.Contains(p.serve, 1) {
		t.Errorf("conflicting strata-1: kept %v serve %v", p.kept, p.serve)
	}
}

// Review 19 #4: a manifest retention marked retiring is finished (no
// snapshot: retention destroyed it) or served again (snapshot there), never
// reported missing; a mistyped location still refuses the start when a
// generation that was not retiring has no snapshot.
func TestPlanRetiring(t *testing.T) {
	f := newFixture(t)
	for _, id := range []uint64{1, 2, 3} {
		f.manifest(t, id, fmt.Sprint("s", id))
	}
	for _, id := range []uint64{1, 2} {
		if err := f.st.markRetiring(id); err != nil {
			t.Fatal(err)
		}
	}
	p := f.plan(t, snap(2, live("2", labelSHA256, "s2")), snap(3, live("3", labelSHA256, "s3")))
	if !slices.Equal(p.retired, []uint64{1}) || !slices.Equal(p.unretire, []uint64{2}) || !slices.Equal(p.serve, []uint64{2, 3}) || len(p.missing) != 0 {
		t.Errorf("retired %v unretire %v serve %v missing %v, want [1] [2] [2 3] []", p.retired, p.unretire, p.serve, p.missing)
	}
	if err := p.refusal(f.cfg); err != nil {
		t.Errorf("refused: %v", err)
	}
	p = f.plan(t) // nothing where the config points
	if err := p.refusal(f.cfg); err == nil || !strings.Contains(err.Error(), "none of the 1 generations") {
		t.Errorf("refusal %v, want one naming the 1 generation not being retired", err)
	}
}

func TestPlanStoreIdentity(t *testing.T) {
	f := newFixture(t)
	if err := f.st.setStoreID("store-a"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(f.cfg.StoreRoot, storeIDFile), []byte("store-b\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	p := f.plan(t)
	err := p.storeMismatch(f.cfg)
	if err == nil || !strings.Contains(err.Error(), "identity store-b") || !strings.Contains(err.Error(), "come from store store-a") || !strings.Contains(err.Error(), "--adopt-store") {
		t.Errorf("mismatch %v", err)
	}
	if err := os.WriteFile(filepath.Join(f.cfg.StoreRoot, storeIDFile), []byte("store-a\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := f.plan(t).storeMismatch(f.cfg); err != nil {
		t.Errorf("same store: %v", err)
	}
}

// On a replica, a snapshot the receive record names that is newer than the
// manifest stored under its id (the one kept for a missing generation) is
// this replica's unfinished receive: the generation stays missing until
// the first sync checks it, and the start is not refused even when no
// other generation has its snapshot. A manifest written after the snapshot
// (the receive went live, the record was not yet cleared) is served.
func TestPlanLostGenerationReceive(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		name    string
		arrived time.Time
		want    string
	}{
		{"kept manifest older than the snapshot", now.Add(-time.Hour), "serve [] missing [3] received 3 refusal <nil>"},
		{"manifest written after the snapshot", now.Add(time.Second), "serve [3] missing [] received 0 refusal <nil>"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			f.cfg.ReplicaOf = "http://primary:7480"
			if err := f.st.writeGeneration(api.Generation{ID: 3, Snapshot: snapshot.Name(3), RegistrationSHA256: "s3", Arrived: &tc.arrived}, []byte("reg"), nil); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(f.st.dir, "replica-receiving"), []byte("3\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			sn := snap(3, snapshot.Labels{labelState: "publishing"})
			sn.Created = now
			p := f.plan(t, sn)
			if got := fmt.Sprintf("serve %v missing %v received %d refusal %v", p.serve, p.missing, p.received, p.refusal(f.cfg)); got != tc.want {
				t.Errorf("plan: %s, want %s", got, tc.want)
			}
		})
	}
}
