package builder

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/strata-nix/strata/cluster"
)

// Gossip connects an agent to the cluster (cluster.*): it reports the
// agent's mounted generations (extra lowers and the generation a rotation is
// mounting included), its phase and its server to every member, wakes the
// agent when a server announces a newer generation, and, when server.api is
// empty, picks the server the agent talks to from the server members.
type Gossip struct {
	node *cluster.Node
	cfg  Config
	log  *slog.Logger

	mu  sync.Mutex
	cur string // name of the server member in use (server.api empty)
}

// NewGossip starts the agent's cluster member.
func NewGossip(cfg Config, version string, log *slog.Logger) (*Gossip, error) {
	n, err := cluster.New(cfg.Cluster.Config(cluster.Meta{Role: cluster.RoleBuilder, Version: version}), log)
	if err != nil {
		return nil, err
	}
	return &Gossip{node: n, cfg: cfg, log: log}, nil
}

// Node is the cluster member.
func (g *Gossip) Node() *cluster.Node { return g.node }

// Server returns the server member the agent uses: the one it used before
// while it is alive, else the one with the newest generation.
func (g *Gossip) Server() (cluster.Server, error) {
	ss := g.node.Servers()
	g.mu.Lock()
	defer g.mu.Unlock()
	if i := slices.IndexFunc(ss, func(s cluster.Server) bool { return s.Name == g.cur }); i >= 0 {
		return ss[i], nil
	}
	if len(ss) == 0 {
		return cluster.Server{}, fmt.Errorf("no strata server known by gossip yet (cluster.join %v)", g.cfg.Cluster.Join)
	}
	if g.cur != "" {
		g.log.Warn("server member gone; switching", "from", g.cur, "to", ss[0].Name)
	}
	g.cur = ss[0].Name
	return ss[0], nil
}

// API returns the API base URL of Server (for api.NewResolvingClient).
func (g *Gossip) API() (string, error) {
	s, err := g.Server()
	if err != nil {
		return "", err
	}
	if s.API == "" {
		return "", fmt.Errorf("server member %s announces no API address (its api.listen is empty)", s.Name)
	}
	return s.API, nil
}

// NFS returns the NFS address of Server.
func (g *Gossip) NFS() (string, int, error) {
	s, err := g.Server()
	if err != nil {
		return "", 0, err
	}
	h, p, err := net.SplitHostPort(s.NFS)
	port, perr := strconv.Atoi(p)
	if err != nil || perr != nil || h == "" {
		return "", 0, fmt.Errorf("server member %s announces NFS address %q: want host:port", s.Name, s.NFS)
	}
	return h, port, nil
}

// Attach reports ag's state after each transition and wakes ag when a
// server announces a generation newer than the mounted one, until ctx
// ends.
func (g *Gossip) Attach(ctx context.Context, ag *Agent) {
	report := func(s State) {
		server := g.cfg.ServerAPI
		if server == "" {
			g.mu.Lock()
			server = g.cur
			g.mu.Unlock()
		}
		g.node.SetBuilderState(server, s.Phase.String(), Holding(s))
	}
	ag.Watch(report)
	go func() {
		var woken uint64
		hadServer := false
		// While a newer generation is announced and not mounted (the idle
		// policy waits for builds), look again every 5 s: the rotation
		// starts within 5 s of the last build ending, whatever
		// rotate.check_interval says.
		retry := time.NewTicker(5 * time.Second)
		defer retry.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-g.node.Changed():
			case <-retry.C:
				if n := g.node.NewestGeneration(); ag.Ready() && n > ag.State().Generation {
					ag.Wake()
				}
				continue
			}
			newest := g.node.NewestGeneration()
			hasServer := len(g.node.Servers()) > 0
			switch {
			case !ag.Ready() && hasServer && (!hadServer || newest > woken):
				ag.Wake() // a server appeared: try to start now
			case ag.Ready() && newest > ag.State().Generation && newest > woken:
				g.log.Info("gossip announced a newer generation", "generation", newest)
				ag.Wake()
			default:
				hadServer = hasServer
				continue
			}
			hadServer, woken = hasServer, max(woken, newest)
		}
	}()
}

// Holding lists the generations a builder in state s holds: every lower
// of its overlay (extra lowers too) and, during a rotation, the ones it is
// mounting.
func Holding(s State) []uint64 {
	var out []uint64
	add := func(g uint64) {
		if g != 0 && !slices.Contains(out, g) {
			out = append(out, g)
		}
	}
	add(s.Generation)
	for _, l := range s.Lowers {
		add(l.Gen)
	}
	add(s.Target)
	for _, l := range s.Next {
		add(l.Gen)
	}
	return out
}
