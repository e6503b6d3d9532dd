package builder

import (
	"cmp"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/strata-nix/strata/cluster"
)

// Endpoint is one strata server as a builder reaches it.
type Endpoint struct {
	// Name is the server's gossip member name, or its API URL when it is
	// known only from the configuration.
	Name string `json:"name"`
	// API is its HTTP API base URL: the endpoint's identity.
	API string `json:"api"`
	// NFS is the host:port generations are mounted from; empty: what the
	// server advertises (the "nfs" field of GET /v1/generations, an
	// unspecified host replaced by the API URL's host).
	NFS string `json:"nfs,omitempty"`
}

// IsZero reports whether e names no server.
func (e Endpoint) IsZero() bool { return e.API == "" }

// String is "name (api)", or the API URL when the name is the URL.
func (e Endpoint) String() string {
	if e.Name != "" && e.Name != e.API {
		return e.Name + " (" + e.API + ")"
	}
	return e.API
}

// Is reports whether e is the server named by s: its gossip name or its
// API URL.
func (e Endpoint) Is(s string) bool {
	return s != "" && (s == e.Name || normAPI(s) == normAPI(e.API))
}

// slug is a name for e usable in a mountpoint and an overlay option: its
// API URL's host and port, with everything but letters, digits, '.', '-'
// and '_' replaced by '_'.
func (e Endpoint) slug() string {
	h := e.API
	if u, err := url.Parse(e.API); err == nil && u.Host != "" {
		h = u.Host
	}
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '-', r == '_':
			return r
		}
		return '_'
	}, h)
}

func normAPI(s string) string { return strings.TrimRight(s, "/") }

// Candidate is a server the agent may use, as its Directory sees it.
type Candidate struct {
	Endpoint
	// RTT is gossip's measured round-trip time to the server (0: unknown).
	RTT time.Duration
}

// Directory lists the servers a builder may use and talks to them.
// *Servers is the real one.
type Directory interface {
	// Candidates returns the servers believed usable, best first (see
	// rankCandidates).
	Candidates() []Candidate
	// Dead reports whether e is known dead (gossip: its member is dead or
	// left), with the reason.
	Dead(e Endpoint) (bool, string)
	// Client returns an API client for e.
	Client(e Endpoint) Server
}

// rankCandidates orders cs best first: the ones server.prefer names (by
// gossip name or API URL) in its order, then server.api, then by lowest
// gossip RTT (known before unknown), then by name.
func rankCandidates(cs []Candidate, prefer []string, primary string) {
	rank := func(c Candidate) int {
		for i, p := range prefer {
			if c.Is(p) {
				return i
			}
		}
		if c.Is(primary) {
			return len(prefer)
		}
		return len(prefer) + 1
	}
	slices.SortStableFunc(cs, func(a, b Candidate) int {
		if r := cmp.Compare(rank(a), rank(b)); r != 0 {
			return r
		}
		if (a.RTT == 0) != (b.RTT == 0) {
			if a.RTT == 0 {
				return 1
			}
			return -1
		}
		if r := cmp.Compare(a.RTT, b.RTT); r != 0 {
			return r
		}
		return cmp.Compare(a.Name, b.Name)
	})
}

// GossipView is what Servers asks the cluster: *cluster.Node is one.
type GossipView interface {
	Servers() []cluster.Server
	MemberState(name string) (cluster.MemberState, bool)
}

// Servers is the builder's Directory: the servers it is configured with
// (server.api, and the API URLs listed in server.prefer) and, with
// gossip, every alive server member (replicas included) that announces an
// API address. A configured server that gossip also knows is one
// candidate, with its member name; server.nfs applies to server.api's.
type Servers struct {
	cfg    Config
	gossip GossipView // nil: configured servers only
	dial   func(api string) Server

	mu      sync.Mutex
	clients map[string]Server
}

// NewServers returns the Directory of cfg; g may be nil (no gossip); dial
// makes an API client for a base URL.
func NewServers(cfg Config, g GossipView, dial func(api string) Server) *Servers {
	return &Servers{cfg: cfg, gossip: g, dial: dial, clients: map[string]Server{}}
}

// Candidates implements Directory.
func (s *Servers) Candidates() []Candidate {
	var out []Candidate
	add := func(c Candidate) {
		if i := slices.IndexFunc(out, func(o Candidate) bool { return normAPI(o.API) == normAPI(c.API) }); i >= 0 {
			if c.Name != c.API {
				out[i].Name = c.Name
			}
			if out[i].NFS == "" {
				out[i].NFS = c.NFS
			}
			out[i].RTT = max(out[i].RTT, c.RTT)
			return
		}
		out = append(out, c)
	}
	if s.gossip != nil {
		for _, m := range s.gossip.Servers() {
			if m.API == "" {
				continue
			}
			add(Candidate{Endpoint: Endpoint{Name: m.Name, API: m.API, NFS: m.NFS}, RTT: m.RTT})
		}
	}
	if s.cfg.ServerAPI != "" {
		add(Candidate{Endpoint: Endpoint{Name: s.cfg.ServerAPI, API: s.cfg.ServerAPI, NFS: s.cfg.ServerNFS}})
		if s.cfg.ServerNFS != "" {
			i := slices.IndexFunc(out, func(o Candidate) bool { return o.Is(s.cfg.ServerAPI) })
			out[i].NFS = s.cfg.ServerNFS
		}
	}
	for _, p := range s.cfg.Prefer {
		if isURL(p) {
			add(Candidate{Endpoint: Endpoint{Name: p, API: p}})
		}
	}
	// A configured server that gossip knows to be dead is no candidate.
	out = slices.DeleteFunc(out, func(c Candidate) bool {
		d, _ := s.Dead(c.Endpoint)
		return d
	})
	rankCandidates(out, s.cfg.Prefer, s.cfg.ServerAPI)
	return out
}

// Dead implements Directory: gossip says e's member is dead or left. A
// server gossip has never seen is not dead.
func (s *Servers) Dead(e Endpoint) (bool, string) {
	if s.gossip == nil || e.Name == "" || e.Name == e.API {
		return false, ""
	}
	st, ok := s.gossip.MemberState(e.Name)
	if !ok || (st != cluster.StateDead && st != cluster.StateLeft) {
		return false, ""
	}
	return true, "gossip: member " + e.Name + " is " + st.String()
}

// Client implements Directory; clients are kept per API URL.
func (s *Servers) Client(e Endpoint) Server {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := normAPI(e.API)
	c, ok := s.clients[k]
	if !ok {
		c = s.dial(e.API)
		s.clients[k] = c
	}
	return c
}

func isURL(s string) bool {
	u, err := url.Parse(s)
	return err == nil && (u.Scheme == "http" || u.Scheme == "https") && u.Host != ""
}

// fixedServer is the Directory of an agent given one Server (Options.Server
// without Options.Servers): server.api, nothing to fail over to.
type fixedServer struct {
	e   Endpoint
	srv Server
}

func (f fixedServer) Candidates() []Candidate      { return []Candidate{{Endpoint: f.e}} }
func (f fixedServer) Dead(Endpoint) (bool, string) { return false, "" }
func (f fixedServer) Client(Endpoint) Server       { return f.srv }
