package builder

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"time"

	"github.com/strata-nix/strata/internal/atomicfile"
)

// Phase is where the agent is in its cycle. A rotation from generation N to
// M walks Mounting(M) → Invalidating(M) → Swapping(M) → Importing(M) →
// Releasing(N) → Idle(M); the first start walks Mounting(M) → Importing(M)
// → Idle(M). The state file records the phase before each step starts, so
// a restarted agent knows which step may have been cut short.
type Phase int

const (
	// PhaseNone: nothing is mounted yet (first start, before the server
	// answered).
	PhaseNone Phase = iota
	// PhaseIdle: the overlay of Generation is at the store dir and its
	// registration is imported.
	PhaseIdle
	// PhaseMounting: mounting Target's NFS lower (and, on first start, the
	// overlay).
	PhaseMounting
	// PhaseInvalidating: removing paths that left the central store from
	// the local DB, before the swap, while they are still readable.
	PhaseInvalidating
	// PhaseSwapping: replacing the overlay with one whose top lower is
	// Target.
	PhaseSwapping
	// PhaseImporting: registering Target's new paths in the Nix DB
	// (after the swap, so every registered path is readable).
	PhaseImporting
	// PhaseReleasing: detaching lowers the new overlay no longer uses and
	// pruning old workdirs.
	PhaseReleasing
)

var phaseNames = []string{"none", "idle", "mounting", "invalidating", "swapping", "importing", "releasing"}

// String returns the phase's lowercase name.
func (p Phase) String() string {
	if int(p) >= 0 && int(p) < len(phaseNames) {
		return phaseNames[p]
	}
	return fmt.Sprintf("Phase(%d)", int(p))
}

// MarshalText writes the name.
func (p Phase) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

// UnmarshalText reads a name written by MarshalText.
func (p *Phase) UnmarshalText(b []byte) error {
	for i, n := range phaseNames {
		if n == string(b) {
			*p = Phase(i)
			return nil
		}
	}
	return fmt.Errorf("unknown phase %q", b)
}

// Lower is one read-only lower layer of the overlay: a generation's NFS
// mount. Kept lists the paths a non-top lower is kept for (paths that left
// the central store but that local paths still refer to).
type Lower struct {
	Gen  uint64   `json:"gen"`
	Kept []string `json:"kept,omitempty"`
	// Server is the API URL of the server the lower is mounted from
	// (empty in a state file written before failover existed: the server
	// in use). Dir is its mountpoint's name under lower/ (empty: "<Gen>");
	// the same generation from another server is mounted at
	// "<Gen>@<server>" (see Agent.ensureLower).
	Server string `json:"server,omitempty"`
	Dir    string `json:"dir,omitempty"`
	// SHA256 is the generation's registration sha256 as its server
	// listed it: a failover moves only to a server whose generation has
	// the same.
	SHA256 string `json:"registration_sha256,omitempty"`
}

// name is the lower's mountpoint name under lower/.
func (l Lower) name() string {
	if l.Dir != "" {
		return l.Dir
	}
	return strconv.FormatUint(l.Gen, 10)
}

// Failover is one move of the store dir's lowers from one server to
// another (see Agent.Failover).
type Failover struct {
	At   time.Time `json:"at"`
	From string    `json:"from"`
	To   string    `json:"to"`
	// Reason says why: the dead server's symptom, or "requested".
	Reason string `json:"reason"`
	// Generation is the generation served after the move; Rotated is set
	// when the other server did not have the mounted one and the move was
	// a rotation to its newest.
	Generation uint64        `json:"generation"`
	Rotated    bool          `json:"rotated,omitempty"`
	Took       time.Duration `json:"took"`
}

// State is what the agent persists in <state_dir>/state.json after every
// transition (written to a temp file, fsynced, renamed).
type State struct {
	Version int   `json:"version"`
	Phase   Phase `json:"phase"`
	// Generation is the generation whose overlay is at the store dir (0:
	// none yet) and Lowers that overlay's lowers, top first.
	Generation uint64  `json:"generation"`
	Lowers     []Lower `json:"lowers,omitempty"`
	// Work is the current overlay's workdir; PrevWork the one before it,
	// kept until the next rotation for processes still writing through the
	// detached old overlay.
	Work     string `json:"work,omitempty"`
	PrevWork string `json:"prev_work,omitempty"`
	// Target and Next describe the rotation under way: the generation and
	// the lowers of the overlay being built.
	Target uint64  `json:"target,omitempty"`
	Next   []Lower `json:"next,omitempty"`
	// ForceRelease names the lower mountpoints (under lower/) of a dead
	// server that a failover moved off: when released they are forced
	// off (Mounter.ForceUnmount), not detached, also by a restarted
	// agent. Names no longer mounted are dropped once released.
	ForceRelease []string `json:"force_release,omitempty"`
	// Retired are overlays swaps detached that processes may still use:
	// their generations stay held and their workdirs kept until nothing
	// does (see Retired).
	Retired []Retired `json:"retired,omitempty"`

	LastRotation         time.Time     `json:"last_rotation,omitzero"`
	LastRotationDuration time.Duration `json:"last_rotation_duration,omitempty"`
	PathsImported        int           `json:"paths_imported"`
	PathsInvalidated     int           `json:"paths_invalidated"`
	LastError            string        `json:"last_error,omitempty"`

	// Server is the server in use (its gossip name and API URL): it stays
	// the one in use across restarts, until a failover or a rotation
	// through another server (rotate --server, or the next rotation when a
	// more preferred server has the new generation).
	Server Endpoint `json:"server,omitzero"`
	// Failovers counts the automatic failovers; LastFailover is the newest
	// server change, automatic or requested.
	Failovers    int       `json:"failovers,omitempty"`
	LastFailover *Failover `json:"last_failover,omitempty"`
}

// String is the state as logs and status show it: "idle(3)",
// "swapping(4)", "releasing(3)".
func (s State) String() string {
	switch s.Phase {
	case PhaseNone:
		return "none"
	case PhaseIdle:
		return fmt.Sprintf("idle(%d)", s.Generation)
	case PhaseReleasing:
		return fmt.Sprintf("releasing(%d)", s.Generation)
	}
	return fmt.Sprintf("%s(%d)", s.Phase, s.Target)
}

const stateVersion = 1

// loadState reads the state file; a missing file is the zero state.
func loadState(path string) (State, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return State{Version: stateVersion}, nil
	}
	if err != nil {
		return State{}, fmt.Errorf("read state %s: %w", path, err)
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return State{}, fmt.Errorf("read state %s: %w", path, err)
	}
	if s.Version != stateVersion {
		return State{}, fmt.Errorf("read state %s: version %d, want %d", path, s.Version, stateVersion)
	}
	return s, nil
}

func saveState(path string, s State) error {
	s.Version = stateVersion
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("write state: %w", err)
	}
	return atomicfile.WriteFile(path, append(b, '\n'), 0o600)
}

func gens(ls []Lower) []uint64 {
	out := make([]uint64, len(ls))
	for i, l := range ls {
		out[i] = l.Gen
	}
	return out
}
