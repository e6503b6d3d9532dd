package server

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/nixstore"
	"github.com/strata-nix/strata/server/replica"
	"github.com/strata-nix/strata/snapshot"
)

// plan is what a start makes of the state dir and the snapshots it finds,
// before it changes anything. `strata server --check-config` prints it;
// New carries it out.
//
// Rules (issue 13: no config mistake destroys a generation):
//   - a snapshot with a manifest is served (labels of a snapshot taken
//     before labels existed are written);
//   - a snapshot without a manifest whose label says live is adopted: its
//     manifest and registration are rebuilt from its own db.sqlite; on a
//     replica only if it also carries the origin label the replica writes
//     onto what it received itself (a snapshot merely labelled live by a
//     primary is kept, never adopted);
//   - the one snapshot that may be destroyed is the state's reserved,
//     unfinished publish ("publishing" file), and only when its label does
//     not say live;
//   - every other snapshot is kept and reported, never destroyed;
//   - a manifest without its snapshot is kept and reported as missing until
//     `strata generations forget N`, unless retention marked it retiring
//     before it destroyed the snapshot: then the start finishes the removal
//     (a retiring one whose snapshot is still there is served again, and
//     retention decides anew);
//   - a state that records generations none of which has a snapshot (and
//     no snapshot to adopt) stops the start: the snapshot location is
//     likely mistyped.
type plan struct {
	stored     map[uint64]api.Generation    // manifests in the state dir
	snaps      map[uint64]snapshot.Snapshot // strata snapshots found
	serve      []uint64                     // manifest and snapshot
	rebuild    []uint64                     // live snapshot, no manifest
	missing    []uint64                     // manifest, no snapshot
	retired    []uint64                     // manifest marked retiring, no snapshot: retention destroyed it
	unretire   []uint64                     // manifest marked retiring, snapshot still there: served again
	kept       map[uint64]string            // snapshot kept, not served: why
	destroy    uint64                       // the unfinished publish's snapshot, 0 if none
	dropStored bool                         // destroy's manifest was written too
	publishing uint64                       // the state's reserved id, 0 if none
	receiving  uint64                       // a replica's recorded receive, 0 if none
	received   uint64                       // its snapshot, here but never live, 0 if none
	pins       map[uint64]string            // pins.json and pin labels together
	nextID     uint64                       // id the next publish gets
	storeWant  string                       // identity the generations come from ("" none yet)
	storeFrom  string                       // where storeWant comes from
	storeHave  string                       // identity of store.root ("" none)
	labels     map[uint64]snapshot.Labels   // current labels by id
	// otherDir is the store dir the newest manifest's registration names
	// its paths in when that is not store.dir ("" when they agree).
	otherDir   string
	otherDirOf uint64 // that generation
	// ownSnapshots: the snapshot dir's owner record names this host and
	// state_dir path (a wiped state_dir): its snapshots are this server's.
	ownSnapshots bool
}

// where names the snapshot location of cfg for messages.
func where(cfg Config) string {
	if cfg.Backend == "zfs" {
		return "ZFS dataset " + cfg.Dataset + " (snapshot.dataset)"
	}
	return "snapshot dir " + cfg.SnapshotDir + " (snapshot.snapshot_dir)"
}

// inspect reads the state dir and the backend's snapshots and makes the
// plan; it changes nothing.
func inspect(ctx context.Context, cfg Config, st state, b snapshot.Backend) (*plan, error) {
	p := &plan{stored: map[uint64]api.Generation{}, snaps: map[uint64]snapshot.Snapshot{},
		kept: map[uint64]string{}, labels: map[uint64]snapshot.Labels{}}
	stored, err := st.generations()
	if err != nil {
		return nil, err
	}
	for _, g := range stored {
		p.stored[g.ID] = g
	}
	if n := len(stored); n > 0 {
		id := slices.MaxFunc(stored, func(a, b api.Generation) int { return cmp.Compare(a.ID, b.ID) }).ID
		if dir := registrationStoreDir(st.registration(id)); dir != "" && dir != filepath.Clean(cfg.StoreDir) {
			p.otherDir, p.otherDirOf = dir, id
		}
	}
	if p.pins, err = st.pins(); err != nil {
		return nil, err
	}
	if p.publishing, err = st.publishing(); err != nil {
		return nil, err
	}
	if cfg.Replica() {
		p.receiving = replica.Receiving(st.dir)
	}
	if p.storeWant, err = st.storeID(); err != nil {
		return nil, err
	}
	if p.storeWant != "" {
		p.storeFrom = "state_dir " + st.dir
	}
	if p.storeHave, err = readStoreID(cfg.StoreRoot); err != nil {
		return nil, err
	}
	snaps, err := b.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("list snapshots: %w", err)
	}
	var maxID uint64
	for _, sn := range snaps {
		p.snaps[sn.ID] = sn
		p.labels[sn.ID] = sn.Labels
		maxID = max(maxID, sn.ID)
	}
	for _, id := range slices.Sorted(maps.Keys(p.snaps)) {
		sn := p.snaps[id]
		l := sn.Labels
		if g := l[labelGeneration]; g != "" && g != strconv.FormatUint(id, 10) {
			p.kept[id] = fmt.Sprintf("its generation label says %q (renamed by hand?)", g)
			continue
		}
		g, haveManifest := p.stored[id]
		live := stateOf(l) == pubLive
		if haveManifest && l[labelSHA256] != "" && l[labelSHA256] != g.RegistrationSHA256 {
			p.kept[id] = fmt.Sprintf("its registration_sha256 label %s differs from the manifest's %s (state_dir of another server?)", l[labelSHA256], g.RegistrationSHA256)
			continue
		}
		switch {
		case id == p.publishing && !live:
			// The publish that reserved id never made it live.
			p.destroy, p.dropStored = id, haveManifest
		case id == p.receiving && !live && !haveManifest:
			// A replica's receive whose stream arrived but that never went
			// live: the puller's first sync settles it (replica.settle).
			p.received = id
		case id == p.receiving && !live && haveManifest && cfg.Replica() && g.Arrived != nil && g.Arrived.Before(sn.Created):
			// The same, of a missing generation (replica.lostPins): the
			// manifest is the one kept for it, older than this snapshot,
			// which nothing has checked. It stays missing until the
			// first sync settles the receive.
			p.received = id
		case haveManifest:
			p.serve = append(p.serve, id)
			if st.isRetiring(id) {
				p.unretire = append(p.unretire, id)
			}
		case live && cfg.Replica() && l[labelOrigin] == "":
			// Labelled live by a primary, not received here: a replica
			// whose snapshot dir is (or was) the primary's must never
			// adopt, and later destroy, the primary's generations.
			p.kept[id] = fmt.Sprintf("labelled live by the server that published it, but this replica did not receive it (no %q label): "+
				"is snapshot.snapshot_dir another server's? The replica receives no generation %d until it is removed", labelOrigin, id)
		case live:
			p.rebuild = append(p.rebuild, id)
		case cfg.Replica():
			p.kept[id] = fmt.Sprintf("no manifest, its state label is %q and it is not this replica's own unfinished receive (%s): received by hand or under another state_dir? "+
				"The replica receives no generation %d until it is removed", stateOf(l), replica.ReceivingFile(cfg.StateDir), id)
		default:
			p.kept[id] = fmt.Sprintf("no manifest, its state label is %q and it is not this state_dir's unfinished publish (left by a publish under another state_dir?)", stateOf(l))
		}
		if l[labelPinned] == "true" && id != p.destroy {
			if _, ok := p.pins[id]; !ok {
				p.pins[id] = l[labelPinName]
			}
		}
	}
	for _, id := range slices.Sorted(maps.Keys(p.stored)) {
		maxID = max(maxID, id)
		if _, ok := p.snaps[id]; !ok || id == p.received {
			if st.isRetiring(id) {
				p.retired = append(p.retired, id)
			} else {
				p.missing = append(p.missing, id)
			}
		}
	}
	if p.storeWant == "" {
		// The newest generation that names its store.
		ids := append(slices.Clone(p.serve), p.rebuild...)
		slices.Sort(ids)
		for _, id := range slices.Backward(ids) {
			if s := p.labels[id][labelStore]; s != "" {
				p.storeWant, p.storeFrom = s, fmt.Sprintf("the store label of generation %d's snapshot", id)
				break
			}
		}
	}
	next, err := st.nextID(maxID + 1)
	if err != nil {
		return nil, err
	}
	p.nextID = next
	return p, nil
}

// refusal is the error that stops a start, nil if it may go on.
func (p *plan) refusal(cfg Config) error {
	// A missing generation's unfinished receive is here (its manifest
	// kept): the snapshot location is right.
	if hasKey(p.stored, p.received) {
		return nil
	}
	if len(p.stored) > len(p.retired) && len(p.serve) == 0 && len(p.rebuild) == 0 && p.destroy == 0 {
		return fmt.Errorf("none of the %d generations recorded in state_dir %s (%v) has a snapshot in %s: "+
			"is snapshot.snapshot_dir or snapshot.dataset wrong? Nothing was changed. "+
			"If those snapshots are really gone, start with an empty state_dir",
			len(p.stored)-len(p.retired), cfg.StateDir, p.missing, where(cfg))
	}
	return nil
}

// storeMismatch is the error that stops publishing, nil if store.root is
// the store the generations come from (or none was recorded yet).
func (p *plan) storeMismatch(cfg Config) error {
	// A replica publishes nothing: store.root is not used.
	if p.storeWant == "" || p.storeHave == p.storeWant || cfg.Replica() {
		return nil
	}
	have := p.storeHave
	if have == "" {
		have = "none (no " + storeIDFile + ")"
	}
	return fmt.Errorf("%w: store.root %s has identity %s, but the generations come from store %s (recorded in %s); "+
		"publishing it would replace every path builders have. Fix store.root, or start once with --adopt-store to publish this store from now on",
		ErrOtherStore, cfg.StoreRoot, have, p.storeWant, p.storeFrom)
}

// storeDirMismatch is the error that stops a start whose store.dir is
// not the store dir its generations' paths are named in (a mistyped
// store.dir would publish nothing, as no path verifies, and tell builders
// and replicas a store dir that makes them refuse every generation), nil
// when they agree.
func (p *plan) storeDirMismatch(cfg Config) error {
	if p.otherDir == "" {
		return nil
	}
	return fmt.Errorf("store.dir is %s, but the paths of generation %d (state_dir %s) are in %s: is store.dir mistyped? Nothing was changed",
		cfg.StoreDir, p.otherDirOf, cfg.StateDir, p.otherDir)
}

// registrationStoreDir returns the store dir of the first path of the
// registration file at name ("" when it cannot tell: no file, no path).
func registrationStoreDir(name string) string {
	f, err := os.Open(name)
	if err != nil {
		return ""
	}
	defer f.Close()
	line, err := bufio.NewReaderSize(f, 4096).ReadString('\n')
	if err != nil && line == "" {
		return ""
	}
	line = strings.TrimSpace(line)
	if !strings.HasPrefix(line, "/") || !strings.Contains(line[1:], "/") {
		return ""
	}
	return filepath.Dir(line)
}

// ErrOtherStore means store.root is not the central store the generations
// were published from; publishing is refused.
var ErrOtherStore = errors.New("store.root is another Nix store")

// hasGenerations reports whether any generation exists, as a manifest or
// as a snapshot: then the NFS handle key is no longer optional.
func (p *plan) hasGenerations() bool { return len(p.stored) > 0 || len(p.snaps) > 0 }

// Report lines for --check-config.
func (p *plan) report(cfg Config) []string {
	var out []string
	add := func(format string, args ...any) { out = append(out, fmt.Sprintf(format, args...)) }
	add("snapshots in %s: %d; manifests in state_dir %s: %d", where(cfg), len(p.snaps), cfg.StateDir, len(p.stored))
	if len(p.serve) > 0 {
		add("would serve generations %v", p.serve)
	}
	if len(p.rebuild) > 0 {
		add("would rebuild manifests and registrations of generations %v from their snapshots' labels and db.sqlite, and serve them", p.rebuild)
	}
	if len(p.retired) > 0 {
		add("would finish retiring generations %v: retention destroyed their snapshots and was stopped before it removed their manifests", p.retired)
	}
	if len(p.unretire) > 0 {
		add("generations %v were being retired when the server stopped, before their snapshots were destroyed: served again; retention decides anew", p.unretire)
	}
	if len(p.missing) > 0 && p.refusal(cfg) == nil {
		// The start goes ahead (invariant 8: the previous good state, the
		// rest, stays served); only all of them missing refuses it.
		add("WARNING: generations %v have a manifest but no snapshot in %s: a start serves the rest and reports these as missing "+
			"(log, strata status, strata generations) until `strata generations forget N --yes-forget N`", p.missing, where(cfg))
	}
	for _, id := range slices.Sorted(maps.Keys(p.kept)) {
		add("WARNING: snapshot %s is kept but not served: %s", snapshot.Name(id), p.kept[id])
	}
	if p.received != 0 {
		add("snapshot %s is this replica's own unfinished receive (%s): the first sync makes it live if its registration matches the primary's manifest, and destroys it otherwise",
			snapshot.Name(p.received), replica.ReceivingFile(cfg.StateDir))
	}
	if p.destroy != 0 {
		add("would destroy snapshot %s: the unfinished publish reserved in state_dir, never live", snapshot.Name(p.destroy))
	}
	if cfg.Replica() {
		// A replica takes the primary's ids and publishes nothing: neither
		// the next id nor store.root's identity applies.
		return out
	}
	add("next generation id: %d", p.nextID)
	switch {
	case p.storeWant == "" && p.storeHave == "":
		add("store identity: none yet; the first publish gives store.root %s one (%s)", cfg.StoreRoot, storeIDFile)
	case p.storeWant == "":
		add("store identity: store.root has %s; no generation names one yet", p.storeHave)
	case p.storeHave == p.storeWant:
		add("store identity: %s, as the generations expect", p.storeHave)
	default:
		add("ERROR: %v", p.storeMismatch(cfg))
	}
	return out
}

// apply carries the plan out: destroys the unfinished publish, rebuilds
// manifests of adopted snapshots, writes missing labels and the merged
// pins, and fills s.gens and s.missing.
func (s *Server) apply(ctx context.Context, p *plan) error {
	if p.destroy != 0 {
		s.log.Warn("destroying the snapshot of an unfinished publish (never live)", "snapshot", snapshot.Name(p.destroy))
		if err := s.backend.Destroy(ctx, p.destroy); err != nil && !errors.Is(err, snapshot.ErrNotFound) {
			return fmt.Errorf("destroy unfinished snapshot %s: %w", snapshot.Name(p.destroy), err)
		}
		if p.dropStored {
			if err := s.state.removeGeneration(p.destroy); err != nil {
				return err
			}
		}
	}
	if p.publishing != 0 {
		if err := s.state.clearPublishing(); err != nil {
			return err
		}
	}
	for _, id := range p.retired {
		s.log.Info("finished retiring generation: retention destroyed its snapshot before the server stopped", "generation", id)
		if err := s.state.removeGeneration(id); err != nil {
			return err
		}
	}
	for _, id := range p.unretire {
		s.log.Warn("generation was being retired when the server stopped, its snapshot is still there: serving it again", "generation", id)
		if err := s.state.clearRetiring(id); err != nil {
			return err
		}
	}
	for _, id := range p.serve {
		sn := p.snaps[id]
		s.gens[id] = &generation{Generation: p.stored[id], path: sn.Path}
	}
	for _, id := range p.rebuild {
		sn := p.snaps[id]
		g, text, rows, err := rebuildManifest(ctx, sn, s.cfg.StoreDir)
		if err != nil {
			s.log.Error("cannot rebuild generation from its snapshot; kept, not served", "snapshot", sn.Name, "err", err)
			s.problems = append(s.problems, fmt.Sprintf("snapshot %s kept, not served: %v", sn.Name, err))
			continue
		}
		if err := s.state.writeGeneration(g, text, rows); err != nil {
			return err
		}
		s.log.Info("rebuilt generation from its snapshot", "generation", id, "paths", g.Paths, "registration_sha256", g.RegistrationSHA256)
		s.gens[id] = &generation{Generation: g, path: sn.Path, adopted: true}
	}
	for _, id := range slices.Sorted(maps.Keys(p.kept)) {
		s.log.Warn("snapshot kept but not served", "snapshot", snapshot.Name(id), "why", p.kept[id])
		s.problems = append(s.problems, fmt.Sprintf("snapshot %s kept, not served: %s", snapshot.Name(id), p.kept[id]))
	}
	for _, id := range p.missing {
		g := p.stored[id]
		if id == p.received { // logPlan says what becomes of it
			s.log.Warn("generation missing until the first sync checks the snapshot received for it", "generation", id)
		} else {
			s.log.Error("generation has no snapshot; kept, not served, until `strata generations forget`", "generation", id, "where", where(s.cfg))
		}
		s.missing[id] = &generation{Generation: g}
	}
	// Pins: pins.json and pin labels together, only for generations kept.
	pins := map[uint64]string{}
	for id, name := range p.pins {
		if s.gens[id] != nil || s.missing[id] != nil {
			pins[id] = name
		}
	}
	if old, _ := s.state.pins(); !maps.Equal(old, pins) {
		if err := s.state.setPins(pins); err != nil {
			return err
		}
	}
	for id, g := range s.gens {
		g.PinName, g.Pinned = pins[id], hasKey(pins, id)
	}
	for id, g := range s.missing {
		g.PinName, g.Pinned = pins[id], hasKey(pins, id)
	}
	// Labels of generations taken before labels existed, or whose pin
	// changed while a label write failed.
	for _, id := range slices.Sorted(maps.Keys(s.gens)) {
		g := s.gens[id]
		store := p.labels[id][labelStore]
		if store == "" {
			store = p.storeWant
		}
		if d := labelDiff(p.labels[id], liveLabels(g.Generation, store)); len(d) > 0 {
			s.log.Info("writing labels onto snapshot", "snapshot", g.Snapshot, "labels", d)
			if err := s.backend.SetLabels(ctx, id, d); err != nil {
				s.log.Error("write labels onto snapshot", "snapshot", g.Snapshot, "err", err)
			}
		}
	}
	if err := s.state.setNextID(p.nextID); err != nil {
		return err
	}
	if recorded, err := s.state.storeID(); err != nil {
		return err
	} else if recorded == "" && p.storeWant != "" {
		if err := s.state.setStoreID(p.storeWant); err != nil {
			return err
		}
	}
	return nil
}

// rebuildManifest makes generation sn.ID's manifest, registration and path
// rows from its snapshot alone: the labels and the snapshot's own db.sqlite.
func rebuildManifest(ctx context.Context, sn snapshot.Snapshot, storeDir string) (api.Generation, []byte, []byte, error) {
	rows, err := nixstore.ReadDBRows(ctx, DBDir(sn.Path))
	if err != nil {
		return api.Generation{}, nil, nil, fmt.Errorf("read snapshot db: %w", err)
	}
	infos := rows.Infos()
	sum, text, err := registrationOf(infos)
	if err != nil {
		return api.Generation{}, nil, nil, err
	}
	if want := sn.Labels[labelSHA256]; want != "" && want != sum {
		return api.Generation{}, nil, nil, fmt.Errorf("registration sha256 %s differs from its label %s", sum, want)
	}
	g := api.Generation{ID: sn.ID, Snapshot: sn.Name, Created: sn.Created.UTC(), Paths: len(infos),
		RegistrationSHA256: sum, MountPath: fmt.Sprintf("/gen/%d", sn.ID), Origin: sn.Labels[labelOrigin]}
	if ps := sn.Labels[labelParent]; ps != "" {
		if g.Parent, err = strconv.ParseUint(ps, 10, 64); err != nil {
			return api.Generation{}, nil, nil, fmt.Errorf("parent label %q: not a generation id", ps)
		}
	}
	for _, in := range infos {
		g.NarBytes += in.NarSize
	}
	var rowsFile bytes.Buffer
	if err := nixstore.WriteRows(&rowsFile, nixstore.RowsHeader{StoreDir: storeDir, Generation: sn.ID}, rows); err != nil {
		return api.Generation{}, nil, nil, err
	}
	return g, text, rowsFile.Bytes(), nil
}

func logPlan(log *slog.Logger, p *plan) {
	if p.received != 0 {
		log.Info("found this replica's own unfinished receive; the first sync makes it live or destroys it", "snapshot", snapshot.Name(p.received))
	}
	if len(p.rebuild) > 0 {
		log.Info("state_dir lacks generations that snapshots say are live; rebuilding them", "generations", p.rebuild)
	}
}
