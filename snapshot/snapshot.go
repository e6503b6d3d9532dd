// Package snapshot defines how strata takes, lists and destroys the immutable
// snapshots of the central store that become generations.
//
// A Backend owns one central store: a single ZFS dataset or btrfs subvolume
// whose root holds both store/ and var/nix/db/, so that one snapshot captures
// the files and the Nix database together. Generation N lives in the snapshot
// named Name(N) ("strata-N").
package snapshot

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Prefix starts the name of every snapshot strata owns; other snapshots of the
// same dataset or subvolume are never listed or destroyed.
const Prefix = "strata-"

var (
	// ErrNotFound means no snapshot of that generation exists.
	ErrNotFound = errors.New("snapshot not found")
	// ErrExists means a snapshot of that generation exists already.
	ErrExists = errors.New("snapshot exists")
	// ErrUnsupported means the central store is not on a filesystem, dataset
	// or subvolume layout the backend can snapshot.
	ErrUnsupported = errors.New("unsupported store layout")
)

// Snapshot is one read-only snapshot of the central store.
type Snapshot struct {
	// ID is the generation number N (>0).
	ID uint64
	// Name is Name(ID), the backend's name for it ("strata-N").
	Name string
	// Path is a directory on this host where the snapshot's root (the
	// snapshot of the central store root, holding store/ and var/nix/db/)
	// is readable. It is read-only: every write fails with EROFS.
	Path string
	// Created is when the snapshot was taken.
	Created time.Time
}

// Backend takes and manages the snapshots of one central store.
//
// Implementations are safe for concurrent use by one process. They never
// touch snapshots whose names do not start with Prefix.
type Backend interface {
	// Kind names the backend: "btrfs" or "zfs".
	Kind() string
	// Create takes an atomic, read-only snapshot of the central store as
	// generation id and makes it readable at the returned Snapshot's Path.
	// It fails with ErrExists if that generation's snapshot exists.
	Create(ctx context.Context, id uint64) (Snapshot, error)
	// List returns every strata snapshot, ordered by ID ascending, each
	// readable at its Path (a backend that serves snapshots from explicit
	// mounts makes sure they are mounted).
	List(ctx context.Context) ([]Snapshot, error)
	// Destroy removes generation id's snapshot (and its mount, if any).
	// It fails with ErrNotFound if there is none.
	Destroy(ctx context.Context, id uint64) error
}

// Name returns the snapshot name of generation id.
func Name(id uint64) string { return Prefix + strconv.FormatUint(id, 10) }

// ParseName returns the generation id named by a snapshot name, or ok=false
// if the name is not a strata snapshot name.
func ParseName(name string) (id uint64, ok bool) {
	rest, found := strings.CutPrefix(name, Prefix)
	if !found || rest == "" || rest[0] == '0' || rest[0] == '+' {
		return 0, false
	}
	id, err := strconv.ParseUint(rest, 10, 64)
	if err != nil || id == 0 {
		return 0, false
	}
	return id, true
}

// ValidID reports an error for generation ids that can never exist.
func ValidID(id uint64) error {
	if id == 0 {
		return fmt.Errorf("generation id 0: ids start at 1")
	}
	return nil
}
