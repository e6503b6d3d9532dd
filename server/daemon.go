package server

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"reflect"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/strata-nix/strata/internal/apiserve"
	"github.com/strata-nix/strata/internal/lifecycle"
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

// DaemonOptions connect the daemon to its service manager. The zero value
// notifies systemd through $NOTIFY_SOCKET and never reloads.
type DaemonOptions struct {
	Notify   lifecycle.Notifier // nil: lifecycle.Systemd
	Watchdog time.Duration      // WATCHDOG=1 interval; 0: none (see lifecycle.WatchdogInterval)
	Hup      <-chan os.Signal   // SIGHUP: reload
	// Reload re-reads the configuration. nfs.allow, api.token_file and
	// log.level take effect; other changed keys are logged as needing a
	// restart.
	Reload func() (Config, error)
	Level  *slog.LevelVar // the logger's level; reload sets it
	// StopTimeout bounds the graceful stop (default 20 s, below the unit's
	// TimeoutStopSec).
	StopTimeout time.Duration
}

// acceptStall is how long the NFS accept loop may be away from Accept
// (handing a connection off) before it counts as wedged.
const acceptStall = time.Minute

// Daemon runs `strata server` until ctx ends. The order of start:
//  1. open the backend and the state dir, re-export live generations;
//  2. bind the NFS listener and the API (TCP and unix socket);
//  3. READY=1 to systemd (the API answers and every live generation is
//     exported), then publish once and every publish.interval.
//
// While it runs, the main loop sends WATCHDOG=1 when the publish loop and
// the NFS accept loop make progress (see package lifecycle), and reloads
// nfs.allow, the API token and log.level on SIGHUP (RELOADING=1 … READY=1).
//
// Shutdown (ctx cancelled): STOPPING=1, stop publishing, close the API, close
// the NFS listener, waiting at most StopTimeout. Snapshots stay: a restart
// serves the same generations with the same file handles.
func Daemon(ctx context.Context, cfg Config, log *slog.Logger, o DaemonOptions) error {
	if o.Notify == nil {
		o.Notify = lifecycle.Systemd(log)
	}
	if o.StopTimeout <= 0 {
		o.StopTimeout = 20 * time.Second
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("create state dir: %w", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	backend, err := OpenBackend(cfg, log)
	if err != nil {
		return err
	}
	ex, err := openExport(ctx, cfg, log, reg)
	if err != nil {
		return err
	}
	var exporter Exporter
	if ex.exp != nil {
		exporter = ex.exp
	}
	step := lifecycle.NewStep("publish loop", cfg.StallAfter)
	srv, err := New(ctx, Options{Config: cfg, Logger: log, Backend: backend, Export: exporter, Registry: reg, Progress: step})
	if err != nil {
		ex.close()
		return err
	}

	tokenText, err := apiserve.ReadToken(cfg.TokenFile)
	if err != nil {
		ex.close()
		return err
	}
	token := apiserve.NewToken(tokenText)
	status := func() any {
		g, _ := srv.Latest()
		return map[string]any{"role": "server", "latest": g.ID, "generations": srv.Generations(),
			"nfs": cfg.NFSListen, "backend": cfg.Backend}
	}
	h := srv.Handler(token, reg, status)
	as, err := apiserve.Start(h, cfg.APIListen, cfg.Socket, log)
	if err != nil {
		ex.close()
		return err
	}
	errc := make(chan error, 3)
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	nfsDone := make(chan struct{})
	if ex.serve != nil {
		go func() { defer close(nfsDone); errc <- ex.serve(runCtx) }()
	} else {
		close(nfsDone)
	}
	o.Notify("READY=1")
	notifyStatus := func() {
		if g, ok := srv.Latest(); ok {
			o.Notify(fmt.Sprintf("STATUS=serving generation %d", g.ID))
		} else {
			o.Notify("STATUS=no generation yet")
		}
	}
	notifyStatus()
	pubDone := make(chan struct{})
	go func() {
		defer close(pubDone)
		step.Begin()
		_, err := srv.Publish(runCtx)
		step.End()
		if err == nil {
			notifyStatus()
		}
		errc <- srv.Run(runCtx)
	}()
	go func() {
		if err, ok := <-as.Err(); ok {
			errc <- err
		}
	}()

	checks := []lifecycle.Check{step.Check}
	if ex.accept != nil {
		checks = append(checks, ex.accept.Check)
	}
	main := lifecycle.Main{Notify: o.Notify, Log: log, Watchdog: o.Watchdog, Checks: checks, Hup: o.Hup,
		Reload: func(context.Context) error {
			if o.Reload == nil {
				return fmt.Errorf("reload: no configuration file to re-read")
			}
			next, err := o.Reload()
			if err != nil {
				return err
			}
			return applyReload(cfg, next, ex, token, o.Level, log)
		}}
	runErr := main.Run(ctx, errc)

	o.Notify("STOPPING=1")
	log.Info("shutting down")
	cancel()
	stopErr := lifecycle.Stop(o.StopTimeout, "publish loop, API and NFS export", func() {
		<-pubDone
		as.Shutdown(ctx)
		<-nfsDone
		ex.close()
	})
	if runErr == nil {
		runErr = stopErr
	}
	return runErr
}

// applyReload makes next's nfs.allow, token and log level current. It reads
// everything first, so a bad token file changes nothing.
func applyReload(cur, next Config, ex export, token *apiserve.Token, level *slog.LevelVar, log *slog.Logger) error {
	text, err := apiserve.ReadToken(next.TokenFile)
	if err != nil {
		return fmt.Errorf("reload: %w", err)
	}
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(next.LogLevel)); err != nil {
		return fmt.Errorf("reload: log.level %q: %w", next.LogLevel, err)
	}
	if ex.guard != nil {
		ex.guard.SetAllow(next.NFSAllow)
	}
	token.Set(text)
	if level != nil {
		level.Set(lv)
	}
	// Everything else needs a restart: say which keys differ.
	a, b := cur, next
	a.NFSAllow, a.TokenFile, a.LogLevel = nil, "", ""
	b.NFSAllow, b.TokenFile, b.LogLevel = nil, "", ""
	if !reflect.DeepEqual(a, b) {
		log.Warn("reload: some changed keys take effect only after a restart", "changed", changedFields(a, b))
	}
	log.Info("reloaded", "nfs.allow", next.NFSAllow, "log.level", next.LogLevel, "api.token_file", next.TokenFile)
	return nil
}

// changedFields names the Config fields that differ between a and b.
func changedFields(a, b Config) []string {
	var out []string
	va, vb := reflect.ValueOf(a), reflect.ValueOf(b)
	for i := range va.NumField() {
		if !reflect.DeepEqual(va.Field(i).Interface(), vb.Field(i).Interface()) {
			out = append(out, va.Type().Field(i).Name)
		}
	}
	return out
}
