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
	"unicode/utf8"
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
	// Labels are the labels bound to the snapshot (see Labels); never nil
	// for a Snapshot returned by Create or List.
	Labels Labels
}

// Labels are short facts about a generation bound to its snapshot itself,
// not kept beside it: the server writes the generation id, the central
// store's identity and whether the generation went live, so that the
// snapshots alone say what they are when the server's state dir is lost or
// wrong. btrfs keeps the labels given to Create as user.strata.<key>
// xattrs of the snapshot's root directory (written while the snapshot is
// still writable, then it is made read-only, so they travel with btrfs
// send), and later changes in a file strata-N.labels beside it (a
// read-only snapshot is never made writable again: that would break
// incremental sends from it); ZFS keeps them as strata:<key> user
// properties of the snapshot (zfs send -p carries them).
//
// The key "generation", when set, is the snapshot's id in decimal: it is how
// a backend recognises a snapshot that it made itself.
//
// A key is 1 to 32 characters of [a-z0-9_]; a value is at most MaxLabelValue
// bytes of UTF-8 without NUL, newline or tab. An empty value means unset.
type Labels map[string]string

// MaxLabelValue is the longest label value a backend must store.
const MaxLabelValue = 1024

// CheckLabels reports the first label that a backend cannot store.
func CheckLabels(l Labels) error {
	for k, v := range l {
		if len(k) == 0 || len(k) > 32 || strings.IndexFunc(k, func(r rune) bool {
			return !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '_')
		}) >= 0 {
			return fmt.Errorf("label key %q: want 1-32 characters of [a-z0-9_]", k)
		}
		if len(v) > MaxLabelValue || !utf8.ValidString(v) || strings.ContainsAny(v, "\x00\n\t") {
			return fmt.Errorf("label %s: value %q: want at most %d bytes of UTF-8 without NUL, newline or tab", k, v, MaxLabelValue)
		}
	}
	return nil
}

// Backend takes and manages the snapshots of one central store.
//
// Implementations are safe for concurrent use by one process. They never
// touch snapshots whose names do not start with Prefix.
type Backend interface {
	// Kind names the backend: "btrfs" or "zfs".
	Kind() string
	// Create takes an atomic, read-only snapshot of the central store as
	// generation id, with labels bound to it (empty values are skipped),
	// and makes it readable at the returned Snapshot's Path. It fails with
	// ErrExists if that generation's snapshot exists. A crash inside
	// Create may leave the snapshot with only some of its labels, never a
	// label without its snapshot.
	Create(ctx context.Context, id uint64, labels Labels) (Snapshot, error)
	// List returns every strata snapshot, ordered by ID ascending, each
	// readable at its Path (a backend that serves snapshots from explicit
	// mounts makes sure they are mounted).
	List(ctx context.Context) ([]Snapshot, error)
	// SetLabels changes the labels of generation id's snapshot: a key with
	// a non-empty value is set, a key with an empty value is removed, keys
	// not named stay. The snapshot's files never change. It fails with
	// ErrNotFound if there is no such snapshot.
	SetLabels(ctx context.Context, id uint64, labels Labels) error
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
