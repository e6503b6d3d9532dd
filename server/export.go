package server

import (
	"context"
	"fmt"
	"log/slog"
	"net"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/strata-nix/strata/internal/lifecycle"
	"github.com/strata-nix/strata/server/nfs"
	"github.com/strata-nix/strata/server/nfs/guard"
)

// export is the NFS export and its listener as the daemon holds them. All
// fields are nil when nfs.listen is empty.
type export struct {
	exp    *nfs.Export
	serve  func(context.Context) error
	guard  *guard.Listener     // SetAllow on reload
	accept *lifecycle.Listener // the kernel listener, watched for the watchdog
}

func (e export) close() {
	if e.exp != nil {
		e.exp.Close()
	}
	if e.accept != nil {
		e.accept.Close()
	}
}

// openExport builds the NFS export and binds its guarded listener (the
// stack of nfs.Listen). With nfs.listen empty there is no export (a zero
// export, nil).
func openExport(_ context.Context, cfg Config, log *slog.Logger, reg *prometheus.Registry) (export, error) {
	if cfg.NFSListen == "" {
		return export{}, nil
	}
	nfs.SetGoNFSLogger(log)
	exp, err := nfs.New(nfs.Options{StateDir: cfg.StateDir, Logger: log.With("component", "nfs"), Registry: reg})
	if err != nil {
		return export{}, err
	}
	raw, err := net.Listen("tcp", cfg.NFSListen)
	if err != nil {
		exp.Close()
		return export{}, fmt.Errorf("bind nfs.listen %s: %w", cfg.NFSListen, err)
	}
	l := lifecycle.WatchListener(raw, "nfs accept loop", acceptStall)
	gl, err := nfs.Listen(nfs.ListenOptions{Inner: l, BusyPoll: cfg.NFSBusyPoll, Guard: guard.Options{
		Allow: cfg.NFSAllow, MaxConns: cfg.NFSMaxConns, MaxConnsPerClient: cfg.NFSMaxPerClient, IdleTimeout: cfg.NFSIdleTimeout,
	}}, log, reg)
	if err != nil {
		l.Close()
		exp.Close()
		return export{}, err
	}
	log.Info("nfs export listening", "addr", l.Addr().String(), "allow", cfg.NFSAllow)
	return export{exp: exp, serve: func(ctx context.Context) error { return exp.Serve(ctx, gl) }, guard: gl, accept: l}, nil
}
