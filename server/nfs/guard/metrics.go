package guard

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics of the guard. Names:
//
//	strata_nfs_guard_connections_accepted_total           admitted connections
//	strata_nfs_guard_connections_rejected_total{reason}   closed by the guard: allowlist, cap, idle, record
//	strata_nfs_guard_connections                          open admitted connections
//	strata_nfs_guard_bad_records_total{problem}           refused records by Problem
//	strata_nfs_guard_accept_errors_total{errno}           temporary accept errors retried (emfile, enfile...)
type metrics struct {
	acceptErrors *prometheus.CounterVec
	accepted     prometheus.Counter
	rejected     *prometheus.CounterVec
	current      prometheus.Gauge
	badRecords   *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		accepted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "strata_nfs_guard_connections_accepted_total",
			Help: "NFS connections admitted by the guard.",
		}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strata_nfs_guard_connections_rejected_total",
			Help: "NFS connections closed by the guard, by reason (allowlist, cap, idle, record).",
		}, []string{"reason"}),
		current: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "strata_nfs_guard_connections",
			Help: "Open NFS connections admitted by the guard.",
		}),
		badRecords: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strata_nfs_guard_bad_records_total",
			Help: "ONC RPC records refused by the guard, by problem.",
		}, []string{"problem"}),
	}
	m.acceptErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "strata_nfs_guard_accept_errors_total",
		Help: "Temporary errors accepting NFS connections (emfile, enfile, enobufs, enomem, econnaborted...), each retried after a backoff.",
	}, []string{"errno"})
	for _, r := range []Reason{ReasonAllowlist, ReasonCap, ReasonIdle, ReasonRecord} {
		m.rejected.WithLabelValues(r.String())
	}
	if reg == nil {
		return m, nil
	}
	var err error
	m.accepted, err = register(reg, m.accepted)
	if err != nil {
		return nil, err
	}
	if m.rejected, err = register(reg, m.rejected); err != nil {
		return nil, err
	}
	if m.current, err = register(reg, m.current); err != nil {
		return nil, err
	}
	if m.badRecords, err = register(reg, m.badRecords); err != nil {
		return nil, err
	}
	if m.acceptErrors, err = register(reg, m.acceptErrors); err != nil {
		return nil, err
	}
	return m, nil
}

// register registers c, or returns the collector already registered under
// the same name.
func register[C prometheus.Collector](reg prometheus.Registerer, c C) (C, error) {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing, nil
			}
		}
		return c, fmt.Errorf("register nfs guard metrics: %w", err)
	}
	return c, nil
}
