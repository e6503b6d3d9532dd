package main

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/builder"
	"github.com/strata-nix/strata/internal/lifecycle"
)

const defaultBuilderSocket = "/var/lib/strata/builder/api.sock"

func newBuilderCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "builder",
		Short: "Run the builder agent: mount the newest generation under the store dir and rotate",
		Long: `Run the builder agent. It mounts the server's newest generation read-only over
NFS as the lower layer of an overlay on store.dir (upper and workdirs in
state_dir), registers its paths in the local Nix database (rows written into
its SQLite DB directly, signatures and content addresses included; nix-store
--load-db only when the DB's schema is unknown), tells systemd
READY=1, and rotates atomically to each newer generation. Every key of the
YAML file is also an environment variable STRATA_SECTION_KEY and a flag
--section-key; a STRATA_* variable strata does not read (a mistyped key)
stops the start, naming it.`,
		Args: cobra.NoArgs,
	}
	loader, file := configFlags(cmd, builder.Keys, builder.DefaultConfigFile)
	checkOnly := cmd.Flags().Bool("check-config", false, "validate the configuration, read the secret files a start reads (api.token_file, cluster.keyring_file), ask server.api whether it answers and its nfs.allow admits this host (WARNING lines), change nothing, and exit")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		v, err := loadConfig(cmd, loader, *file)
		if err != nil {
			return err
		}
		cfg, err := builder.ConfigFrom(v)
		if err != nil {
			return usageError{err}
		}
		if *checkOnly {
			// Worded as the server's --check-config.
			if err := builder.CheckSecrets(cfg); err != nil {
				fmt.Fprintf(cmd.OutOrStdout(), "ERROR: %v\nconfiguration: refused\n", err)
				return fmt.Errorf("check config: 1 problem, printed above as ERROR")
			}
			for _, line := range builder.AskServer(cmd.Context(), cfg) {
				fmt.Fprintln(cmd.OutOrStdout(), line)
			}
			fmt.Fprintln(cmd.OutOrStdout(), "configuration: ok")
			return nil
		}
		// An unsafe api.token_file is a configuration error (exit 2) as a
		// bad key is; the start would refuse it first thing anyway.
		if err := builder.CheckSecrets(cfg); err != nil {
			return usageError{err}
		}
		log, level := newLogger(cfg.LogLevel)
		return builder.Daemon(cmd.Context(), cfg, log, builder.DaemonOptions{
			Notify:   lifecycle.Systemd(log),
			Watchdog: lifecycle.WatchdogInterval(),
			Hup:      hangups(cmd.Context()),
			Level:    level,
			Version:  version,
			Reload: func() (builder.Config, error) {
				v, err := loadConfig(cmd, loader, *file)
				if err != nil {
					return builder.Config{}, err
				}
				return builder.ConfigFrom(v)
			},
		})
	}
	cmd.AddCommand(newBuilderRotateCmd())
	return cmd
}

func newBuilderRotateCmd() *cobra.Command {
	var addr, tokenFile, server string
	var jsonOut bool
	cmd := &cobra.Command{
		Use:   "rotate",
		Short: "Make the local builder agent rotate to the server's newest generation now",
		Long: `Ask the local builder agent to check for a newer generation and rotate to it
now, whatever rotate.policy says, and wait for the result.

With --server X (a gossip member name or an API URL the builder knows), move
to server X instead: rotate through it to its newest generation when that is
newer than the mounted one, else serve the mounted generation from X (the
same atomic swap as a failover; X must serve it with the same registration).
X stays the server in use until the next failover or rotate --server.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if addr == "" {
				addr = os.Getenv("STRATA_API")
			}
			if addr == "" {
				addr = "unix:" + defaultBuilderSocket
			}
			var token string
			if tokenFile != "" {
				b, err := os.ReadFile(tokenFile)
				if err != nil {
					return fmt.Errorf("read token: %w", err)
				}
				token = strings.TrimSpace(string(b))
			}
			var st builder.Status
			c := api.NewClient(addr, token)
			path := "/v1/rotate"
			if server != "" {
				path += "?server=" + url.QueryEscape(server)
			}
			if err := c.Do(context.WithoutCancel(cmd.Context()), http.MethodPost, path, &st); err != nil {
				return err
			}
			if jsonOut {
				return printJSON(cmd.OutOrStdout(), st)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "generation %d (%s) from server %s, last rotation took %s, %d paths imported\n",
				st.Generation, st.State, st.ServerName, st.LastRotationDuration, st.PathsImported)
			return nil
		},
	}
	cmd.Flags().StringVar(&addr, "api", "", "builder API: unix:/path or host:port (default unix:"+defaultBuilderSocket+"; env STRATA_API)")
	cmd.Flags().StringVar(&tokenFile, "token-file", "", "bearer token file, for TCP")
	cmd.Flags().BoolVar(&jsonOut, "json", false, "print the status as JSON")
	cmd.Flags().StringVar(&server, "server", "", "move to this server (gossip member name or API URL) now")
	return cmd
}
