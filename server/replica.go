package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/strata-nix/strata/api"
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

// AddReceived makes snap, a snapshot received from the primary, live as
// generation g.ID: it reads the snapshot's own DB, refuses it (changing
// nothing; the caller destroys the snapshot) unless its registration's
// sha256 equals the primary's manifest g and every registered path exists
// in it, then stores the manifest (with origin and arrival time) and the
// registration, and exports it. The path rows (the same DB rows as the
// builders' rows file) are written right after, in the background
// (writeRowsLater): requests for them wait for that write. The first
// generation received records the primary's store identity (the snapshot's
// store label); a snapshot of another store is refused.
func (s *Server) AddReceived(ctx context.Context, g api.Generation, snap snapshot.Snapshot, origin string) (api.Generation, error) {
	if !s.cfg.Replica() {
		return api.Generation{}, errors.New("add received generation: this server is not a replica (replica.of, replica.from_cluster)")
	}
	if snap.ID != g.ID {
		return api.Generation{}, fmt.Errorf("add received generation %d: snapshot is %s", g.ID, snap.Name)
	}
	rows, err := nixstore.ReadDBRows(ctx, DBDir(snap.Path))
	if err != nil {
		return api.Generation{}, fmt.Errorf("received generation %d: read snapshot db: %w", g.ID, err)
	}
	infos := rows.Infos()
	sum, text, err := registrationOf(infos)
	if err != nil {
		return api.Generation{}, err
	}
	if sum != g.RegistrationSHA256 {
		return api.Generation{}, fmt.Errorf("received generation %d: registration sha256 %s differs from the primary's manifest %s: not made live", g.ID, sum, g.RegistrationSHA256)
	}
	if err := nixstore.Verify(PhysicalStore(snap.Path), s.cfg.StoreDir, infos); err != nil {
		return api.Generation{}, fmt.Errorf("received generation %d: %w", g.ID, err)
	}
	if err := nixstore.CheckRows(s.cfg.StoreDir, rows); err != nil {
		return api.Generation{}, fmt.Errorf("received generation %d: %w", g.ID, err)
	}
	now := time.Now().UTC()
	ng := api.Generation{ID: g.ID, Snapshot: snap.Name, Created: g.Created, Parent: g.Parent, Paths: len(infos),
		RegistrationSHA256: sum, MountPath: fmt.Sprintf("/gen/%d", g.ID), Origin: origin, Arrived: &now}
	for _, in := range infos {
		ng.NarBytes += in.NarSize
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.gens[g.ID]; ok {
		return api.Generation{}, fmt.Errorf("received generation %d: %w", g.ID, snapshot.ErrExists)
	}
	store := snap.Labels[labelStore]
	if s.storeID != "" && store != "" && store != s.storeID {
		return api.Generation{}, fmt.Errorf("received generation %d comes from store %s, but this replica's generations come from store %s (a primary of another cluster?): not made live", g.ID, store, s.storeID)
	}
	if err := s.state.writeGeneration(ng, text, nil); err != nil {
		return api.Generation{}, err
	}
	// Bind what this replica knows to its copy, so that it too can rebuild
	// its state dir from its snapshots (btrfs send carries only the labels
	// given at creation, which say "publishing").
	if store == "" {
		store = s.storeID
	}
	if err := s.backend.SetLabels(ctx, g.ID, liveLabels(ng, store)); err != nil {
		s.log.Warn("label received snapshot; the next start tries again", "snapshot", snap.Name, "err", err)
	}
	if s.storeID == "" && store != "" {
		if err := s.state.setStoreID(store); err != nil {
			s.state.removeGeneration(g.ID)
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
			s.state.removeGeneration(g.ID)
			return api.Generation{}, fmt.Errorf("received generation %d: export: %w", g.ID, err)
		}
	}
	s.gens[g.ID] = &generation{Generation: ng, path: snap.Path}
	s.writeRowsLater(g.ID, func() (*nixstore.Rows, error) { return rows, nil })
	s.swap()
	s.log.Info("received generation is live", "generation", g.ID, "origin", origin, "paths", ng.Paths)
	return ng, nil
}

// SetUpstreamPinned tells a replica which generations its primary pins:
// retention keeps them as if they were pinned here.
func (s *Server) SetUpstreamPinned(ids map[uint64]bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.upstreamPinned = ids
}

// writeRowsLater writes generation id's path rows (a rows file of what
// load returns) in the background, joined by Shutdown: encoding and
// compressing every row of a large store takes about as long as
// everything else a replica does to make a received generation live, and
// none of it is needed for that. OpenRows and RowsDelta wait for the
// write. If it fails (a full state dir) or the process dies first, the
// generation has no rows until the daemon's next sync (FinishRows) or the
// next start (finishRows) writes them; meanwhile builders import from its
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
		s.writeRowsLater(g.ID, func() (*nixstore.Rows, error) {
			rows, err := nixstore.ReadDBRows(s.life, DBDir(g.path))
			if err != nil {
				return nil, err
			}
			sum, _, err := registrationOf(rows.Infos())
			if err != nil {
				return nil, err
			}
			if sum != g.RegistrationSHA256 {
				return nil, fmt.Errorf("registration sha256 %s differs from the manifest's %s", sum, g.RegistrationSHA256)
			}
			return rows, nil
		})
	}
}
