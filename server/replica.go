package server

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/phase"
	"github.com/strata-nix/strata/nixstore"
	"github.com/strata-nix/strata/snapshot"
)

// A replica server (replica.of set) publishes nothing: package
// server/replica pulls the primary's generations as snapshot streams and
// hands each received snapshot to AddReceived, which makes it live under
// the primary's id once its registration matches the primary's manifest.

// ErrReplica is returned by Publish on a replica.
var ErrReplica = errors.New("this server is a replica and publishes nothing")

// StoreID returns the identity of the central store the generations come
// from ("" before the first generation).
func (s *Server) StoreID() string {
	if id := s.liveStoreID.Load(); id != nil {
		return *id // never waits for a publish
	}
	return ""
}

// Backend returns the server's snapshot backend.
func (s *Server) Backend() snapshot.Backend { return s.backend }

// PrepareReceived does, while generation g's stream is still arriving,
// the part of AddReceived's check that needs no snapshot: it applies d
// (the primary's registration delta to g.ID from a generation live here:
// GET /v1/generations/N/delta?from=M) to that generation's registration,
// and when the result's sha256 equals g's manifest it stages that
// registration (written and synced into the state dir) for AddReceived.
// Otherwise it stages nothing, and AddReceived reads the registration from
// the snapshot's own DB as without a delta. Without parsing a record, this
// takes tens of milliseconds at 100,000 paths where reading the DB takes
// hundreds. A registration whose sha256 equals the manifest's is the
// primary's, which passed nixstore.Verify (closure complete, paths well
// formed) when the primary published it.
func (s *Server) PrepareReceived(ctx context.Context, g api.Generation, d api.Delta) {
	end := phase.Begin(ctx, "prepare: registration from the primary's delta, sha256, staged")
	defer end()
	s.dropStage()
	reg, err := s.registrationFromDelta(ctx, g, d)
	if err != nil {
		s.log.Warn("registration from the primary's delta: the received snapshot's db gives the registration instead", "generation", g.ID, "from", d.From, "err", err)
		return
	}
	endStage := phase.Begin(ctx, "prepare: stage the registration (write, fsync)")
	err = s.state.stageRegistration(reg.text)
	endStage()
	if err != nil {
		s.log.Warn("stage registration; the received snapshot's db gives the registration instead", "generation", g.ID, "err", err)
		return
	}
	reg.text = nil // on disk now
	s.stageMu.Lock()
	s.staged = &stagedReg{id: g.ID, reg: reg}
	s.stageMu.Unlock()
}

// DropPrepared removes what PrepareReceived staged for generation id if
// AddReceived did not take it (the receive failed first).
func (s *Server) DropPrepared(id uint64) {
	s.stageMu.Lock()
	st := s.staged
	if st != nil && st.id == id {
		s.staged = nil
	}
	s.stageMu.Unlock()
	if st != nil && st.id == id {
		s.state.dropStaged()
	}
}

// stagedReg is a registration PrepareReceived staged for generation id.
type stagedReg struct {
	id  uint64
	reg receivedReg
}

// takeStage returns the registration staged for generation id, if any,
// and forgets it; the caller removes it from disk (writeStagedGeneration
// moves it into place, dropStaged removes it).
func (s *Server) takeStage(id uint64) (receivedReg, bool) {
	s.stageMu.Lock()
	defer s.stageMu.Unlock()
	st := s.staged
	s.staged = nil
	if st == nil {
		return receivedReg{}, false
	}
	if st.id != id { // left by a receive that failed
		s.state.dropStaged()
		return receivedReg{}, false
	}
	return st.reg, true
}

// dropStage removes a staged registration (a receive that failed before
// AddReceived).
func (s *Server) dropStage() {
	s.stageMu.Lock()
	st := s.staged
	s.staged = nil
	s.stageMu.Unlock()
	if st != nil {
		s.state.dropStaged()
	}
}

// AddReceived makes snap, a snapshot received from the primary, live as
// generation g.ID, or refuses it (changing nothing; the caller destroys the
// snapshot). Its registration's sha256 must equal the primary's manifest g,
// and every path it registers must have an entry in the snapshot's store.
// The registration is the one PrepareReceived staged for g.ID, if any (then
// the paths the delta added are looked up, as the rest were in the store of
// the base the stream was applied to, checked when it went live here);
// otherwise it is read from the snapshot's own DB, whose rows are then
// checked (CheckRows) too, as is the closure (nixstore.Verify). It then
// stores the manifest (with origin and arrival time) and the registration,
// and exports it. The path rows (the same DB rows as the builders' rows
// file) are written right after, in the background (writeRowsLater):
// requests for them wait for that write. With a staged registration, that
// write first checks that the snapshot's own DB gives the same
// registration (and CheckRows): a snapshot whose DB disagrees gets no rows
// file, and builders import from the checked registration. The first
// generation received records the primary's store identity (the
// snapshot's store label); a snapshot of another store is refused.
func (s *Server) AddReceived(ctx context.Context, g api.Generation, snap snapshot.Snapshot, origin string) (api.Generation, error) {
	if !s.cfg.Replica() {
		return api.Generation{}, errors.New("add received generation: this server is not a replica (replica.of, replica.from_cluster)")
	}
	if snap.ID != g.ID {
		return api.Generation{}, fmt.Errorf("add received generation %d: snapshot is %s", g.ID, snap.Name)
	}
	reg, staged := s.takeStage(g.ID)
	kept := false // the staged registration moved into place
	defer func() {
		if staged && !kept {
			s.state.dropStaged()
		}
	}()
	if staged && reg.sum != g.RegistrationSHA256 {
		staged = false
		s.state.dropStaged()
	}
	if staged {
		// The staged registration is the delta's from a generation live
		// here, and snap is that generation's snapshot with the primary's
		// stream of what changed applied: the paths it kept were in the
		// base's store, checked when the base went live here, so only
		// the added ones are checked. btrfs receive made each of them
		// through the VFS, so looking them up by name finds them cached
		// (2 ms for 1,000); zfs receive writes below it, and a lookup
		// of each loads it from the pool (4 s for 1,000 in the VM
		// tier's guest), where one read of the store directory took
		// 0.4 s.
		end := phase.Begin(ctx, "live: each added path in the store dir")
		var err error
		if s.backend.Kind() == "btrfs" {
			err = reg.names.VerifyAdded(PhysicalStore(snap.Path), reg.added)
		} else {
			err = reg.names.Verify(PhysicalStore(snap.Path))
		}
		end()
		if err != nil {
			return api.Generation{}, fmt.Errorf("received generation %d: %w", g.ID, err)
		}
	} else {
		var err error
		if reg, err = s.registrationFromDB(ctx, g, snap); err != nil {
			return api.Generation{}, err
		}
	}
	sum, text := reg.sum, reg.text
	now := time.Now().UTC()
	ng := api.Generation{ID: g.ID, Snapshot: snap.Name, Created: g.Created, Parent: g.Parent, Paths: reg.paths, NarBytes: reg.narBytes,
		RegistrationSHA256: sum, MountPath: fmt.Sprintf("/gen/%d", g.ID), Origin: origin, Arrived: &now}

	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.gens[g.ID]; ok {
		return api.Generation{}, fmt.Errorf("received generation %d: %w", g.ID, snapshot.ErrExists)
	}
	store := snap.Labels[labelStore]
	if s.storeID != "" && store != "" && store != s.storeID {
		return api.Generation{}, fmt.Errorf("received generation %d comes from store %s, but this replica's generations come from store %s (a primary of another cluster?): not made live", g.ID, store, s.storeID)
	}
	// A generation whose snapshot was lost here (missing: its manifest
	// kept) comes back, when the primary pins it, with the same content
	// only; a pin it had here stays.
	lost := s.missing[g.ID]
	if lost != nil {
		if lost.RegistrationSHA256 != g.RegistrationSHA256 {
			return api.Generation{}, fmt.Errorf("received generation %d has registration sha256 %s, but the manifest kept here for its missing snapshot says %s: not made live (strata generations forget %d drops that manifest)",
				g.ID, g.RegistrationSHA256, lost.RegistrationSHA256, g.ID)
		}
		ng.Pinned, ng.PinName = lost.Pinned, lost.PinName
	}
	end := phase.Begin(ctx, "live: write manifest and registration")
	write := func() error { return s.state.writeGeneration(ng, text, nil) }
	if staged {
		write = func() error { return s.state.writeStagedGeneration(ng) }
	}
	// undo takes back what write stored when a later step fails: for a
	// lost generation, the manifest kept for it is put back (it still
	// names the generation missing, and a start keeps the pin made here
	// only for a generation it knows).
	undo := func() { s.state.removeGeneration(g.ID) }
	replaced := func() {} // drops the manifest kept for a lost generation, once live
	if lost != nil {
		write = func() error {
			restore, done, err := s.state.replaceGeneration(ng, text, staged)
			if err == nil {
				replaced = done
				undo = func() {
					if err := restore(); err != nil {
						s.log.Error("put back the manifest kept for a missing generation", "generation", g.ID, "err", err)
					}
				}
			}
			return err
		}
	}
	if err := write(); err != nil {
		return api.Generation{}, err
	}
	kept = true
	end()
	end = phase.Begin(ctx, "live: store id, next id, export")
	// Bind what this replica knows to its copy, so that it too can rebuild
	// its state dir from its snapshots (btrfs send carries only the labels
	// given at creation, which say "publishing").
	if store == "" {
		store = s.storeID
	}
	// After going live, in the background (joined by Shutdown): the
	// manifest written above is the record, and a start re-labels from it
	// (reconcile) if this did not happen; on ZFS each label is a zfs(8)
	// call, a second of the sync in a slow guest.
	labels := liveLabels(ng, store)
	s.detached.Add(1)
	go func() {
		defer s.detached.Done()
		if err := s.backend.SetLabels(context.WithoutCancel(s.life), g.ID, labels); err != nil {
			s.log.Warn("label received snapshot; the next start tries again", "snapshot", snap.Name, "err", err)
		}
	}()
	if s.storeID == "" && store != "" {
		if err := s.state.setStoreID(store); err != nil {
			undo()
			return api.Generation{}, err
		}
		s.storeID = store
	}
	if next, err := s.state.nextID(g.ID + 1); err == nil {
		if err := s.state.setNextID(next); err != nil {
			s.log.Warn("record next generation id", "err", err)
		}
	}
	if s.export != nil {
		if err := s.export.Add(g.ID, PhysicalStore(snap.Path)); err != nil {
			undo()
			return api.Generation{}, fmt.Errorf("received generation %d: export: %w", g.ID, err)
		}
	}
	end()
	if lost != nil {
		replaced()
		s.infoMu.Lock()
		delete(s.missing, g.ID)
		s.infoMu.Unlock()
	}
	s.gens[g.ID] = &generation{Generation: ng, path: snap.Path}
	if reg.rows != nil {
		s.writeRowsLater(g.ID, func() (*nixstore.Rows, error) { return reg.rows, nil })
	} else {
		s.writeRowsLater(g.ID, func() (*nixstore.Rows, error) { return s.snapshotRows(context.WithoutCancel(s.life), snap.Path, sum) })
	}
	s.swap()
	s.log.Info("received generation is live", "generation", g.ID, "origin", origin, "paths", ng.Paths)
	return ng, nil
}

// receivedReg is a received generation's registration, checked.
type receivedReg struct {
	text     []byte
	sum      string // hex sha256 of text: the manifest's
	paths    int
	names    *nixstore.StoreNames // the delta's added paths (the DB gives rows instead)
	added    []string             // the delta's added paths
	narBytes uint64
	rows     *nixstore.Rows // the snapshot's DB rows, if read already
}

// registrationFromDelta applies d to the registration of the generation it
// starts from and checks that the result's sha256 is g's manifest's. The
// text is never parsed, only framed (nixstore.ApplyDelta).
func (s *Server) registrationFromDelta(ctx context.Context, g api.Generation, d api.Delta) (receivedReg, error) {
	if d.To != g.ID {
		return receivedReg{}, fmt.Errorf("the delta leads to generation %d", d.To)
	}
	if _, ok := s.Generation(d.From); !ok {
		return receivedReg{}, fmt.Errorf("generation %d: %w", d.From, ErrUnknownGeneration)
	}
	end := phase.Begin(ctx, "prepare: read the base's registration")
	base, err := s.state.readRegistration(d.From)
	end()
	if err != nil {
		return receivedReg{}, err
	}
	end = phase.Begin(ctx, "prepare: apply the delta, sha256")
	text, err := nixstore.ApplyDelta(base, []byte(d.Added), d.Removed)
	if err != nil {
		end()
		return receivedReg{}, err
	}
	sum := sha256.Sum256(text)
	end()
	if got := hex.EncodeToString(sum[:]); got != g.RegistrationSHA256 {
		return receivedReg{}, fmt.Errorf("registration sha256 %s differs from the manifest's %s", got, g.RegistrationSHA256)
	}
	end = phase.Begin(ctx, "prepare: count the paths, the added ones' names")
	defer end()
	paths, nar, err := nixstore.RegistrationCount(text)
	if err != nil {
		return receivedReg{}, err
	}
	// Only the added paths are named: the others are the base's, whose
	// names were checked when it went live here.
	added, _, err := nixstore.RegistrationPaths([]byte(d.Added))
	if err != nil {
		return receivedReg{}, fmt.Errorf("the delta's added paths: %w", err)
	}
	return receivedReg{text: text, sum: g.RegistrationSHA256, paths: paths, names: nixstore.NewStoreNames(s.cfg.StoreDir, added), added: added, narBytes: nar}, nil
}

// registrationFromDB reads the registration from the received snapshot's
// own DB and checks it as registrationFromDelta does, and the DB's rows
// (CheckRows) and the closure (nixstore.Verify) besides.
func (s *Server) registrationFromDB(ctx context.Context, g api.Generation, snap snapshot.Snapshot) (receivedReg, error) {
	end := phase.Begin(ctx, "live: read the snapshot's db")
	rows, err := nixstore.ReadDBRows(ctx, DBDir(snap.Path))
	end()
	if err != nil {
		return receivedReg{}, fmt.Errorf("received generation %d: read snapshot db: %w", g.ID, err)
	}
	end = phase.Begin(ctx, "live: registration text and sha256")
	infos := rows.Infos()
	sum, text, err := registrationOf(infos)
	end()
	if err != nil {
		return receivedReg{}, err
	}
	if sum != g.RegistrationSHA256 {
		return receivedReg{}, fmt.Errorf("received generation %d: registration sha256 %s differs from the primary's manifest %s: not made live", g.ID, sum, g.RegistrationSHA256)
	}
	end = phase.Begin(ctx, "live: every registered path in the store dir")
	if err := nixstore.Verify(PhysicalStore(snap.Path), s.cfg.StoreDir, infos); err != nil {
		return receivedReg{}, fmt.Errorf("received generation %d: %w", g.ID, err)
	}
	end()
	end = phase.Begin(ctx, "live: check rows")
	if err := nixstore.CheckRows(s.cfg.StoreDir, rows); err != nil {
		return receivedReg{}, fmt.Errorf("received generation %d: %w", g.ID, err)
	}
	end()
	reg := receivedReg{text: text, sum: sum, paths: len(infos), rows: rows}
	for _, in := range infos {
		reg.narBytes += in.NarSize
	}
	return reg, nil
}

// snapshotRows reads the path rows of the snapshot at path from its own DB
// and checks them: their registration's sha256 must be sum (the
// manifest's, which the registration served for it matched) and CheckRows
// must pass. Builders get no rows from a snapshot whose DB disagrees.
func (s *Server) snapshotRows(ctx context.Context, path, sum string) (*nixstore.Rows, error) {
	rows, err := nixstore.ReadDBRows(ctx, DBDir(path))
	if err != nil {
		return nil, err
	}
	got, _, err := registrationOf(rows.Infos())
	if err != nil {
		return nil, err
	}
	if got != sum {
		return nil, fmt.Errorf("the snapshot's own db gives registration sha256 %s, not the manifest's %s (the registration served was checked against the manifest; these rows are not served)", got, sum)
	}
	if err := nixstore.CheckRows(s.cfg.StoreDir, rows); err != nil {
		return nil, err
	}
	return rows, nil
}

// SetUpstreamPinned tells a replica which generations its primary pins,
// with their pin names: retention keeps them as if they were pinned here,
// and the live generations show them as pinned (PinFrom "primary").
func (s *Server) SetUpstreamPinned(pins map[uint64]string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	changed := s.upstreamPinned == nil || !maps.Equal(s.upstreamPinned, pins)
	s.upstreamPinned = pins
	if changed {
		s.swap()
	}
}

// maxRowsWrites is how many background rows writes (writeRowsLater) run at
// once; the others wait for a slot. Each holds a generation's rows in
// memory (hundreds of MB at a million paths), and a replica that lacks the
// rows of many generations (a full state dir, then room again: FinishRows)
// must not read all their snapshots' DBs at once.
const maxRowsWrites = 2

// rowsSlot takes one of the maxRowsWrites slots, waiting for it; the
// returned func gives it back.
func (s *Server) rowsSlot() func() {
	s.pendMu.Lock()
	if s.rowsSlots == nil {
		s.rowsSlots = make(chan struct{}, maxRowsWrites)
	}
	slots := s.rowsSlots
	s.pendMu.Unlock()
	slots <- struct{}{}
	return func() { <-slots }
}

// writeRowsLater writes generation id's path rows (a rows file of what
// load returns) in the background, joined by Shutdown: encoding and
// compressing every row of a large store takes about as long as
// everything else a replica does to make a received generation live, and
// none of it is needed for that. At most maxRowsWrites such writes run at
// once. OpenRows and RowsDelta wait for the write. If it fails (a full
// state dir) or the process dies first, the generation has no rows until
// the daemon's next sync (FinishRows) or the next start (finishRows)
// writes them; meanwhile builders import from its
// registration, as for a generation of an older strata.
func (s *Server) writeRowsLater(id uint64, load func() (*nixstore.Rows, error)) {
	done := make(chan struct{})
	s.pendMu.Lock()
	if s.rowsPending == nil {
		s.rowsPending = map[uint64]chan struct{}{}
	}
	s.rowsPending[id] = done
	s.pendMu.Unlock()
	s.detached.Add(1)
	go func() {
		defer s.detached.Done()
		defer func() {
			s.pendMu.Lock()
			delete(s.rowsPending, id)
			s.pendMu.Unlock()
			close(done)
		}()
		err := func() error {
			defer s.rowsSlot()()
			rows, err := load()
			if err != nil {
				return err
			}
			var b bytes.Buffer
			if err := nixstore.WriteRows(&b, nixstore.RowsHeader{StoreDir: s.cfg.StoreDir, Generation: id}, rows); err != nil {
				return err
			}
			return s.state.writeRows(id, b.Bytes())
		}()
		if err != nil {
			s.log.Error("write path rows; builders import this generation from its registration until they are written (after the next sync, or at the next start)", "generation", id, "err", err)
		}
	}()
}

// waitRows waits for a background write of generation id's rows.
func (s *Server) waitRows(id uint64) {
	s.pendMu.Lock()
	done := s.rowsPending[id]
	s.pendMu.Unlock()
	if done != nil {
		<-done
	}
}

// FinishRows is finishRows for a running replica: the daemon calls it
// after each sync, so that rows whose write failed (a full state dir) are
// written once there is room again, without a restart.
func (s *Server) FinishRows() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.finishRows()
}

// finishRows writes, in the background, the path rows a replica's
// generation lacks because the process ended before writeRowsLater did,
// or the write failed, from the snapshot's own DB, once its registration
// is checked again against the manifest.
func (s *Server) finishRows() {
	if !s.cfg.Replica() {
		return
	}
	for _, g := range s.sorted() {
		s.pendMu.Lock()
		_, pending := s.rowsPending[g.ID]
		s.pendMu.Unlock()
		if g.Origin == "" || pending || s.state.hasRows(g.ID) {
			continue
		}
		s.writeRowsLater(g.ID, func() (*nixstore.Rows, error) { return s.snapshotRows(s.life, g.path, g.RegistrationSHA256) })
	}
}
