package server

import (
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/atomicfile"
	"github.com/strata-nix/strata/snapshot"
)

// The labels the server binds to each generation's snapshot
// (snapshot.Labels). With them the snapshots alone are enough to rebuild
// the state dir: the manifest's other fields and the registration come from
// the snapshot's own var/nix/db/db.sqlite.
const (
	labelGeneration = "generation"          // N, set at creation
	labelStore      = "store"               // central-store identity, set at creation
	labelState      = "state"               // pubPublishing at creation, pubLive once live
	labelParent     = "parent"              // previous generation's id, set at creation ("" for none)
	labelSHA256     = "registration_sha256" // hex sha256 of the registration, set when live
	labelPinned     = "pinned"              // "true" while pinned
	labelPinName    = "pin_name"            // the pin's name
	// labelOrigin is the primary's API URL, written by a replica onto each
	// snapshot it received itself (AddReceived). A replica adopts at start
	// only live snapshots that carry it: a snapshot a primary labelled live
	// (another server's snapshot dir) is never its own.
	labelOrigin = "origin"
)

// pubState is a snapshot's publish state, as its state label says.
type pubState int

const (
	// pubUnknown: no state label (a snapshot taken before labels existed,
	// or a crash inside Create before the label was written).
	pubUnknown pubState = iota
	// pubPublishing: the publish that made it has not finished; the
	// generation was never served.
	pubPublishing
	// pubLive: the generation went live (it may have been served).
	pubLive
)

func (p pubState) String() string {
	switch p {
	case pubPublishing:
		return "publishing"
	case pubLive:
		return "live"
	}
	return "unknown"
}

func stateOf(l snapshot.Labels) pubState {
	switch l[labelState] {
	case "publishing":
		return pubPublishing
	case "live":
		return pubLive
	}
	return pubUnknown
}

// liveLabels are the labels of a live generation g from store storeID.
func liveLabels(g api.Generation, storeID string) snapshot.Labels {
	l := snapshot.Labels{
		labelGeneration: strconv.FormatUint(g.ID, 10),
		labelStore:      storeID,
		labelState:      pubLive.String(),
		labelParent:     "",
		labelSHA256:     g.RegistrationSHA256,
		labelPinned:     "",
		labelPinName:    g.PinName,
		labelOrigin:     g.Origin,
	}
	if g.Parent != 0 {
		l[labelParent] = strconv.FormatUint(g.Parent, 10)
	}
	if g.Pinned {
		l[labelPinned] = "true"
	} else {
		l[labelPinName] = ""
	}
	return l
}

// labelDiff returns the labels of want that differ from have (a key whose
// wanted value is "" and that have lacks is no difference).
func labelDiff(have, want snapshot.Labels) snapshot.Labels {
	d := snapshot.Labels{}
	for k, v := range want {
		if have[k] != v {
			d[k] = v
		}
	}
	return d
}

// storeIDFile is where the central store's identity is kept, relative to
// store.root. It is a random UUID written by the first publish. It lives in
// the store itself rather than being derived from the btrfs subvolume UUID
// or the ZFS dataset GUID so that it is the same for both backends, is
// captured by every snapshot, and survives moving the store with btrfs
// send/receive, zfs send/recv or rsync (each of which gives a new UUID or
// GUID). Nix ignores unknown files under var/nix.
const storeIDFile = "var/nix/strata-store-id"

// readStoreID returns the identity of the central store at root, "" if it
// has none yet.
func readStoreID(root string) (string, error) {
	b, err := os.ReadFile(filepath.Join(root, storeIDFile))
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read store identity: %w", err)
	}
	id := strings.TrimSpace(string(b))
	if err := snapshot.CheckLabels(snapshot.Labels{labelStore: id}); err != nil || id == "" {
		return "", fmt.Errorf("read store identity %s: %q is not an identity strata wrote", filepath.Join(root, storeIDFile), b)
	}
	return id, nil
}

// createStoreID gives the central store at root a new random identity.
func createStoreID(root string) (string, error) {
	var u [16]byte
	if _, err := rand.Read(u[:]); err != nil {
		return "", fmt.Errorf("create store identity: %w", err)
	}
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	id := fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
	if err := atomicfile.WriteFile(filepath.Join(root, storeIDFile), []byte(id+"\n"), 0o644); err != nil {
		return "", fmt.Errorf("create store identity: %w", err)
	}
	return id, nil
}
