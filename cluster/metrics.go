package cluster

import (
	"bytes"
	"context"
	"log/slog"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// stats counts gossip messages.
type stats struct {
	msgs *prometheus.CounterVec
}

func newStats() *stats {
	return &stats{msgs: prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "strata_cluster_gossip_messages_total",
		Help: "Gossip messages of strata's own state: kind (state broadcast, table push/pull), direction (in, out), result (new, stale, malformed, sent).",
	}, []string{"kind", "direction", "result"})}
}

func (s *stats) sent(kind string)             { s.msgs.WithLabelValues(kind, "out", "sent").Inc() }
func (s *stats) received(kind, result string) { s.msgs.WithLabelValues(kind, "in", result).Inc() }

var (
	descMembers = prometheus.NewDesc("strata_cluster_members", "Cluster members this node knows, itself included, by role and state.",
		[]string{"role", "state"}, nil)
	descHeld    = prometheus.NewDesc("strata_cluster_generations_held", "Distinct generations held by builders (what retention must keep).", nil, nil)
	descHolders = prometheus.NewDesc("strata_cluster_generation_holders", "Builders holding each generation.",
		[]string{"generation"}, nil)
)

// Register adds the node's metrics to reg: members by role and state,
// generations held, holders per generation, gossip messages.
func (n *Node) Register(reg prometheus.Registerer) error {
	if err := reg.Register(n.stats.msgs); err != nil {
		return err
	}
	return reg.Register((*collector)(n))
}

type collector Node

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descMembers
	ch <- descHeld
	ch <- descHolders
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	n := (*Node)(c)
	count := map[[2]string]int{}
	for _, r := range []Role{RoleServer, RoleBuilder} {
		for _, s := range []MemberState{StateAlive, StateSuspect, StateDead, StateLeft} {
			count[[2]string{r.String(), s.String()}] = 0
		}
	}
	for _, m := range n.Members() {
		count[[2]string{m.Role.String(), m.State.String()}]++
	}
	for k, v := range count {
		ch <- prometheus.MustNewConstMetric(descMembers, prometheus.GaugeValue, float64(v), k[0], k[1])
	}
	holds, _ := n.Holds()
	ch <- prometheus.MustNewConstMetric(descHeld, prometheus.GaugeValue, float64(len(holds)))
	for g, who := range holds {
		ch <- prometheus.MustNewConstMetric(descHolders, prometheus.GaugeValue, float64(len(who)), strconv.FormatUint(g, 10))
	}
}

// logWriter turns memberlist's "[LEVEL] memberlist: text" lines into slog
// records, and says what a refused packet most likely means.
type logWriter struct {
	log     *slog.Logger
	refused atomic.Int64
	// off drops memberlist's lines once the member is closing: its
	// goroutines may still log after Shutdown returns.
	off atomic.Bool
}

func (w *logWriter) Write(p []byte) (int, error) {
	if w.off.Load() {
		return len(p), nil
	}
	for _, line := range bytes.Split(bytes.TrimRight(p, "\n"), []byte("\n")) {
		s := string(line)
		if i := strings.Index(s, "["); i >= 0 {
			s = s[i:]
		}
		level := slog.LevelInfo
		switch {
		case strings.HasPrefix(s, "[DEBUG]"):
			level = slog.LevelDebug
		case strings.HasPrefix(s, "[WARN]"):
			level = slog.LevelWarn
		case strings.HasPrefix(s, "[ERR]"):
			level = slog.LevelError
		}
		if j := strings.Index(s, "] "); j >= 0 {
			s = s[j+2:]
		}
		s = strings.TrimPrefix(s, "memberlist: ")
		low := strings.ToLower(s)
		if strings.Contains(low, "use of closed network connection") {
			level = slog.LevelDebug // sockets closing after Leave/Close
		}
		switch {
		case strings.Contains(low, "decrypt") || strings.Contains(low, "encryption") || strings.Contains(low, "not encrypted"):
			w.refused.Add(1)
			w.log.Error("gossip refused: a peer does not share this cluster's key", "detail", s,
				"hint", "every member needs a key of the same cluster.keyring_file (or all cluster.insecure)")
		case strings.Contains(low, "label"):
			w.refused.Add(1)
			w.log.Error("gossip refused: a peer of another cluster.name", "detail", s)
		default:
			w.log.Log(context.Background(), level, "memberlist: "+s)
		}
	}
	return len(p), nil
}
