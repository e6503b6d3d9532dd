package replica

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/cluster"
	"github.com/strata-nix/strata/snapshot"
)

// Fakes for the decisions only; the data path (real btrfs, real streams
// over HTTP) is proven by server's TestReplicaFollowsPrimary.

type fakePrimary struct {
	list    api.GenerationList
	streams []api.StreamRequest
}

func (f *fakePrimary) Generations(context.Context) (api.GenerationList, error) { return f.list, nil }
func (f *fakePrimary) URL() string                                             { return "http://primary" }
func (f *fakePrimary) Delta(context.Context, uint64, uint64) (api.Delta, error) {
	return api.Delta{}, errors.New("fake primary has no delta")
}
func (f *fakePrimary) Stream(_ context.Context, r api.StreamRequest) (*api.Stream, error) {
	f.streams = append(f.streams, r)
	return nil, errors.New("fake primary streams nothing")
}

type fakeBackend struct{ kind string }

func (f fakeBackend) Kind() string { return f.kind }
func (f fakeBackend) Send(context.Context, io.Writer, uint64, uint64) error {
	return errors.New("not used")
}
func (f fakeBackend) Receive(context.Context, io.Reader, uint64, uint64) (snapshot.Snapshot, error) {
	return snapshot.Snapshot{}, errors.New("not used")
}
func (f fakeBackend) Destroy(context.Context, uint64) error             { return nil }
func (f fakeBackend) List(context.Context) ([]snapshot.Snapshot, error) { return nil, nil }

type fakeTarget struct {
	gens     []api.Generation
	missing  []api.Generation
	store    string
	retained int // Retain calls
}

func (f *fakeTarget) Missing() []api.Generation { return f.missing }

func (f *fakeTarget) Generations() []api.Generation                              { return f.gens }
func (f *fakeTarget) StoreID() string                                            { return f.store }
func (f *fakeTarget) PrepareReceived(context.Context, api.Generation, api.Delta) {}
func (f *fakeTarget) DropPrepared(uint64)                                        {}
func (f *fakeTarget) AddReceived(context.Context, api.Generation, snapshot.Snapshot, string) (api.Generation, error) {
	return api.Generation{}, errors.New("not used")
}
func (f *fakeTarget) SetUpstreamPinned(map[uint64]string) {}
func (f *fakeTarget) Retain(context.Context)              { f.retained++ }

func gen(id uint64, sum string) api.Generation {
	return api.Generation{ID: id, RegistrationSHA256: sum}
}

func TestRefusedBeforeAnyStream(t *testing.T) {
	for _, tc := range []struct {
		name  string
		list  api.GenerationList
		store string
		want  string
		self  string
	}{
		{"mixed backends", api.GenerationList{Backend: "zfs", Generations: []api.Generation{gen(1, "a")}}, "", "mixed backends", ""},
		{"another store", api.GenerationList{Backend: "btrfs", Store: "s2", Generations: []api.Generation{gen(1, "a")}}, "s1", "another cluster", ""},
		{"another store dir", api.GenerationList{Backend: "btrfs", StoreDir: "/gnu/store", Generations: []api.Generation{gen(1, "a")}}, "", "store dir /gnu/store, but this replica's store.dir is /nix/store", ""},
		// Review 18 #7: replica.of naming this server, or another replica.
		{"itself", api.GenerationList{Backend: "btrfs", Role: "replica", ReplicaOf: "http://primary", Server: "me"}, "", "replica.of http://primary is this server itself", "me"},
		{"a replica", api.GenerationList{Backend: "btrfs", Role: "replica", ReplicaOf: "http://p1:7480", Server: "r2", Generations: []api.Generation{gen(1, "a")}}, "", "is itself a replica (of http://p1:7480)", "me"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pr := &fakePrimary{list: tc.list}
			p := New(Options{Primary: pr, Backend: fakeBackend{"btrfs"}, Target: &fakeTarget{store: tc.store}, Self: tc.self, StoreDir: "/nix/store"})
			_, err := p.Sync(context.Background())
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "nothing received") {
				t.Fatalf("Sync: %v, want %q and nothing received", err, tc.want)
			}
			if len(pr.streams) != 0 {
				t.Fatalf("asked for streams %+v after refusing", pr.streams)
			}
			if perr := p.Probe(context.Background()); (perr != nil) != true || errors.Is(perr, ErrNotPrimary) != (tc.self != "") {
				t.Errorf("Probe: %v; want ErrNotPrimary only for a replica of itself or of a replica", perr)
			}
		})
	}
}

func TestBases(t *testing.T) {
	prim := []api.Generation{gen(3, "c"), gen(4, "d"), gen(5, "e")}
	for _, tc := range []struct {
		local []api.Generation
		id    uint64
		want  string
	}{
		{nil, 3, "[]"}, // nothing here: whole
		{[]api.Generation{gen(3, "c")}, 4, "[3]"},
		{[]api.Generation{gen(3, "c"), gen(4, "d")}, 5, "[4 3]"}, // newest first
		{[]api.Generation{gen(1, "a"), gen(2, "b")}, 3, "[]"},    // bases gone on the primary: whole
		{[]api.Generation{gen(3, "c"), gen(4, "X")}, 5, "[3]"},   // 4 differs (another lineage)
		{[]api.Generation{gen(3, "c"), gen(9, "z")}, 5, "[3]"},   // never a base newer than the generation
		{[]api.Generation{gen(3, "other")}, 4, "[]"},             // same id, other registration: whole
	} {
		if got := fmt.Sprint(bases(tc.local, prim, tc.id)); got != tc.want && !(got == "[]" && tc.want == "[]") {
			t.Errorf("bases(%v, %d) = %s, want %s", ids(tc.local), tc.id, got, tc.want)
		}
	}
}

func ids(gs []api.Generation) []uint64 {
	var out []uint64
	for _, g := range gs {
		out = append(out, g.ID)
	}
	return out
}

func TestFromClusterPicksTheOnePrimary(t *testing.T) {
	var members []cluster.Server
	p := FromCluster(func() []cluster.Server { return members }, "tok")
	ctx := context.Background()
	if _, err := p.Generations(ctx); err == nil || !strings.Contains(err.Error(), "no primary server") {
		t.Errorf("no servers: %v", err)
	}
	members = []cluster.Server{{Name: "r1", API: "http://127.0.0.1:1", Replica: true}}
	if _, err := p.Generations(ctx); err == nil || !strings.Contains(err.Error(), "no primary server") {
		t.Errorf("only a replica: %v", err)
	}
	members = append(members, cluster.Server{Name: "p1", API: "http://127.0.0.1:2"}, cluster.Server{Name: "p2", API: "http://127.0.0.1:3"})
	if _, err := p.Generations(ctx); err == nil || !strings.Contains(err.Error(), "2 primary servers") {
		t.Errorf("two primaries: %v", err)
	}
	members = members[:2]
	p.Generations(ctx) // nothing listens: an error, but the primary is chosen
	if p.URL() != "http://127.0.0.1:2" {
		t.Errorf("URL() = %q, want p1's API", p.URL())
	}
}

// Review 18 #13: retention ran only after a fully successful sync, so one
// generation that kept failing stopped it for ever. It runs after a sync
// whose receive failed too, but not when the primary was refused (nothing
// arrived, its pins are not known).
func TestRetentionAfterFailedSync(t *testing.T) {
	pr := &fakePrimary{list: api.GenerationList{Backend: "btrfs", Generations: []api.Generation{gen(1, "a"), gen(2, "b")}}}
	tg := &fakeTarget{}
	p := New(Options{Primary: pr, Backend: fakeBackend{"btrfs"}, Target: tg})
	if _, err := p.Sync(context.Background()); err == nil {
		t.Fatal("Sync with a primary that streams nothing succeeded")
	}
	if tg.retained != 1 {
		t.Errorf("retention ran %d times after a failed receive, want 1", tg.retained)
	}
	before := tg.retained
	pr.list.Backend = "zfs"
	p.Sync(context.Background())
	if tg.retained != before {
		t.Errorf("retention ran after a refused primary, want not")
	}
}

// TestDivergedPrimaryRefused: a primary whose generations contradict this
// replica's (an id it serves with another registration, or a newest
// generation older than this replica's: a primary that lost its state and
// publishes from generation 1 again, with the same store) is refused
// loudly (ErrDiverged, strata_replica_diverged 1): no stream asked for,
// retention not run (nothing here destroyed); a primary that agrees is
// followed again and the gauge goes back to 0.
func TestDivergedPrimaryRefused(t *testing.T) {
	for _, tc := range []struct {
		name      string
		local     []api.Generation
		primary   []api.Generation
		missing   []api.Generation
		want      string // "" : not refused
		gaugeWant float64
	}{
		{"same id, other registration", []api.Generation{gen(1, "a"), gen(2, "b")}, []api.Generation{gen(1, "x")}, nil,
			"primary http://primary has generation 1 with registration sha256 x, this replica has generation 1 with a", 1},
		{"newer same id, other registration", []api.Generation{gen(1, "a"), gen(2, "b")}, []api.Generation{gen(1, "a"), gen(2, "y"), gen(3, "c")}, nil,
			"generation 2 with registration sha256 y", 1},
		{"went back, no common id", []api.Generation{gen(5, "e"), gen(6, "f")}, []api.Generation{gen(1, "a"), gen(2, "b")}, nil,
			"its newest generation is 2, this replica has generations up to 6", 1},
		{"went back to nothing", []api.Generation{gen(5, "e")}, nil, nil, "it has no generation", 1},
		{"agrees, ahead", []api.Generation{gen(1, "a"), gen(2, "b")}, []api.Generation{gen(2, "b"), gen(3, "c")}, nil, "", 0},
		{"agrees, newest missing there", []api.Generation{gen(1, "a"), gen(2, "b")}, []api.Generation{gen(1, "a")}, []api.Generation{gen(2, "b")}, "", 0},
		{"nothing here", nil, []api.Generation{gen(1, "a")}, nil, "", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pr := &fakePrimary{list: api.GenerationList{Backend: "btrfs", Generations: tc.primary, Missing: tc.missing}}
			tg := &fakeTarget{gens: tc.local}
			reg := prometheus.NewRegistry()
			p := New(Options{Primary: pr, Backend: fakeBackend{"btrfs"}, Target: tg, Registry: reg})
			_, err := p.Sync(context.Background())
			if tc.want != "" {
				if !errors.Is(err, ErrDiverged) || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "nothing destroyed") {
					t.Fatalf("Sync: %v, want ErrDiverged naming %q", err, tc.want)
				}
				if len(pr.streams) != 0 || tg.retained != 0 {
					t.Errorf("streams asked %+v, retention ran %d times; want neither", pr.streams, tg.retained)
				}
			} else if errors.Is(err, ErrDiverged) {
				t.Fatalf("Sync: %v, want no refusal", err)
			}
			if got := gauge(t, reg, "strata_replica_diverged"); got != tc.gaugeWant {
				t.Errorf("strata_replica_diverged %v, want %v", got, tc.gaugeWant)
			}
		})
	}
}

func gauge(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

// A generation the primary pins that is older than the newest here and not
// here is asked for (whole: no older generation both have) on btrfs; on
// ZFS, whose receive cannot put an older snapshot under newer ones, it is
// not asked for, the sync goes on, and the warning is logged once.
func TestLostPinAskedForOnBtrfsOnly(t *testing.T) {
	pinned := gen(1, "a")
	pinned.Pinned = true
	for _, kind := range []string{"btrfs", "zfs"} {
		t.Run(kind, func(t *testing.T) {
			pr := &fakePrimary{list: api.GenerationList{Backend: kind, Generations: []api.Generation{pinned, gen(2, "b"), gen(3, "c")}}}
			var logs strings.Builder
			p := New(Options{Primary: pr, Backend: fakeBackend{kind}, Target: &fakeTarget{gens: []api.Generation{gen(2, "b"), gen(3, "c")}},
				Logger: slog.New(slog.NewTextHandler(&logs, nil))})
			_, err1 := p.Sync(context.Background())
			_, err2 := p.Sync(context.Background())
			if kind == "btrfs" {
				if len(pr.streams) != 2 || pr.streams[0].ID != 1 || pr.streams[0].From != 0 || err1 == nil || !strings.Contains(err1.Error(), "generation 1, which the primary pins") {
					t.Errorf("streams asked %+v, sync: %v; want generation 1 whole at each sync, and the failure naming it", pr.streams, err1)
				}
				return
			}
			if len(pr.streams) != 0 || err1 != nil || err2 != nil {
				t.Errorf("streams asked %+v, syncs: %v, %v; want none asked and no failure", pr.streams, err1, err2)
			}
			if n := strings.Count(logs.String(), "the primary pins a generation that is not here"); n != 1 {
				t.Errorf("warned %d times, want once:\n%s", n, logs.String())
			}
		})
	}
}

// A generation the primary pins whose manifest kept here for its missing
// snapshot has another registration is not asked for (the target would
// refuse it after the whole stream, at every sync): the sync fails naming
// both sums and the way out, and goes on with the other lost pins and
// retention (before, a whole stream of it was received and refused every
// replica.interval).
func TestLostPinOtherContentNotAskedFor(t *testing.T) {
	one, two := gen(1, "a"), gen(2, "b")
	one.Pinned, two.Pinned = true, true
	pr := &fakePrimary{list: api.GenerationList{Backend: "btrfs", Generations: []api.Generation{one, two, gen(3, "c")}}}
	tg := &fakeTarget{gens: []api.Generation{gen(3, "c")}, missing: []api.Generation{gen(1, "other")}}
	p := New(Options{Primary: pr, Backend: fakeBackend{"btrfs"}, Target: tg})
	_, err := p.Sync(context.Background())
	if len(pr.streams) != 1 || pr.streams[0].ID != 2 {
		t.Errorf("streams asked %+v, want only generation 2's", pr.streams)
	}
	if err == nil || !strings.Contains(err.Error(), "generation 1") || !strings.Contains(err.Error(), "other") ||
		!strings.Contains(err.Error(), "strata generations forget 1") {
		t.Errorf("sync: %v, want a failure naming generation 1, the kept manifest's sum and strata generations forget 1", err)
	}
	if tg.retained != 1 {
		t.Errorf("retention ran %d times, want once", tg.retained)
	}
}
