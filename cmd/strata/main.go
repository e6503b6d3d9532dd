// Command strata shares one central Nix store with many build machines
// without copying it. `strata server` and `strata builder` are the daemons;
// the other subcommands talk to the local daemon's HTTP API.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	root := newRoot()
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "strata:", err)
		if used != nil {
			if h := hint(err, *used); h != "" {
				fmt.Fprintln(os.Stderr, "strata:", h)
			}
		}
		var ue usageError
		if errors.As(err, &ue) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

type usageError struct{ error }

func newRoot() *cobra.Command {
	root := &cobra.Command{
		Use:   "strata",
		Short: "Share a Nix store with build machines through read-only generations",
		Long: `strata shares one central Nix store with many build machines without copying it.

A server snapshots the central store into numbered, immutable generations and
exports them read-only over NFSv3 (MOUNT path /gen/N). A builder mounts the
newest generation as the lower layer of an overlay on /nix/store, registers its
paths in the local Nix DB (signatures and content addresses included), and
rotates atomically to each new one. Gossip (strata members) announces new
generations and keeps generations a builder uses from retention.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	// A mistyped flag is a usage error (exit 2) as a bad key is: the units'
	// RestartPreventExitStatus=2 keeps systemd from restarting into it.
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	root.AddCommand(newServerCmd(), newBuilderCmd())
	root.AddCommand(clientCommands()...)
	root.AddCommand(clusterCommands()...)
	root.AddCommand(&cobra.Command{
		Use:   "version",
		Short: "Print strata's version",
		Args:  cobra.NoArgs,
		Run:   func(cmd *cobra.Command, _ []string) { fmt.Fprintln(cmd.OutOrStdout(), "strata", version) },
	})
	return root
}
