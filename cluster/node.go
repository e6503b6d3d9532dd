// Package cluster is strata's gossip layer: a memberlist node inside each
// daemon. Servers announce their live generations and the addresses builders
// reach them at; builders announce the generations they have mounted (extra
// lowers included), their server and their phase. A server's retention asks
// Holds which generations builders still hold; a builder asks
// NewestGeneration to rotate as soon as a publish is announced.
//
// What travels where:
//   - Meta (memberlist node metadata, ≤ 512 bytes): role, strata version,
//     a server's API URL and NFS address. Fixed for the life of the process.
//   - State (grows): sent as a broadcast on every change, re-broadcast once by
//     each member that receives a newer one (memberlist alone delivers a
//     user broadcast to a handful of members only), and exchanged whole in
//     push/pull (on join and every PushPullInterval), so a member that
//     missed a broadcast catches up.
//
// Every memberlist delegate method here returns at once and is safe for
// concurrent use: it takes one mutex for a bounded amount of work and never
// calls out.
//
// Holds. A builder holds what it last reported while it is alive or
// suspect; once memberlist declares it dead it still holds for DeadGrace (a
// partitioned builder still has its mounts), and a builder that left
// gracefully holds nothing. A builder's state learned second-hand, whose
// member this node has never seen, holds for DeadGrace from when it was
// learned. Holds counts every builder's holds, whatever server it reports
// using: replicas serve the same generation ids, and keeping a generation
// one member too many is the safe mistake.
package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/strata-nix/strata/config"
)

// Config describes one member.
type Config struct {
	// Name is the member's unique name (default: the hostname).
	Name string
	// ClusterName is put on every packet (memberlist's label); packets of
	// another cluster are refused.
	ClusterName string
	// Bind is the host:port gossip listens on (TCP and UDP).
	Bind string
	// Advertise is the host:port other members reach this one at (default:
	// Bind, or the first private address when Bind's host is unspecified).
	Advertise string
	// Join lists seed addresses (host:port). Joining is retried with
	// backoff until one answers; later, a seed that is not an alive member
	// is joined again every RejoinInterval (heals partitions and restarts).
	Join []string
	// Keyring is the keyring (first key primary); nil means plaintext.
	Keyring *Keyring
	// DeadGrace is how long a dead builder still holds its generations.
	DeadGrace time.Duration
	// Settle is how long after start Holds reports "not known yet" unless
	// a join synchronised the state first (default 15 s: long enough for
	// builders to rejoin a restarted server).
	Settle time.Duration
	// Meta is this member's metadata.
	Meta Meta
	// Tune, if set, adjusts memberlist's configuration (tests, benchmarks).
	Tune func(*memberlist.Config)
}

// RejoinInterval is how often a member re-joins seeds it lost.
const RejoinInterval = 5 * time.Second

// MemberState is a member's liveness as this node sees it.
type MemberState int

const (
	StateAlive MemberState = iota
	StateSuspect
	StateDead
	StateLeft
)

// String returns alive, suspect, dead or left.
func (s MemberState) String() string {
	switch s {
	case StateAlive:
		return "alive"
	case StateSuspect:
		return "suspect"
	case StateDead:
		return "dead"
	case StateLeft:
		return "left"
	}
	return "unknown"
}

// MarshalText makes states print as words in JSON.
func (s MemberState) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText reads what MarshalText wrote.
func (s *MemberState) UnmarshalText(b []byte) error {
	for _, x := range []MemberState{StateAlive, StateSuspect, StateDead, StateLeft} {
		if x.String() == string(b) {
			*s = x
			return nil
		}
	}
	return fmt.Errorf("member state %q: want alive, suspect, dead or left", b)
}

type member struct {
	meta     Meta
	addr     string
	state    MemberState
	since    time.Time // when state began
	lastSeen time.Time
	known    bool // seen by memberlist (else only learned from push/pull)
	// rtt is the smoothed round-trip time of this node's direct probes of
	// the member (memberlist's ping delegate; 0: none yet).
	rtt time.Duration
}

// Node is a running member.
type Node struct {
	cfg     Config
	log     *slog.Logger
	ml      *memberlist.Memberlist
	queue   *memberlist.TransmitLimitedQueue
	meta    []byte
	started time.Time
	stats   *stats
	mlLog   *logWriter
	// closing is set by Close before memberlist stops: memberlist's
	// suspicion timers outlive its Shutdown and still report members
	// dead, which must change and log nothing on a closed node.
	closing atomic.Bool

	mu      sync.Mutex
	self    State
	states  map[string]State
	members map[string]*member
	synced  bool // a join exchanged state with a seed

	changed chan struct{}
	direct  chan struct{}
	sendWG  sync.WaitGroup
	stop    chan struct{}
	done    chan struct{}
	closeMu sync.Mutex
	closed  bool
}

// New starts a member: it binds its sockets, then joins cfg.Join in the
// background (see Config.Join). Close (or Leave) releases everything.
func New(cfg Config, log *slog.Logger) (*Node, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.Settle == 0 {
		cfg.Settle = 15 * time.Second
	}
	meta, err := EncodeMeta(cfg.Meta)
	if err != nil {
		return nil, err
	}
	n := &Node{cfg: cfg, log: log.With("component", "cluster"), meta: meta, started: time.Now(),
		states: map[string]State{}, members: map[string]*member{}, stats: newStats(),
		changed: make(chan struct{}, 1), direct: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}

	mc := memberlist.DefaultLANConfig()
	if cfg.Name != "" {
		mc.Name = cfg.Name
	}
	host, port, err := splitHostPort(cfg.Bind)
	if err != nil {
		return nil, fmt.Errorf("cluster.bind %q: %w", cfg.Bind, err)
	}
	mc.BindAddr, mc.BindPort = host, port
	mc.AdvertisePort = port
	if cfg.Advertise != "" {
		ah, ap, err := splitHostPort(cfg.Advertise)
		if err != nil {
			return nil, fmt.Errorf("cluster.advertise %q: %w", cfg.Advertise, err)
		}
		mc.AdvertiseAddr, mc.AdvertisePort = ah, ap
	}
	mc.Label = cfg.ClusterName
	if cfg.Keyring != nil {
		mc.Keyring = cfg.Keyring.ml
		mc.GossipVerifyIncoming, mc.GossipVerifyOutgoing = true, true
	}
	n.mlLog = &logWriter{log: n.log}
	mc.LogOutput = n.mlLog
	mc.Delegate = (*delegate)(n)
	mc.Events = (*events)(n)
	mc.Ping = (*pings)(n)
	if cfg.Tune != nil {
		cfg.Tune(mc)
	}
	n.self = State{Node: mc.Name, Seq: uint64(n.started.UnixNano()), Role: cfg.Meta.Role}
	n.queue = &memberlist.TransmitLimitedQueue{RetransmitMult: mc.RetransmitMult}
	ml, err := memberlist.Create(mc)
	if err != nil {
		return nil, fmt.Errorf("start cluster member %s on %s: %w", mc.Name, cfg.Bind, err)
	}
	n.ml = ml
	n.queue.NumNodes = ml.NumMembers
	n.log.Info("cluster member started", "name", mc.Name, "role", cfg.Meta.Role.String(), "bind", n.Addr(),
		"cluster", cfg.ClusterName, "encrypted", cfg.Keyring != nil)
	go n.loop()
	n.sendWG.Add(1)
	go n.sendLoop()
	return n, nil
}

func splitHostPort(s string) (string, int, error) {
	h, port, err := config.HostPort(s)
	if err != nil {
		return "", 0, err
	}
	if h == "" {
		h = "0.0.0.0"
	}
	return h, port, nil
}

// Name is this member's name.
func (n *Node) Name() string { return n.self.Node }

// Addr is the address other members reach this one at (host:port).
func (n *Node) Addr() string { return n.ml.LocalNode().Address() }

// Changed is signalled (without blocking; one pending signal at most)
// whenever a member's state or liveness changes.
func (n *Node) Changed() <-chan struct{} { return n.changed }

func (n *Node) signal() {
	select {
	case n.changed <- struct{}{}:
	default:
	}
}

// SetServerState announces a server's live generations (oldest first).
func (n *Node) SetServerState(gens []Generation) {
	n.setState(func(s *State) { s.Generations = slices.Clone(gens) })
}

// SetBuilderState announces a builder's server, phase and mounted
// generations.
func (n *Node) SetBuilderState(server, phase string, mounted []uint64) {
	n.setState(func(s *State) { s.Server, s.Phase, s.Mounted = server, phase, slices.Clone(mounted) })
}

func (n *Node) setState(f func(*State)) {
	n.mu.Lock()
	old := n.self
	f(&n.self)
	if statesEqual(old, n.self) {
		n.mu.Unlock()
		return
	}
	n.self.Seq++
	s := n.self
	n.mu.Unlock()
	n.queue.QueueBroadcast(&broadcast{node: s.Node, msg: EncodeState(s.forBroadcast())})
	n.stats.sent("state")
	if s.Role == RoleBuilder {
		select {
		case n.direct <- struct{}{}:
		default:
		}
	}
}

// sendLoop sends a builder's newest state straight to every alive server
// member over TCP whenever it changes: servers decide retention on it, and
// gossip alone reaches them only after some delay (builder states are not
// re-broadcast by other members; see NotifyMsg).
func (n *Node) sendLoop() {
	defer n.sendWG.Done()
	for {
		select {
		case <-n.stop:
			return
		case <-n.direct:
		}
		n.mu.Lock()
		msg := EncodeState(n.self.forBroadcast())
		servers := map[string]bool{}
		for name, m := range n.members {
			if m.meta.Role == RoleServer && (m.state == StateAlive || m.state == StateSuspect) {
				servers[name] = true
			}
		}
		n.mu.Unlock()
		for _, nd := range n.ml.Members() {
			if !servers[nd.Name] {
				continue
			}
			if err := n.ml.SendReliable(nd, msg); err != nil {
				n.log.Debug("send state to server", "server", nd.Name, "err", err)
				continue
			}
			n.stats.sent("direct")
		}
	}
}

func statesEqual(a, b State) bool {
	return a.Server == b.Server && a.Phase == b.Phase && a.Left == b.Left && slices.Equal(a.Mounted, b.Mounted) &&
		slices.Equal(a.Generations, b.Generations)
}

// merge keeps s when it is newer than what is known of its member and
// reports whether it was.
//
// Lock order: memberlist calls the event delegate with its node lock held,
// and the broadcast queue asks memberlist for the member count with the
// queue's lock held; so nothing here calls memberlist or the queue while
// holding n.mu.
func (n *Node) merge(s State) bool {
	var outbid *State
	defer func() { // runs after n.mu is released
		if outbid != nil {
			n.queue.QueueBroadcast(&broadcast{node: outbid.Node, msg: EncodeState(outbid.forBroadcast())})
			if outbid.Role == RoleBuilder {
				select {
				case n.direct <- struct{}{}:
				default:
				}
			}
		}
	}()
	n.mu.Lock()
	defer n.mu.Unlock()
	if s.Node == n.self.Node {
		// Others hold a state of ours at least as new as the current one
		// (a previous run whose clock was ahead): outbid it, or they would
		// ignore everything we say.
		if s.Seq >= n.self.Seq {
			n.self.Seq = s.Seq + 1
			st := n.self
			outbid = &st
		}
		return false
	}
	old, ok := n.states[s.Node]
	if ok && (s.Seq < old.Seq || (s.Seq == old.Seq && (s.Partial || !old.Partial))) {
		return false
	}
	n.states[s.Node] = s
	m := n.members[s.Node]
	if m == nil {
		// Learned second-hand: counts as dead since now until memberlist
		// says otherwise (see the package doc).
		m = &member{meta: Meta{Role: s.Role}, state: StateDead, since: time.Now()}
		n.members[s.Node] = m
	}
	if s.Left && m.state != StateLeft {
		m.state, m.since = StateLeft, time.Now()
	}
	if m.state == StateAlive {
		m.lastSeen = time.Now()
	}
	return true
}

// broadcast is one queued state message; a newer state of the same member
// replaces it in the queue.
type broadcast struct {
	node string
	msg  []byte
}

func (b *broadcast) Invalidates(other memberlist.Broadcast) bool {
	o, ok := other.(*broadcast)
	return ok && o.node == b.node
}
func (b *broadcast) Name() string    { return "state/" + b.node }
func (b *broadcast) Message() []byte { return b.msg }
func (b *broadcast) Finished()       {}

// delegate implements memberlist.Delegate.
type delegate Node

func (d *delegate) NodeMeta(limit int) []byte {
	if len(d.meta) > limit {
		return nil // cannot happen: EncodeMeta checked MetaMaxSize
	}
	return d.meta
}

func (d *delegate) NotifyMsg(b []byte) {
	n := (*Node)(d)
	s, err := DecodeState(b)
	if err != nil {
		n.stats.received("state", "malformed")
		n.log.Warn("dropping malformed gossip message", "err", err)
		return
	}
	if !n.merge(s) {
		n.stats.received("state", "stale")
		return
	}
	n.stats.received("state", "new")
	// Re-gossip a server's state on first receipt, as Serf does with user
	// events: memberlist alone reaches only a few members, and every
	// builder needs to hear of a publish at once. Builder states are not
	// re-gossiped (only servers need them soon, and builders send them
	// straight to servers); push/pull spreads them to everyone else.
	if s.Role == RoleServer {
		n.queue.QueueBroadcast(&broadcast{node: s.Node, msg: append([]byte(nil), b...)})
	}
	n.signal()
}

func (d *delegate) GetBroadcasts(overhead, limit int) [][]byte {
	return d.queue.GetBroadcasts(overhead, limit)
}

func (d *delegate) LocalState(join bool) []byte {
	n := (*Node)(d)
	n.mu.Lock()
	all := make([]State, 0, len(n.states)+1)
	all = append(all, n.self)
	for _, s := range n.states {
		all = append(all, s)
	}
	n.mu.Unlock()
	n.stats.sent("table")
	return EncodeTable(all)
}

func (d *delegate) MergeRemoteState(buf []byte, join bool) {
	n := (*Node)(d)
	states, err := DecodeTable(buf)
	if err != nil {
		n.stats.received("table", "malformed")
		n.log.Warn("dropping malformed gossip state", "err", err)
		return
	}
	n.stats.received("table", "new")
	changed := false
	for _, s := range states {
		if n.merge(s) {
			changed = true
		}
	}
	if changed {
		n.signal()
	}
}

// events implements memberlist.EventDelegate.
type events Node

func (e *events) note(nd *memberlist.Node, st MemberState) {
	n := (*Node)(e)
	if nd.Name == n.self.Node || n.closing.Load() {
		return
	}
	meta, err := ParseMeta(nd.Meta)
	if err != nil {
		n.log.Warn("member with unreadable metadata", "member", nd.Name, "err", err)
	}
	now := time.Now()
	n.mu.Lock()
	m := n.members[nd.Name]
	if m == nil {
		m = &member{}
		n.members[nd.Name] = m
	}
	if st != StateAlive && n.states[nd.Name].Left {
		st = StateLeft // it said so before going (see State.Left)
	}
	if !m.known || m.state != st {
		m.since = now
	}
	m.known, m.meta, m.addr, m.state = true, meta, nd.Address(), st
	if st == StateAlive {
		m.lastSeen = now
	}
	n.mu.Unlock()
	n.log.Info("cluster member "+st.String(), "member", nd.Name, "role", meta.Role.String(), "addr", nd.Address())
	n.signal()
}

func (e *events) NotifyJoin(nd *memberlist.Node)   { e.note(nd, StateAlive) }
func (e *events) NotifyUpdate(nd *memberlist.Node) { e.note(nd, StateAlive) }
func (e *events) NotifyLeave(nd *memberlist.Node)  { e.note(nd, StateDead) }

// pings implements memberlist.PingDelegate: it keeps each member's
// round-trip time, smoothed (7/8 old, 1/8 new), from memberlist's direct
// probes (one member per ProbeInterval, 1 s on a LAN). Builders rank
// servers by it.
type pings Node

func (p *pings) AckPayload() []byte { return nil }

func (p *pings) NotifyPingComplete(nd *memberlist.Node, rtt time.Duration, _ []byte) {
	n := (*Node)(p)
	n.mu.Lock()
	defer n.mu.Unlock()
	if m := n.members[nd.Name]; m != nil {
		if m.rtt == 0 {
			m.rtt = rtt
		} else {
			m.rtt = (7*m.rtt + rtt) / 8
		}
	}
}

// loop joins the seeds (backoff 1 s to 30 s until one answers), then
// re-joins lost seeds every RejoinInterval and keeps last-seen times.
func (n *Node) loop() {
	defer close(n.done)
	joined := len(n.cfg.Join) == 0
	backoff := time.Second
	wait := time.Duration(0)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	nextRejoin := time.Now().Add(RejoinInterval)
	for {
		if !joined {
			select {
			case <-n.stop:
				return
			case <-time.After(wait):
			}
			k, err := n.ml.Join(n.cfg.Join)
			if err != nil || k == 0 {
				n.log.Error("join cluster failed; retrying", "seeds", n.cfg.Join, "err", flatErr(err), "retry_in", backoff,
					"hint", "check that a seed runs and that cluster.name and cluster.keyring_file match its (a seed that closes the connection at once (EOF) has another cluster.name)")
				wait, backoff = backoff, min(2*backoff, 30*time.Second)
				continue
			}
			joined = true
			// Our own join exchanged the whole state with a seed (the
			// seed's table carries every member's state it knows).
			n.mu.Lock()
			n.synced = true
			n.mu.Unlock()
			n.log.Info("joined cluster", "seeds_answered", k, "members", n.ml.NumMembers())
		}
		select {
		case <-n.stop:
			return
		case now := <-tick.C:
			n.refresh(now)
			if len(n.cfg.Join) > 0 && now.After(nextRejoin) {
				nextRejoin = now.Add(RejoinInterval)
				n.rejoinLost()
			}
		}
	}
}

// refresh updates suspect/alive from memberlist and last-seen times.
func (n *Node) refresh(now time.Time) {
	live := map[string]memberlist.NodeStateType{}
	for _, nd := range n.ml.Members() {
		live[nd.Name] = nd.State
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	for name, m := range n.members {
		st, ok := live[name]
		if !ok || m.state == StateDead || m.state == StateLeft {
			continue
		}
		switch st {
		case memberlist.StateAlive:
			if m.state != StateAlive {
				m.state, m.since = StateAlive, now
			}
			m.lastSeen = now
		case memberlist.StateSuspect:
			if m.state != StateSuspect {
				m.state, m.since = StateSuspect, now
			}
		}
	}
}

// rejoinLost joins every seed that is not an alive member's address.
func (n *Node) rejoinLost() {
	alive := map[string]bool{}
	for _, nd := range n.ml.Members() {
		if nd.State == memberlist.StateAlive && nd.Name != n.self.Node {
			alive[nd.Address()] = true
		}
	}
	var lost []string
	for _, seed := range n.cfg.Join {
		addrs, err := resolve(seed)
		if err != nil {
			lost = append(lost, seed)
			continue
		}
		if !slices.ContainsFunc(addrs, func(a string) bool { return alive[a] }) && !slices.Contains(addrs, n.Addr()) {
			lost = append(lost, seed)
		}
	}
	if len(lost) == 0 {
		return
	}
	if k, err := n.ml.Join(lost); err == nil && k > 0 {
		n.log.Info("re-joined cluster seeds", "seeds", lost)
	} else {
		n.log.Debug("re-join cluster seeds", "seeds", lost, "err", err)
	}
}

// flatErr renders memberlist's multi-errors on one line.
func flatErr(err error) string {
	if err == nil {
		return "no seed answered"
	}
	s := err.Error()
	if i := strings.Index(s, "occurred:"); i >= 0 {
		s = s[i+len("occurred:"):]
	}
	s = strings.ReplaceAll(s, "\n\t* ", "; ")
	return strings.Trim(strings.Join(strings.Fields(s), " "), "; ")
}

func resolve(hostport string) ([]string, error) {
	h, p, err := net.SplitHostPort(hostport)
	if err != nil {
		return nil, err
	}
	if ip := net.ParseIP(h); ip != nil {
		return []string{net.JoinHostPort(ip.String(), p)}, nil
	}
	ips, err := net.DefaultResolver.LookupIPAddr(context.Background(), h)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, ip := range ips {
		out = append(out, net.JoinHostPort(ip.IP.String(), p))
	}
	return out, nil
}

// Holds returns, per generation, the builders that hold it (sorted), and
// whether this node knows enough to say: false until its own join of a
// seed exchanged state, or Settle has passed since start (a member without
// seeds, such as a restarted server, waits for builders to re-join it). Retention destroys
// nothing while it is false.
func (n *Node) Holds() (map[uint64][]string, bool) {
	now := time.Now()
	n.mu.Lock()
	defer n.mu.Unlock()
	out := map[uint64][]string{}
	for name, s := range n.states {
		if s.Role != RoleBuilder || !n.holdsLocked(name, now) {
			continue
		}
		for _, g := range s.Mounted {
			if !slices.Contains(out[g], name) {
				out[g] = append(out[g], name)
			}
		}
	}
	for g := range out {
		slices.Sort(out[g])
	}
	return out, n.synced || now.Sub(n.started) >= n.cfg.Settle
}

func (n *Node) holdsLocked(name string, now time.Time) bool {
	if n.states[name].Left {
		return false
	}
	m := n.members[name]
	if m == nil {
		return true
	}
	switch m.state {
	case StateLeft:
		return false
	case StateDead:
		return now.Sub(m.since) < n.cfg.DeadGrace
	}
	return true
}

// SettleLeft is how long Holds will still report "not known yet" (0 once
// known).
func (n *Node) SettleLeft() time.Duration {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.synced {
		return 0
	}
	return max(0, n.cfg.Settle-time.Since(n.started))
}

// Server is a server member as builders see it.
type Server struct {
	Name   string
	API    string
	NFS    string
	Newest uint64
	// Replica: the server is a replica of another (publishes nothing).
	Replica bool
	// RTT is the smoothed round-trip time of this node's probes of the
	// server (0: not probed yet).
	RTT time.Duration
}

// MemberState returns what this node knows of member name's liveness.
func (n *Node) MemberState(name string) (MemberState, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	m := n.members[name]
	if m == nil || !m.known {
		return 0, false
	}
	return m.state, true
}

// Servers returns the alive server members, the ones with the newest
// generation first, then by name.
func (n *Node) Servers() []Server {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []Server
	for name, m := range n.members {
		if m.meta.Role != RoleServer || (m.state != StateAlive && m.state != StateSuspect) || !m.known {
			continue
		}
		out = append(out, Server{Name: name, API: m.meta.API, NFS: m.meta.NFS, Newest: n.states[name].Newest(), Replica: m.meta.Replica, RTT: m.rtt})
	}
	slices.SortFunc(out, func(a, b Server) int {
		if a.Newest != b.Newest {
			if a.Newest > b.Newest {
				return -1
			}
			return 1
		}
		return strings.Compare(a.Name, b.Name)
	})
	return out
}

// NewestGeneration returns the newest generation any server member has
// announced (0: none).
func (n *Node) NewestGeneration() uint64 {
	n.mu.Lock()
	defer n.mu.Unlock()
	var g uint64
	for _, s := range n.states {
		if s.Role == RoleServer {
			g = max(g, s.Newest())
		}
	}
	return g
}

// Member is one member as `strata members` shows it.
type Member struct {
	Name    string      `json:"name"`
	Role    Role        `json:"role"`
	Address string      `json:"address"`
	State   MemberState `json:"state"`
	Since   time.Time   `json:"since"`
	// Generations: a server's live ones, a builder's mounted ones.
	Generations []uint64   `json:"generations"`
	Partial     bool       `json:"generations_partial,omitempty"`
	Server      string     `json:"server,omitempty"`
	Phase       string     `json:"phase,omitempty"`
	Version     string     `json:"version,omitempty"`
	API         string     `json:"api,omitempty"`
	NFS         string     `json:"nfs,omitempty"`
	LastSeen    *time.Time `json:"last_seen,omitempty"`
	// Holds says whether retention counts this member's generations.
	Holds bool `json:"holds"`
	Self  bool `json:"self,omitempty"`
	// Replica marks a server that is a replica of another.
	Replica bool `json:"replica,omitempty"`
}

// Members lists every member this node knows, itself included, by name.
func (n *Node) Members() []Member {
	now := time.Now()
	addr := n.Addr() // memberlist's lock: never while holding n.mu (see merge)
	n.mu.Lock()
	defer n.mu.Unlock()
	gensOf := func(s State) []uint64 {
		out := []uint64{}
		if s.Role == RoleServer {
			for _, g := range s.Generations {
				out = append(out, g.ID)
			}
			return out
		}
		return append(out, s.Mounted...)
	}
	self := Member{Name: n.self.Node, Role: n.self.Role, Address: addr, State: StateAlive, Since: n.started,
		Generations: gensOf(n.self), Server: n.self.Server, Phase: n.self.Phase, Version: n.cfg.Meta.Version,
		API: n.cfg.Meta.API, NFS: n.cfg.Meta.NFS, LastSeen: &now, Holds: n.self.Role == RoleBuilder, Self: true, Replica: n.cfg.Meta.Replica}
	out := []Member{self}
	for name, m := range n.members {
		s := n.states[name]
		role := m.meta.Role
		if role == RoleUnknown {
			role = s.Role
		}
		x := Member{Name: name, Role: role, Address: m.addr, State: m.state, Since: m.since,
			Generations: gensOf(s), Partial: s.Partial, Server: s.Server, Phase: s.Phase, Version: m.meta.Version,
			API: m.meta.API, NFS: m.meta.NFS, Holds: role == RoleBuilder && n.holdsLocked(name, now), Replica: m.meta.Replica}
		if s.Role == RoleUnknown {
			x.Generations = gensOf(State{Role: role})
		}
		if !m.lastSeen.IsZero() {
			t := m.lastSeen
			x.LastSeen = &t
		}
		out = append(out, x)
	}
	slices.SortFunc(out, func(a, b Member) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// Leave announces a graceful departure (builders' holds are released at
// once), waiting at most timeout, then closes the member. The "left" state
// goes to every server member over TCP (they decide retention) and to the
// rest by gossip, then memberlist's own leave follows.
func (n *Node) Leave(timeout time.Duration) error {
	n.setState(func(s *State) { s.Left = true })
	n.mu.Lock()
	msg := EncodeState(n.self.forBroadcast())
	var servers []string
	for name, m := range n.members {
		if m.meta.Role == RoleServer && m.state == StateAlive {
			servers = append(servers, name)
		}
	}
	n.mu.Unlock()
	for _, nd := range n.ml.Members() {
		if slices.Contains(servers, nd.Name) {
			if err := n.ml.SendReliable(nd, msg); err != nil {
				n.log.Warn("tell server about leaving", "server", nd.Name, "err", err)
			}
		}
	}
	err := n.ml.Leave(timeout)
	if err != nil {
		n.log.Warn("leave cluster", "err", err)
	} else {
		n.log.Info("left cluster")
	}
	return errors.Join(err, n.Close())
}

// Close stops the member without leaving (others will see it die). After
// it, no member event changes what the node reports or logs. It is safe to
// call more than once.
func (n *Node) Close() error {
	n.closeMu.Lock()
	defer n.closeMu.Unlock()
	if n.closed {
		return nil
	}
	n.closed = true
	n.closing.Store(true)
	close(n.stop)
	<-n.done
	n.sendWG.Wait()
	n.mlLog.off.Store(true)
	if err := n.ml.Shutdown(); err != nil {
		return fmt.Errorf("stop cluster member: %w", err)
	}
	return nil
}
