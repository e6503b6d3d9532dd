package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

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

	token, err := readToken(cfg.TokenFile)
	if err != nil {
		return err
	}
	status := func() any {
		g, _ := srv.Latest()
		return map[string]any{"role": "server", "latest": g.ID, "generations": srv.Generations(),
			"nfs": cfg.NFSListen, "backend": cfg.Backend}
	}
	h := srv.Handler(token, reg, status)
	var servers []*http.Server
	errc := make(chan error, 4)
	if cfg.APIListen != "" {
		l, err := net.Listen("tcp", cfg.APIListen)
		if err != nil {
			return fmt.Errorf("listen api %s: %w", cfg.APIListen, err)
		}
		hs := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
		servers = append(servers, hs)
		go func() { errc <- serveHTTP(hs, l) }()
		log.Info("api listening", "addr", l.Addr().String())
	}
	os.Remove(cfg.Socket)
	ul, err := net.Listen("unix", cfg.Socket)
	if err != nil {
		return fmt.Errorf("listen api socket %s: %w", cfg.Socket, err)
	}
	os.Chmod(cfg.Socket, 0o660)
	hs := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, ConnContext: SocketConnContext}
	servers = append(servers, hs)
	go func() { errc <- serveHTTP(hs, ul) }()

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
	}
	daemon.SdNotify(false, daemon.SdNotifyStopping)
	log.Info("shutting down")
	cancel()
	sctx, scancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer scancel()
	for _, s := range servers {
		s.Shutdown(sctx)
	}
	if exp != nil {
		exp.Close()
	}
	os.Remove(cfg.Socket)
	return runErr
}

func serveHTTP(s *http.Server, l net.Listener) error {
	if err := s.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve api: %w", err)
	}
	return nil
}

// readToken reads the API bearer token; a missing file means TCP mutating
// calls are refused (the unix socket still works).
func readToken(file string) (string, error) {
	if file == "" {
		return "", nil
	}
	b, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read api.token_file: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

