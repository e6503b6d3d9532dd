package builder

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"

	"github.com/strata-nix/strata/api"
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
	token, err := readToken(cfg.TokenFile)
	if err != nil {
		return err
	}
	h := ag.Handler(token)
	errc := make(chan error, 3)
	var servers []*http.Server
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
	go func() { errc <- ag.Run(runCtx) }()
	var runErr error
	select {
	case <-ctx.Done():
		runErr = <-errc
	case runErr = <-errc:
	}
	log.Info("shutting down")
	cancel()
	sctx, scancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer scancel()
	for _, s := range servers {
		s.Shutdown(sctx)
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
