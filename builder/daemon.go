package builder

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/cluster"
	"github.com/strata-nix/strata/config"
	"github.com/strata-nix/strata/internal/apiserve"
	"github.com/strata-nix/strata/internal/lifecycle"
)

// DaemonOptions connect the agent to its service manager. The zero value
// notifies systemd through $NOTIFY_SOCKET and never reloads.
type DaemonOptions struct {
	Notify   lifecycle.Notifier // nil: lifecycle.Systemd
	Watchdog time.Duration      // WATCHDOG=1 interval; 0: none (see lifecycle.WatchdogInterval)
	Hup      <-chan os.Signal   // SIGHUP: reload
	// Reload re-reads the configuration: api.token_file and log.level take
	// effect, other changed keys are logged as needing a restart.
	Reload func() (Config, error)
	Level  *slog.LevelVar // the logger's level; reload sets it
	// StopTimeout bounds the graceful stop (default 20 s, below the unit's
	// TimeoutStopSec).
	StopTimeout time.Duration
	// Version is strata's version, told to cluster members.
	Version string
	// Gossip, if set, is the agent's cluster member: Serve reports the
	// agent's state through it, wakes the agent on a publish, serves
	// /v1/members and /v1/cluster/keys, and leaves the cluster on stop
	// (which releases the builder's holds at once).
	Gossip *Gossip
}

// CheckSecrets reads the secret files a start reads (api.token_file; the
// gossip keyring is read with the configuration), changing nothing:
// `strata builder --check-config` and the start's first step.
func CheckSecrets(cfg Config) error {
	_, err := apiserve.ReadToken(cfg.TokenFile, "api.token_file")
	return err
}

// Daemon runs `strata builder` until ctx ends. Order of start:
//  1. create the state dir layout, load state.json, bind the API socket
//     (and api.listen), so `strata status` works while waiting;
//  2. Agent.Run: reconcile and mount (retrying with backoff while the
//     server is unreachable), READY=1 once the store dir is mounted and
//     imported, then poll and rotate.
//
// While it runs, the main loop sends WATCHDOG=1 while no start attempt,
// import or rotation has run longer than watchdog.stall_after, and reloads
// the API token and log.level on SIGHUP (RELOADING=1 … READY=1).
//
// Shutdown (ctx cancelled): STOPPING=1, finish the step under way, close
// the API, waiting at most StopTimeout. Mounts stay: a restart re-adopts
// them without remounting.
func Daemon(ctx context.Context, cfg Config, log *slog.Logger, o DaemonOptions) error {
	if o.Notify == nil {
		o.Notify = lifecycle.Systemd(log)
	}
	// The secrets before anything is created (the keyring was read with
	// the configuration).
	if err := CheckSecrets(cfg); err != nil {
		return err
	}
	if cfg.Cluster.Enabled && o.Gossip == nil {
		g, err := NewGossip(cfg, o.Version, log)
		if err != nil {
			return err
		}
		defer g.Node().Close()
		o.Gossip = g
	}
	var view GossipView
	if o.Gossip != nil {
		view = o.Gossip.Node()
	}
	servers := NewServers(cfg, view, func(u string) Server { return api.NewClient(u, "") })
	sys := NewSystem(NFSGenerations(cfg.NConnect, cfg.MountOptions, log), cfg.SwapMethod, cfg.StagingDir, log)
	sys.DeadDir = filepath.Join(cfg.StateDir, "dead")
	sys.AdoptDead(ctx)
	ag, err := New(Options{
		Config:   cfg,
		Logger:   log,
		Servers:  servers,
		Mounter:  sys,
		Nix:      NewNixStore(cfg, log),
		Notify:   o.Notify,
		Progress: lifecycle.NewStep("builder loop", cfg.StallAfter),
	})
	if err != nil {
		return err
	}
	return Serve(ctx, ag, cfg, log, o)
}

// Serve runs ag with its API listeners (the unix socket cfg.Socket and,
// when set, cfg.APIListen) and the lifecycle main loop until ctx ends.
func Serve(ctx context.Context, ag *Agent, cfg Config, log *slog.Logger, o DaemonOptions) error {
	if o.Notify == nil {
		o.Notify = lifecycle.Systemd(log)
	}
	if o.StopTimeout <= 0 {
		o.StopTimeout = 20 * time.Second
	}
	text, err := apiserve.ReadToken(cfg.TokenFile, "api.token_file")
	if err != nil {
		return err
	}
	token := apiserve.NewToken(text)
	mux := http.NewServeMux()
	if o.Gossip != nil {
		o.Gossip.Node().Routes(mux, token)
	} else {
		cluster.OffRoutes(mux)
	}
	mux.Handle("/", ag.Handler(token))
	var h http.Handler = mux
	as, err := apiserve.Start(h, cfg.APIListen, cfg.Socket, log)
	if err != nil {
		return err
	}
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	if o.Gossip != nil {
		o.Gossip.Attach(runCtx, ag)
	}
	errc := make(chan error, 2)
	agentDone := make(chan struct{})
	go func() {
		defer close(agentDone)
		if err := ag.Run(runCtx); err != nil {
			errc <- err
		}
	}()
	go func() {
		if err, ok := <-as.Err(); ok {
			errc <- err
		}
	}()
	var checks []lifecycle.Check
	if ag.step != nil {
		checks = append(checks, ag.step.Check)
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
			return applyReload(cfg, next, token, o.Level, log)
		}}
	runErr := main.Run(ctx, errc)

	o.Notify("STOPPING=1")
	log.Info("shutting down")
	cancel()
	stopErr := lifecycle.Stop(o.StopTimeout, "builder agent and API", func() {
		<-agentDone
		if o.Gossip != nil {
			o.Gossip.Node().Leave(2 * time.Second)
		}
		as.Shutdown(ctx)
	})
	if runErr == nil {
		runErr = stopErr
	}
	return runErr
}

// applyReload makes next's token and log level current; a token file that
// cannot be read changes nothing.
func applyReload(cur, next Config, token *apiserve.Token, level *slog.LevelVar, log *slog.Logger) error {
	text, err := apiserve.ReadToken(next.TokenFile, "api.token_file")
	if err != nil {
		return fmt.Errorf("reload: %w", err)
	}
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(next.LogLevel)); err != nil {
		return fmt.Errorf("reload: log.level %q: %w", next.LogLevel, err)
	}
	token.Set(text)
	if level != nil {
		level.Set(lv)
	}
	a, b := cur, next
	a.TokenFile, a.LogLevel, b.TokenFile, b.LogLevel = "", "", "", ""
	if changed := config.Changed(a, b); len(changed) > 0 {
		log.Warn("reload: some changed keys take effect only after a restart", "changed", changed)
	}
	log.Info("reloaded", "log.level", next.LogLevel, "api.token_file", next.TokenFile)
	return nil
}
