package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/strata-nix/strata/cluster"
)

// gossipMemberEnv names the member a re-executed test binary runs as: a
// builder-role cluster member (the real cluster package, real sockets) that
// reports STRATA_TEST_GOSSIP_HOLD (comma-separated generations) as mounted,
// joins STRATA_TEST_GOSSIP_JOIN from STRATA_TEST_GOSSIP_BIND with the
// keyring STRATA_TEST_GOSSIP_KEYS, and on SIGTERM leaves as the builder
// daemon does (builder.Serve). Host kernels here have no NFS client, so the
// cluster tests use it where a builder's only part in the story is what it
// reports.
const gossipMemberEnv = "STRATA_TEST_GOSSIP_MEMBER"

func gossipMember() int {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("member", os.Getenv(gossipMemberEnv))
	kr, err := cluster.LoadKeyring("cluster.keyring_file", os.Getenv("STRATA_TEST_GOSSIP_KEYS"))
	if err != nil {
		log.Error("keyring", "err", err)
		return 1
	}
	var hold []uint64
	for _, f := range strings.Split(os.Getenv("STRATA_TEST_GOSSIP_HOLD"), ",") {
		if g, err := strconv.ParseUint(f, 10, 64); err == nil {
			hold = append(hold, g)
		}
	}
	n, err := cluster.New(cluster.Config{Name: os.Getenv(gossipMemberEnv), ClusterName: "strata-test",
		Bind: os.Getenv("STRATA_TEST_GOSSIP_BIND"), Join: strings.Split(os.Getenv("STRATA_TEST_GOSSIP_JOIN"), ","),
		Keyring: kr, DeadGrace: time.Hour, Meta: cluster.Meta{Role: cluster.RoleBuilder, Version: "test"}}, log)
	if err != nil {
		log.Error("start", "err", err)
		return 1
	}
	n.SetBuilderState("test", "idle", hold)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	if err := n.Leave(2 * time.Second); err != nil {
		fmt.Fprintln(os.Stderr, "leave:", err)
		return 1
	}
	return 0
}
