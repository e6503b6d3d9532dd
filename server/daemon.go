package server

import (
	"context"
	"fmt"
	"log/slog"
	"os"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/strata-nix/strata/internal/apiserve"
	"github.com/strata-nix/strata/snapshot"
	"github.com/strata-nix/strata/snapshot/btrfs"
	"github.com/strata-nix/strata/snapshot/zfs"
)

// OpenBackend returns the snapshot backend the configuration names.
func OpenBackend(cfg Config, log *slog.Logger) (snapshot.Backend, error) {
	switch cfg.Backend {
	case "btrfs":
		if err := os.MkdirAll(cfg.SnapshotDir, 0o755); err != nil {
			return nil, fmt.Errorf("create snapshot dir: %w", err)
		}
		return btrfs.New(cfg.StoreRoot, cfg.SnapshotDir, log)
	case "zfs":
		if err := os.MkdirAll(cfg.MountDir, 0o755); err != nil {
			return nil, fmt.Errorf("create mount dir: %w", err)
		}
		return zfs.New(cfg.Dataset, cfg.MountDir, log)
	}
	return nil, fmt.Errorf("snapshot backend %q: want btrfs or zfs", cfg.Backend)
}

// Daemon runs `strata server` until ctx ends. The order of start:
//  1. open the backend and the state dir, re-export live generations;
//  2. bind the NFS listener and the API (TCP and unix socket);
//  3. READY=1 to systemd, then publish once and every publish.interval.
//
// Shutdown (ctx cancelled): STOPPING=1, stop publishing, close the API, close
// the NFS listener. Snapshots stay: a restart serves the same generations
// with the same file handles.
func Daemon(ctx context.Context, cfg Config, log *slog.Logger) error {
	if err := os.MkdirAll(cfg.StateDir, 0o755); err != nil {
		return fmt.Errorf("create state dir: %w", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	backend, err := OpenBackend(cfg, log)
	if err != nil {
		return err
	}
	exp, serveNFS, err := openExport(ctx, cfg, log, reg)
	if err != nil {
		return err
	}
	var exporter Exporter
	if exp != nil {
		exporter = exp
	}
	srv, err := New(ctx, Options{Config: cfg, Logger: log, Backend: backend, Export: exporter, Registry: reg})
	if err != nil {
		return err
	}

	token, err := apiserve.ReadToken(cfg.TokenFile)
	if err != nil {
		return err
	}
	status := func() any {
		g, _ := srv.Latest()
		return map[string]any{"role": "server", "latest": g.ID, "generations": srv.Generations(),
			"nfs": cfg.NFSListen, "backend": cfg.Backend}
	}
	h := srv.Handler(token, reg, status)
	as, err := apiserve.Start(h, cfg.APIListen, cfg.Socket, log)
	if err != nil {
		return err
	}
	errc := make(chan error, 2)
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	if serveNFS != nil {
		go func() { errc <- serveNFS(runCtx) }()
	}
	daemon.SdNotify(false, daemon.SdNotifyReady)
	notifyStatus := func() {
		g, ok := srv.Latest()
		if ok {
			daemon.SdNotify(false, fmt.Sprintf("STATUS=serving generation %d", g.ID))
		} else {
			daemon.SdNotify(false, "STATUS=no generation yet")
		}
	}
	notifyStatus()
	go func() {
		if _, err := srv.Publish(runCtx); err == nil {
			notifyStatus()
		}
		errc <- srv.Run(runCtx)
	}()

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
	case runErr = <-as.Err():
	}
	daemon.SdNotify(false, daemon.SdNotifyStopping)
	log.Info("shutting down")
	cancel()
	as.Shutdown(ctx)
	if exp != nil {
		exp.Close()
	}
	return runErr
}
