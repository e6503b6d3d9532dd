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
// in it, then stores the manifest (with origin and arrival time), the
// registration and the path rows, and exports it. The first generation
// received records the primary's store identity (the snapshot's store
// label); a snapshot of another store is refused.
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
	var rowsFile bytes.Buffer
	if err := nixstore.WriteRows(&rowsFile, nixstore.RowsHeader{StoreDir: s.cfg.StoreDir, Generation: g.ID}, rows); err != nil {
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
	if err := s.state.writeGeneration(ng, text, rowsFile.Bytes()); err != nil {
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
