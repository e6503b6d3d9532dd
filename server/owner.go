package server

import (
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/internal/atomicfile"
	"github.com/strata-nix/strata/snapshot"
)

// A btrfs snapshot dir belongs to exactly one server. Two servers on one
// snapshot dir (a replica given the primary's snapshot.snapshot_dir, two
// state dirs over one store) each adopt the other's live snapshots, and
// retention on one destroys generations the other still serves. So:
//
//   - every server has an identity, a random UUID in <state_dir>/server-id
//     (written by its first start);
//   - the snapshot dir records its owner in <snapshot_dir>/strata.owner.json
//     (identity, role, host, state dir, since when; written atomically);
//   - a start on a snapshot dir owned by another identity is refused before
//     anything is created, opened for writing or destroyed, naming the dir,
//     the owner and the fix (its own snapshot dir, or --claim-snapshot-dir);
//   - while the daemon runs it holds an exclusive flock on
//     <snapshot_dir>/strata.owner.lock: a second daemon on the same dir
//     (even with a copy of the same state dir) is refused.
//
// A snapshot dir without an owner record (a fresh one, or one of a strata
// older than the record) is claimed by the first start that can account for
// every snapshot in it: each one has a manifest in its state dir (on a
// replica, one it wrote when it received the snapshot: an origin), or is
// its own unfinished publish or receive. A live snapshot it would adopt, or
// one it would keep without serving, is not accounted for. Otherwise the start is refused until the operator points
// snapshot.snapshot_dir at the server's own dir, or claims it explicitly.
// A state dir that lost its server-id (wiped, rebuilt from the snapshots)
// takes the record's identity back when the record names the same host and
// the same state_dir path: that is the same server. ZFS datasets carry no
// owner record yet: the replica's origin rule (plan) is their guard.

const (
	ownerFileName = "strata.owner.json"
	ownerLockName = "strata.owner.lock"
	serverIDName  = "server-id"
)

// owner is a snapshot dir's owner record, and a server's own identity.
type owner struct {
	ServerID string    `json:"server_id"`
	Role     string    `json:"role"` // "primary" or "replica"
	Host     string    `json:"host"`
	StateDir string    `json:"state_dir"`
	Since    time.Time `json:"since"`
}

func (o owner) String() string {
	return fmt.Sprintf("server %s (a %s with state_dir %s on host %s, owner since %s)", o.ServerID, o.Role, o.StateDir, o.Host, o.Since.UTC().Format(time.RFC3339))
}

func ownerFile(dir string) string { return filepath.Join(dir, ownerFileName) }

// readOwner returns dir's owner record, nil when it has none (or dir does
// not exist).
func readOwner(dir string) (*owner, error) {
	b, err := os.ReadFile(ownerFile(dir))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read owner record: %w", err)
	}
	var o owner
	if err := json.Unmarshal(b, &o); err != nil || o.ServerID == "" {
		return nil, fmt.Errorf("read owner record %s: not a record strata wrote (%q); nothing was changed: remove it only if this snapshot dir belongs to no other server", ownerFile(dir), b)
	}
	return &o, nil
}

func writeOwner(dir string, o owner) error {
	b, err := json.MarshalIndent(o, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(ownerFile(dir), append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write owner record: %w", err)
	}
	return nil
}

// identity is this server as it would record itself as owner.
type identity struct {
	owner
	// fresh: state_dir has no server-id yet; save writes ServerID there.
	fresh bool
}

// selfOf reads this server's identity from its state dir, or makes a new
// one (written by save) when it has none.
func selfOf(cfg Config) (identity, error) {
	host, _ := os.Hostname()
	role := "primary"
	if cfg.Replica() {
		role = "replica"
	}
	me := identity{owner: owner{Role: role, Host: host, StateDir: filepath.Clean(cfg.StateDir), Since: time.Now().UTC()}}
	b, err := os.ReadFile(filepath.Join(cfg.StateDir, serverIDName))
	switch {
	case errors.Is(err, os.ErrNotExist):
		me.ServerID, me.fresh = newUUID(), true
	case err != nil:
		return me, fmt.Errorf("read server identity: %w", err)
	default:
		me.ServerID = strings.TrimSpace(string(b))
		if me.ServerID == "" || strings.ContainsAny(me.ServerID, " \t\n/") {
			return me, fmt.Errorf("read server identity %s: %q is not an identity strata wrote", filepath.Join(cfg.StateDir, serverIDName), b)
		}
	}
	return me, nil
}

// save writes the identity into stateDir if it is not there yet.
func (me *identity) save(stateDir string) error {
	if !me.fresh {
		return nil
	}
	if err := atomicfile.WriteFile(filepath.Join(stateDir, serverIDName), []byte(me.ServerID+"\n"), 0o644); err != nil {
		return fmt.Errorf("write server identity: %w", err)
	}
	me.fresh = false
	return nil
}

func newUUID() string {
	var u [16]byte
	rand.Read(u[:])
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// claim is what a start does about the snapshot dir's owner record.
type claim int

const (
	// claimNone: the record names this server; nothing to write.
	claimNone claim = iota
	// claimFresh: no record and no snapshot: the dir is new.
	claimFresh
	// claimAccounted: no record, and this state dir accounts for every
	// snapshot it would serve (a dir of an older strata).
	claimAccounted
	// claimSameStateDir: the record names this host and state_dir path,
	// whose server-id is gone (a wiped state dir): its identity is taken back.
	claimSameStateDir
	// claimForced: --claim-snapshot-dir.
	claimForced
)

func (c claim) String() string {
	switch c {
	case claimNone:
		return "owned by this server"
	case claimFresh:
		return "no owner yet and no snapshot: this start claims it"
	case claimAccounted:
		return "no owner record yet (made by an older strata); state_dir accounts for every snapshot it serves: this start claims it"
	case claimSameStateDir:
		return "owned by this host's state_dir, whose server-id is gone: this start takes that identity back"
	case claimForced:
		return "claimed for this server (--claim-snapshot-dir)"
	}
	return "unknown"
}

// ErrOwnedByOther means the snapshot dir belongs to another server.
var ErrOwnedByOther = errors.New("snapshot dir belongs to another server")

// unaccounted lists the snapshots that the state dir cannot show to be
// this server's own, each with why: live ones it would adopt, ones it
// would keep without serving, and on a replica served ones whose manifest
// it did not write when receiving them.
func (p *plan) unaccounted(cfg Config) []string {
	var out []string
	for id, why := range p.kept {
		out = append(out, fmt.Sprintf("%s (%s)", snapshot.Name(id), why))
	}
	for _, id := range p.rebuild {
		out = append(out, fmt.Sprintf("%s (labelled live, no manifest in this state_dir)", snapshot.Name(id)))
	}
	if cfg.Replica() {
		for _, id := range p.serve {
			if p.stored[id].Origin == "" {
				out = append(out, fmt.Sprintf("%s (its manifest here has no origin: this replica did not receive it)", snapshot.Name(id)))
			}
		}
	}
	slices.Sort(out)
	return out
}

// decideOwner says whether this server (me) may use cfg's snapshot dir,
// whose owner record is rec (nil: none), given the plan of a start, and
// what it claims. It changes nothing.
func decideOwner(cfg Config, rec *owner, me identity, p *plan) (claim, error) {
	dir := cfg.SnapshotDir
	switch {
	case rec != nil && rec.ServerID == me.ServerID:
		return claimNone, nil
	case rec != nil && me.fresh && rec.Host == me.Host && filepath.Clean(rec.StateDir) == me.StateDir:
		return claimSameStateDir, nil
	case cfg.ClaimSnapshotDir:
		return claimForced, nil
	case rec != nil:
		return 0, fmt.Errorf("%w: snapshot.snapshot_dir %s is owned by %s (%s), and this server's state_dir %s is server %s. "+
			"Two servers on one snapshot dir adopt each other's generations and retention destroys what the other serves; nothing was changed. "+
			"Give this server its own snapshot.snapshot_dir (a replica receives into an empty one). "+
			"Only if that server is gone for good and this one takes its snapshots over, start once with --claim-snapshot-dir",
			ErrOwnedByOther, dir, rec, ownerFile(dir), me.StateDir, me.ServerID)
	}
	if len(p.snaps) == 0 {
		return claimFresh, nil
	}
	if u := p.unaccounted(cfg); len(u) > 0 {
		return 0, fmt.Errorf("%w: snapshot.snapshot_dir %s has no owner record (%s) and snapshots state_dir %s does not account for: %s. "+
			"They may be another server's generations (a primary's snapshot dir given to a replica?); nothing was changed. "+
			"Point snapshot.snapshot_dir at this server's own dir; or, if they are this server's own (its state_dir was lost or replaced), start once with --claim-snapshot-dir",
			ErrOwnedByOther, dir, ownerFile(dir), cfg.StateDir, strings.Join(u, ", "))
	}
	return claimAccounted, nil
}

// lockSnapshotDir takes the running daemon's lock on dir: an exclusive
// flock(2) on <dir>/strata.owner.lock (made if missing), without waiting;
// the caller closes the file to release it. What it guarantees: while a
// strata server holds it, no other strata server process on this host
// gets past this call for the same directory (whatever path names it:
// the lock is on the file), so two daemons never serve one snapshot dir
// at once, even with copies of one state dir; the kernel drops it when
// the process ends, however it ends, so a crash leaves no stale lock.
// What it does not: it is advisory, so it stops nothing but another
// strata server's start (btrfs commands, an older strata, --check-config
// do not take it); it does not say who owns the dir (the owner record
// does; this call only names it in the refusal); and it is this host's
// only (a btrfs snapshot dir is mounted on one host).
//
// made says whether this call created the lock file: a start refused
// before it goes ahead removes it again (releaseLock), so a mistyped
// snapshot dir is left as it was.
func lockSnapshotDir(dir string) (f *os.File, made bool, err error) {
	name := filepath.Join(dir, ownerLockName)
	if _, err := os.Lstat(name); errors.Is(err, fs.ErrNotExist) {
		made = true
	}
	f, err = os.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, false, fmt.Errorf("lock snapshot dir: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			rec, _ := readOwner(dir)
			who := "another strata server"
			if rec != nil {
				who = rec.String()
			}
			return nil, false, fmt.Errorf("%w: snapshot.snapshot_dir %s is in use by a running server (it holds %s; owner record: %s): give this server its own snapshot dir",
				ErrOwnedByOther, dir, name, who)
		}
		if made {
			os.Remove(name)
		}
		return nil, false, fmt.Errorf("lock snapshot dir %s: %w", name, err)
	}
	return f, made, nil
}

// releaseLock releases the lock lockSnapshotDir took; with remove (a
// refused start whose lockSnapshotDir made the file) it removes the file
// first, while still holding it.
func releaseLock(f *os.File, remove bool) {
	if remove {
		os.Remove(f.Name())
	}
	f.Close()
}
