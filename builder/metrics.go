package builder

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// metrics are the agent's Prometheus collectors, served at GET /metrics
// on its API. Counts the state file keeps (failovers) and values of the
// current state are read when scraped; rotations and imports are counted
// as they end.
type metrics struct {
	reg       *prometheus.Registry
	rotations *prometheus.CounterVec
	imports   *prometheus.HistogramVec
}

// Import methods, the label of strata_builder_import_duration_seconds.
const (
	importRows  = "rows"  // path rows written into the local Nix DB
	importNixDB = "nixdb" // the generation's whole Nix DB installed
)

func newMetrics(a *Agent) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		rotations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strata_builder_rotations_total", Help: "Rotations to a newer generation (failovers that rotate included), by result (ok, error).",
		}, []string{"result"}),
		imports: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "strata_builder_import_duration_seconds", Help: "Time of registering a generation's paths in the local Nix DB, by method: rows (path rows written) or nixdb (the generation's whole DB installed into an empty one).",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 16),
		}, []string{"method"}),
	}
	// Both results exist from the start, so a rate over them works.
	m.rotations.WithLabelValues("ok")
	m.rotations.WithLabelValues("error")
	read := func(f func(a *Agent) float64) func() float64 {
		return func() float64 {
			a.mu.Lock()
			defer a.mu.Unlock()
			return f(a)
		}
	}
	m.reg.MustRegister(m.rotations, m.imports,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "strata_builder_generation", Help: "Generation the store dir serves (0: none yet)."},
			read(func(a *Agent) float64 { return float64(a.st.Generation) })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "strata_builder_generation_latest", Help: "Newest generation the server in use listed."},
			read(func(a *Agent) float64 { return float64(a.latest) })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "strata_builder_ready", Help: "1 once the agent serves a generation (READY=1)."},
			read(func(a *Agent) float64 { return b2f(a.ready) })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "strata_builder_rotation_last_seconds", Help: "Time of the last successful rotation, from its start to the old generation's release (0: none yet)."},
			read(func(a *Agent) float64 { return a.st.LastRotationDuration.Seconds() })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "strata_builder_failovers_total", Help: "Automatic failovers to another server (kept across restarts)."},
			read(func(a *Agent) float64 { return float64(a.st.Failovers) })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "strata_builder_server_unanswered_seconds", Help: "How long the server in use has not answered the failover monitor's probes (0: it answers)."},
			read(func(a *Agent) float64 {
				if a.health.Since.IsZero() {
					return 0
				}
				return time.Since(a.health.Since).Seconds()
			})),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "strata_builder_retired_overlays", Help: "Overlays a swap detached that processes still use; their generations stay held."},
			read(func(a *Agent) float64 { return float64(len(a.st.Retired)) })),
	)
	return m
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// rotated counts a rotation that ended with err. A nil m (an Agent not
// made by New) counts nothing.
func (m *metrics) rotated(err error) {
	if m == nil {
		return
	}
	if err != nil {
		m.rotations.WithLabelValues("error").Inc()
		return
	}
	m.rotations.WithLabelValues("ok").Inc()
}

// imported records an import by method that took took.
func (m *metrics) imported(method string, took time.Duration) {
	if m == nil {
		return
	}
	m.imports.WithLabelValues(method).Observe(took.Seconds())
}
