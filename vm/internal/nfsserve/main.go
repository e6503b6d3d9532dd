// Command nfsserve is a test helper for the VM tier: it exports directories
// as strata generations with package server/nfs, so a test can run the real
// export in a child process (to kill -9 and restart it) or inside a guest
// (built with CGO_ENABLED=0).
//
//	nfsserve -listen 127.0.0.1:0 -state DIR -gen 1=/path/to/store [-gen 2=...]
//
// It prints "LISTEN host:port" once it accepts connections, serves until
// SIGTERM or SIGINT, and exits 0. A generation's directory is opened once at
// start: a remounted snapshot is picked up by restarting the process.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/strata-nix/strata/server/nfs"
	"github.com/strata-nix/strata/server/nfs/guard"
)

type gens map[uint64]string

func (g gens) String() string { return fmt.Sprint(map[uint64]string(g)) }

func (g gens) Set(v string) error {
	id, dir, ok := strings.Cut(v, "=")
	n, err := strconv.ParseUint(id, 10, 64)
	if !ok || err != nil || n == 0 || dir == "" {
		return fmt.Errorf("want N=DIR with N>0, got %q", v)
	}
	g[n] = dir
	return nil
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "TCP address to serve NFS and MOUNT on")
	state := flag.String("state", "", "state directory (handle key)")
	g := gens{}
	flag.Var(g, "gen", "generation to export, N=DIR (repeatable)")
	flag.Parse()
	if err := run(*listen, *state, g); err != nil {
		fmt.Fprintln(os.Stderr, "nfsserve:", err)
		os.Exit(1)
	}
}

func run(listen, state string, g gens) error {
	if state == "" || len(g) == 0 {
		return fmt.Errorf("need -state and at least one -gen")
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	exp, err := nfs.New(nfs.Options{StateDir: state, Logger: log})
	if err != nil {
		return err
	}
	defer exp.Close()
	for id, dir := range g {
		if err := exp.Add(id, dir); err != nil {
			return err
		}
	}
	l, err := nfs.Listen(nfs.ListenOptions{Addr: listen,
		Guard: guard.Options{Allow: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}}}, log, nil)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	fmt.Printf("LISTEN %s\n", l.Addr())
	return exp.Serve(ctx, l)
}
