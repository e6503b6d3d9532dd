package cluster

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"unicode/utf8"

	"github.com/hashicorp/memberlist"
)

// Role is what a cluster member does.
type Role uint8

const (
	// RoleUnknown is a member whose metadata could not be read.
	RoleUnknown Role = iota
	// RoleServer publishes and exports generations.
	RoleServer
	// RoleBuilder mounts generations.
	RoleBuilder
)

// String returns "server", "builder" or "unknown".
func (r Role) String() string {
	switch r {
	case RoleServer:
		return "server"
	case RoleBuilder:
		return "builder"
	}
	return "unknown"
}

// ParseRole is the inverse of Role.String for the two real roles.
func ParseRole(s string) (Role, error) {
	switch s {
	case "server":
		return RoleServer, nil
	case "builder":
		return RoleBuilder, nil
	}
	return RoleUnknown, fmt.Errorf("role %q: want server or builder", s)
}

// MarshalText makes roles print as words in JSON.
func (r Role) MarshalText() ([]byte, error) { return []byte(r.String()), nil }

// UnmarshalText reads what MarshalText wrote ("unknown" included).
func (r *Role) UnmarshalText(b []byte) error {
	if string(b) == "unknown" {
		*r = RoleUnknown
		return nil
	}
	x, err := ParseRole(string(b))
	*r = x
	return err
}

// Meta is a member's node metadata: what every member learns with the
// member itself. It is small and fixed for the life of the process; state
// that grows travels as State. memberlist refuses (panics on) metadata over
// memberlist.MetaMaxSize (512) bytes, so EncodeMeta checks the bound.
type Meta struct {
	Role    Role   `json:"-"`
	Version string `json:"version,omitempty"`
	// API is a server's HTTP API base URL as builders reach it.
	API string `json:"api,omitempty"`
	// NFS is a server's NFS address host:port as builders reach it.
	NFS string `json:"nfs,omitempty"`
	// Replica marks a server that is a replica of another (it serves
	// generations but publishes none).
	Replica bool `json:"-"`
}

type metaWire struct {
	V       int    `json:"v"`
	Role    string `json:"role"`
	Version string `json:"version,omitempty"`
	API     string `json:"api,omitempty"`
	NFS     string `json:"nfs,omitempty"`
	Replica bool   `json:"replica,omitempty"`
}

// metaVersion is the version of the metadata encoding.
const metaVersion = 1

// ErrMetaTooLarge is returned when a member's metadata would exceed
// memberlist.MetaMaxSize.
var ErrMetaTooLarge = fmt.Errorf("cluster metadata exceeds %d bytes", memberlist.MetaMaxSize)

// EncodeMeta renders m, or fails when it is over memberlist.MetaMaxSize.
func EncodeMeta(m Meta) ([]byte, error) {
	b, err := json.Marshal(metaWire{V: metaVersion, Role: m.Role.String(), Version: m.Version, API: m.API, NFS: m.NFS, Replica: m.Replica})
	if err != nil {
		return nil, fmt.Errorf("encode cluster metadata: %w", err)
	}
	if len(b) > memberlist.MetaMaxSize {
		return nil, fmt.Errorf("%w: %d bytes (role %s, api %q, nfs %q)", ErrMetaTooLarge, len(b), m.Role, m.API, m.NFS)
	}
	return b, nil
}

// ParseMeta reads node metadata. It is a pure function of the bytes.
func ParseMeta(b []byte) (Meta, error) {
	var w metaWire
	if err := json.Unmarshal(b, &w); err != nil {
		return Meta{}, fmt.Errorf("cluster metadata: %w", err)
	}
	if w.V != metaVersion {
		return Meta{}, fmt.Errorf("cluster metadata: version %d: want %d", w.V, metaVersion)
	}
	r, err := ParseRole(w.Role)
	if err != nil {
		return Meta{}, fmt.Errorf("cluster metadata: %w", err)
	}
	return Meta{Role: r, Version: w.Version, API: w.API, NFS: w.NFS, Replica: w.Replica}, nil
}

// Generation is one live generation as a server announces it.
type Generation struct {
	ID uint64 `json:"id"`
	// RegistrationSHA256 is the sha256 of the generation's registration.
	RegistrationSHA256 [32]byte `json:"-"`
}

// State is the part of a member's view that grows and changes: a server's
// live generations, a builder's mounted generations. Each member owns its
// own State; Seq increases with every change (it starts at the process
// start time in nanoseconds, so a restarted member's state supersedes what
// it said before), and the newest Seq per member wins everywhere.
type State struct {
	Node string
	Seq  uint64
	Role Role
	// Server: live generations, oldest first. Partial is set on a
	// broadcast that carries only the newest maxBroadcastGens of them (a
	// member's push/pull state is always complete).
	Generations []Generation
	Partial     bool
	// Left is set by a member that is leaving gracefully: it holds
	// nothing from then on. memberlist v0.7.0 does not tell event
	// delegates a graceful leave from a death, so the member says so.
	Left bool
	// Builder: the server it uses (API URL), its phase and the
	// generations it has mounted, extra lowers included.
	Server  string
	Phase   string
	Mounted []uint64
}

// Newest returns a server's newest generation id (0: none).
func (s State) Newest() uint64 {
	if len(s.Generations) == 0 {
		return 0
	}
	return s.Generations[len(s.Generations)-1].ID
}

// Wire format (all integers unsigned varints, strings length-prefixed):
//
//	message = version(1 byte, =1) kind(1 byte) body
//	kind 1 (state):  state
//	kind 2 (table):  count, count × (length, state)   push/pull LocalState
//	state = node seq role(1) flags(1) gens×(id sha256[32]) server phase mounted×id
//
// flags bit 0 is Partial, bit 1 Left. Decoding rejects unknown versions and kinds,
// truncation, counts beyond the limits below, invalid UTF-8 and trailing
// bytes, each with an error naming the problem.
const (
	wireVersion = 1
	kindState   = 1
	kindTable   = 2

	maxString  = 512
	maxGens    = 4096
	maxMounted = 1024
	maxStates  = 65536
	// maxBroadcastGens bounds the generations in a broadcast so that it
	// fits one UDP packet; push/pull carries the complete list.
	maxBroadcastGens = 16
)

// ErrMalformed is wrapped by every decoding error.
var ErrMalformed = errors.New("malformed cluster message")

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendState(b []byte, s State) []byte {
	b = appendString(b, s.Node)
	b = binary.AppendUvarint(b, s.Seq)
	b = append(b, byte(s.Role))
	var flags byte
	if s.Partial {
		flags |= 1
	}
	if s.Left {
		flags |= 2
	}
	b = append(b, flags)
	b = binary.AppendUvarint(b, uint64(len(s.Generations)))
	for _, g := range s.Generations {
		b = binary.AppendUvarint(b, g.ID)
		b = append(b, g.RegistrationSHA256[:]...)
	}
	b = appendString(b, s.Server)
	b = appendString(b, s.Phase)
	b = binary.AppendUvarint(b, uint64(len(s.Mounted)))
	for _, g := range s.Mounted {
		b = binary.AppendUvarint(b, g)
	}
	return b
}

// EncodeState renders one state message.
func EncodeState(s State) []byte {
	return appendState([]byte{wireVersion, kindState}, s)
}

// EncodeTable renders the push/pull message of several states.
func EncodeTable(states []State) []byte {
	b := []byte{wireVersion, kindTable}
	b = binary.AppendUvarint(b, uint64(len(states)))
	for _, s := range states {
		one := appendState(nil, s)
		b = binary.AppendUvarint(b, uint64(len(one)))
		b = append(b, one...)
	}
	return b
}

type reader struct {
	b   []byte
	off int
	err error
}

func (r *reader) fail(what string, format string, args ...any) {
	if r.err == nil {
		r.err = fmt.Errorf("%w: %s at byte %d: %s", ErrMalformed, what, r.off, fmt.Sprintf(format, args...))
	}
}

func (r *reader) uvarint(what string) uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b[r.off:])
	if n <= 0 {
		r.fail(what, "truncated or overlong integer")
		return 0
	}
	r.off += n
	return v
}

func (r *reader) byte1(what string) byte {
	if r.err != nil {
		return 0
	}
	if r.off >= len(r.b) {
		r.fail(what, "truncated")
		return 0
	}
	c := r.b[r.off]
	r.off++
	return c
}

func (r *reader) bytes(what string, n int) []byte {
	if r.err != nil {
		return nil
	}
	if n > len(r.b)-r.off {
		r.fail(what, "truncated: want %d bytes, have %d", n, len(r.b)-r.off)
		return nil
	}
	out := r.b[r.off : r.off+n]
	r.off += n
	return out
}

func (r *reader) count(what string, limit int) int {
	n := r.uvarint(what)
	if r.err == nil && n > uint64(limit) {
		r.fail(what, "count %d over the limit %d", n, limit)
		return 0
	}
	// Each element takes at least one byte: a count beyond the bytes left
	// is a lie, refused before anything is allocated.
	if r.err == nil && n > uint64(len(r.b)-r.off) {
		r.fail(what, "count %d but only %d bytes left", n, len(r.b)-r.off)
		return 0
	}
	return int(n)
}

func (r *reader) str(what string) string {
	n := r.count(what+" length", maxString)
	b := r.bytes(what, n)
	if r.err == nil && !utf8.Valid(b) {
		r.fail(what, "not UTF-8")
	}
	return string(b)
}

func (r *reader) state() State {
	var s State
	s.Node = r.str("node name")
	if r.err == nil && s.Node == "" {
		r.fail("node name", "empty")
	}
	s.Seq = r.uvarint("seq")
	s.Role = Role(r.byte1("role"))
	if r.err == nil && s.Role != RoleServer && s.Role != RoleBuilder {
		r.fail("role", "unknown role %d", s.Role)
	}
	flags := r.byte1("flags")
	if r.err == nil && flags&^3 != 0 {
		r.fail("flags", "unknown flags %#x", flags)
	}
	s.Partial, s.Left = flags&1 != 0, flags&2 != 0
	if n := r.count("generation count", maxGens); n > 0 {
		s.Generations = make([]Generation, 0, n)
		for range n {
			g := Generation{ID: r.uvarint("generation id")}
			copy(g.RegistrationSHA256[:], r.bytes("registration sha256", 32))
			if r.err != nil {
				break
			}
			if g.ID == 0 || (len(s.Generations) > 0 && g.ID <= s.Generations[len(s.Generations)-1].ID) {
				r.fail("generation id", "%d is zero or not increasing", g.ID)
				break
			}
			s.Generations = append(s.Generations, g)
		}
	}
	s.Server = r.str("server")
	s.Phase = r.str("phase")
	if n := r.count("mounted count", maxMounted); n > 0 {
		s.Mounted = make([]uint64, 0, n)
		for range n {
			g := r.uvarint("mounted generation")
			if r.err != nil {
				break
			}
			if g == 0 {
				r.fail("mounted generation", "zero")
				break
			}
			s.Mounted = append(s.Mounted, g)
		}
	}
	return s
}

func (r *reader) header(want byte) {
	v := r.byte1("version")
	if r.err == nil && v != wireVersion {
		r.fail("version", "version %d: want %d (a member running another strata release?)", v, wireVersion)
	}
	k := r.byte1("kind")
	if r.err == nil && k != want {
		r.fail("kind", "kind %d: want %d", k, want)
	}
}

func (r *reader) end() {
	if r.err == nil && r.off != len(r.b) {
		r.fail("end", "%d trailing bytes", len(r.b)-r.off)
	}
}

// DecodeState reads one state message.
func DecodeState(b []byte) (State, error) {
	r := &reader{b: b}
	r.header(kindState)
	s := r.state()
	r.end()
	return s, r.err
}

// DecodeTable reads a push/pull message.
func DecodeTable(b []byte) ([]State, error) {
	r := &reader{b: b}
	r.header(kindTable)
	n := r.count("state count", maxStates)
	out := make([]State, 0, n)
	for range n {
		l := r.count("state length", len(b))
		one := r.bytes("state", l)
		if r.err != nil {
			break
		}
		sr := &reader{b: one}
		s := sr.state()
		sr.end()
		if sr.err != nil {
			return nil, fmt.Errorf("state %d of %d: %w", len(out)+1, n, sr.err)
		}
		out = append(out, s)
	}
	r.end()
	if r.err != nil {
		return nil, r.err
	}
	return out, nil
}

// forBroadcast returns s with at most maxBroadcastGens generations.
func (s State) forBroadcast() State {
	if len(s.Generations) <= maxBroadcastGens {
		return s
	}
	s.Generations = slices.Clone(s.Generations[len(s.Generations)-maxBroadcastGens:])
	s.Partial = true
	return s
}
