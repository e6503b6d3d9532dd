package builder

import (
	"context"
	"log/slog"

	"github.com/coreos/go-systemd/v22/daemon"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/apiserve"
)

// Daemon runs `strata builder` until ctx ends. Order of start:
//  1. create the state dir layout, load state.json, bind the API socket
//     (and api.listen), so `strata status` works while waiting;
//  2. Agent.Run: reconcile and mount (retrying with backoff while the
//     server is unreachable), READY=1, then poll and rotate.
//
// Shutdown (ctx cancelled): STOPPING=1, finish the step under way, close
// the API. Mounts stay: a restart re-adopts them without remounting.
func Daemon(ctx context.Context, cfg Config, log *slog.Logger) error {
	var ag *Agent
	gm := func(ctx context.Context, gen uint64, dir string) error {
		host, port, err := cfg.NFSAddress(ag.AdvertisedNFS())
		if err != nil {
			return err
		}
		return NFSGenerations(host, port, cfg.NConnect, cfg.MountOptions)(ctx, gen, dir)
	}
	ag, err := New(Options{
		Config:  cfg,
		Logger:  log,
		Server:  api.NewClient(cfg.ServerAPI, ""),
		Mounter: NewSystem(gm, cfg.SwapMethod, cfg.StagingDir, log),
		Nix:     NewNixStore(cfg),
		Notify:  func(s string) { daemon.SdNotify(false, s) },
	})
	if err != nil {
		return err
	}
	return Serve(ctx, ag, cfg, log)
}

// Serve runs ag with its API listeners (the unix socket cfg.Socket and,
// when set, cfg.APIListen) until ctx ends.
func Serve(ctx context.Context, ag *Agent, cfg Config, log *slog.Logger) error {
	token, err := apiserve.ReadToken(cfg.TokenFile)
	if err != nil {
		return err
	}
	as, err := apiserve.Start(ag.Handler(token), cfg.APIListen, cfg.Socket, log)
	if err != nil {
		return err
	}
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- ag.Run(runCtx) }()
	var runErr error
	select {
	case <-ctx.Done():
		runErr = <-errc
	case runErr = <-errc:
	case runErr = <-as.Err():
		cancel()
		<-errc
	}
	log.Info("shutting down")
	cancel()
	as.Shutdown(ctx)
	return runErr
}
