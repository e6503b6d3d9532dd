package server

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/strata-nix/strata/api"
)

type metrics struct {
	deferrals *prometheus.CounterVec
	publishes *prometheus.CounterVec
	duration  prometheus.Histogram
}

// newMetrics registers the server's collectors on reg (nil: none).
func newMetrics(reg *prometheus.Registry, s *Server) *metrics {
	m := &metrics{
		deferrals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strata_retention_deferrals_total",
			Help: "Generations a retention pass would have destroyed but kept, by reason: held (by builders), unknown (holds not known yet).",
		}, []string{"reason"}),
		publishes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strata_publish_total", Help: "Publish attempts by result (published, unchanged, error).",
		}, []string{"result"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "strata_publish_duration_seconds", Help: "Time of publish attempts, snapshot included.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 14),
		}),
	}
	if reg == nil {
		return m
	}
	reg.MustRegister(m.publishes, m.duration, m.deferrals,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "strata_generations", Help: "Live generations."},
			func() float64 { return float64(len(s.Generations())) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "strata_generation_latest", Help: "Id of the newest live generation (0: none)."},
			func() float64 { g, _ := s.Latest(); return float64(g.ID) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "strata_generations_missing", Help: "Generations whose manifest is kept but whose snapshot is missing (see strata generations forget)."},
			func() float64 { return float64(len(s.Missing())) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "strata_publish_refused", Help: "1 while publishing is refused because store.root is another store."},
			func() float64 {
				if s.storeErr != nil {
					return 1
				}
				return 0
			}),
	)
	return m
}

func (m *metrics) observePublish(res api.PublishResult, err error, took time.Duration) {
	switch {
	case err != nil:
		m.publishes.WithLabelValues("error").Inc()
	case res.Published:
		m.publishes.WithLabelValues("published").Inc()
	default:
		m.publishes.WithLabelValues("unchanged").Inc()
	}
	m.duration.Observe(took.Seconds())
}

func (m *metrics) retentionDeferred(reason string) { m.deferrals.WithLabelValues(reason).Inc() }
