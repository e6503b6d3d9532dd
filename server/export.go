package server

import (
	"context"
	"fmt"
	"log/slog"
	"net"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/strata-nix/strata/server/nfs"
	"github.com/strata-nix/strata/server/nfs/busypoll"
	"github.com/strata-nix/strata/server/nfs/guard"
)

// openExport builds the NFS export and binds its guarded listener. With
// nfs.listen empty there is no export (nil, nil, nil).
func openExport(_ context.Context, cfg Config, log *slog.Logger, reg *prometheus.Registry) (*nfs.Export, func(context.Context) error, error) {
	if cfg.NFSListen == "" {
		return nil, nil, nil
	}
	exp, err := nfs.New(nfs.Options{StateDir: cfg.StateDir, Logger: log.With("component", "nfs"), Registry: reg})
	if err != nil {
		return nil, nil, err
	}
	l, err := net.Listen("tcp", cfg.NFSListen)
	if err != nil {
		exp.Close()
		return nil, nil, fmt.Errorf("listen nfs %s: %w", cfg.NFSListen, err)
	}
	window := cfg.NFSBusyPoll
	if window == 0 {
		window = -1 // disabled
	}
	bl := busypoll.Listen(l, window)
	if err := reg.Register(bl); err != nil {
		l.Close()
		exp.Close()
		return nil, nil, fmt.Errorf("register busy-poll metrics: %w", err)
	}
	gl, err := guard.Listen(bl, guard.Options{Allow: cfg.NFSAllow, MaxConns: cfg.NFSMaxConns, IdleTimeout: cfg.NFSIdleTimeout},
		log.With("component", "nfs-guard"), reg)
	if err != nil {
		l.Close()
		exp.Close()
		return nil, nil, err
	}
	log.Info("nfs export listening", "addr", l.Addr().String(), "allow", cfg.NFSAllow)
	return exp, func(ctx context.Context) error { return exp.Serve(ctx, gl) }, nil
}
