package server

import (
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/snapshot"
)

// A replica adopts at start only live snapshots it received itself (origin
// label); one a primary labelled live is kept, never adopted, so retention
// never destroys it.
func TestPlanReplicaAdoptsOnlyWhatItReceived(t *testing.T) {
	f := newFixture(t)
	f.cfg.ReplicaOf = "http://primary:7480"
	p := f.plan(t,
		snap(1, live("1")), // the primary's own: labelled live where it was published
		snap(2, live("2", labelOrigin, "http://primary:7480")), // received by this replica
	)
	if !slices.Equal(p.rebuild, []uint64{2}) {
		t.Errorf("rebuild %v, want [2] (only the received one)", p.rebuild)
	}
	why, kept := p.kept[1]
	if !kept || !strings.Contains(why, "did not receive it") || !strings.Contains(why, "snapshot_dir") {
		t.Errorf("strata-1 (a primary's) kept %v %q, want kept naming the snapshot dir", kept, why)
	}
	// A primary rebuilds both (its lost state_dir).
	f.cfg.ReplicaOf = ""
	if p := f.plan(t, snap(1, live("1")), snap(2, live("2"))); !slices.Equal(p.rebuild, []uint64{1, 2}) {
		t.Errorf("primary: rebuild %v, want [1 2]", p.rebuild)
	}
}

func TestDecideOwner(t *testing.T) {
	me := identity{owner: owner{ServerID: "me", Role: "replica", Host: "h", StateDir: "/state/r"}}
	other := &owner{ServerID: "prim", Role: "primary", Host: "h", StateDir: "/state/p"}
	f := newFixture(t)
	f.cfg.ReplicaOf = "http://primary:7480"
	f.cfg.SnapshotDir = "/snaps"
	none := f.plan(t)
	primarys := f.plan(t, snap(1, live("1")), snap(2, live("2", labelOrigin, "http://primary:7480")))

	for _, c := range []struct {
		name  string
		rec   *owner
		me    identity
		p     *plan
		claim bool
		want  claim
		err   []string
	}{
		{"mine", &owner{ServerID: "me"}, me, primarys, false, claimNone, nil},
		{"another server's", other, me, none, false, 0, []string{"/snaps", "server prim", "a primary with state_dir /state/p", "/snaps/strata.owner.json", "its own snapshot.snapshot_dir", "--claim-snapshot-dir", "nothing was changed"}},
		{"another server's, claimed", other, me, none, true, claimForced, nil},
		{"fresh dir", nil, me, none, false, claimFresh, nil},
		{"old dir with a live snapshot this state_dir does not know", nil, me, primarys, false, 0, []string{"no owner record", "strata-2 (labelled live, no manifest in this state_dir)", "--claim-snapshot-dir"}},
		{"same host and state_dir, server-id lost", &owner{ServerID: "old", Host: "h", StateDir: "/state/r/"}, identity{owner: me.owner, fresh: true}, none, false, claimSameStateDir, nil},
		{"same host, other state_dir, server-id lost", &owner{ServerID: "old", Host: "h", StateDir: "/state/x"}, identity{owner: me.owner, fresh: true}, none, false, 0, []string{"server old"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := f.cfg
			cfg.ClaimSnapshotDir = c.claim
			got, err := decideOwner(cfg, c.rec, c.me, c.p)
			if c.err == nil {
				if err != nil || got != c.want {
					t.Fatalf("got %v, %v; want %v", got, err, c.want)
				}
				return
			}
			if !errors.Is(err, ErrOwnedByOther) {
				t.Fatalf("got %v, %v; want a refusal", got, err)
			}
			for _, w := range c.err {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("refusal %q lacks %q", err, w)
				}
			}
		})
	}

	// A replica's served generation without an origin (manifest rebuilt by
	// an older strata from a primary's snapshot) is not accounted for.
	f.st.writeGeneration(api.Generation{ID: 3, Snapshot: snapshot.Name(3), RegistrationSHA256: "s3"}, []byte("reg"), nil)
	f.st.writeGeneration(api.Generation{ID: 4, Snapshot: snapshot.Name(4), RegistrationSHA256: "s4", Origin: "http://primary:7480"}, []byte("reg"), nil)
	p := f.plan(t, snap(3, live("3", labelSHA256, "s3")), snap(4, live("4", labelSHA256, "s4")))
	if got := slices.Collect(maps.Keys(p.kept)); len(got) != 0 || !slices.Equal(p.serve, []uint64{3, 4}) {
		t.Fatalf("serve %v kept %v", p.serve, got)
	}
	if _, err := decideOwner(f.cfg, nil, me, p); err == nil || !strings.Contains(err.Error(), "strata-3 (its manifest here has no origin") || strings.Contains(err.Error(), "strata-4") {
		t.Errorf("replica claim with an origin-less manifest: %v", err)
	}
	f.cfg.ReplicaOf = ""
	if got, err := decideOwner(f.cfg, nil, me, p); err != nil || got != claimAccounted {
		t.Errorf("primary claim of an old dir it accounts for: %v %v", got, err)
	}
}
