package builder

import (
	"context"
	"log/slog"
	"slices"
	"time"

	"github.com/strata-nix/strata/cluster"
)

// Gossip connects an agent to the cluster (cluster.*): it reports the
// agent's mounted generations (extra lowers and the generation a rotation is
// mounting included), its phase and its server to every member, and wakes
// the agent when a server announces a newer generation. The server members
// it knows are failover candidates (Servers).
type Gossip struct {
	node *cluster.Node
	cfg  Config
	log  *slog.Logger
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

// Attach reports ag's state after each transition and wakes ag when a
// server announces a generation newer than the mounted one, until ctx
// ends.
func (g *Gossip) Attach(ctx context.Context, ag *Agent) {
	report := func(s State) {
		server := s.Server.API
		if server == "" {
			server = g.cfg.ServerAPI
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
// of its overlay (extra lowers too), during a rotation the ones it is
// mounting, and those of detached overlays processes still use
// (State.Retired: a sandboxed build, a cwd or open file in the old
// overlay).
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
	for _, r := range s.Retired {
		for _, g := range r.Generations {
			add(g)
		}
	}
	return out
}
