package main

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/strata-nix/strata/config"
	"github.com/strata-nix/strata/internal/lifecycle"
	"github.com/strata-nix/strata/server"
)

// newLogger logs text to stderr (the journal under systemd) at a level
// that SIGHUP can change.
func newLogger(level string) (*slog.Logger, *slog.LevelVar) {
	var l slog.Level
	_ = l.UnmarshalText([]byte(level))
	lv := new(slog.LevelVar)
	lv.Set(l)
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lv})), lv
}

// hangups delivers SIGHUP until ctx ends.
func hangups(ctx context.Context) <-chan os.Signal {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGHUP)
	context.AfterFunc(ctx, func() { signal.Stop(ch) })
	return ch
}

// configFlags adds --config and one flag per key, and returns a loader.
func configFlags(cmd *cobra.Command, keys []config.Key, defaultFile string) (*config.Loader, *string) {
	file := cmd.Flags().String("config", defaultFile, "YAML configuration file")
	l := config.New(keys)
	l.BindFlags(cmd.Flags())
	return l, file
}

// loadConfig reads the file (it must exist when --config was given) after
// refusing a STRATA_* environment variable that strata does not read.
func loadConfig(cmd *cobra.Command, l *config.Loader, file string) (config.Values, error) {
	if err := checkEnv(); err != nil {
		return config.Values{}, usageError{err}
	}
	v, err := l.Load(file, cmd.Flags().Changed("config"))
	if err != nil {
		return v, usageError{err}
	}
	return v, nil
}

func newServerCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "server",
		Short: "Run the server daemon: publish, retain and export generations",
		Long: `Run the server daemon. It snapshots the central store (store.root, a btrfs
subvolume or ZFS dataset holding store/ and var/nix/db/) into generations when
it changed, verifies each one, serves their metadata on the HTTP API and their
files over NFSv3 at /gen/N. Every key of the YAML file is also an environment
variable STRATA_SECTION_KEY and a flag --section-key; a STRATA_* variable
strata does not read (a mistyped key) stops the start, naming it.`,
		Args: cobra.NoArgs,
	}
	loader, file := configFlags(cmd, server.Keys, server.DefaultConfigFile)
	checkOnly := cmd.Flags().Bool("check-config", false, "validate the configuration, read the token files and check the snapshot location as a start does, report what a start would do with the state dir, the snapshots, the snapshot dir's owner, the store identity and the NFS handle key (ERROR lines: what a start refuses; WARNING lines: what it goes ahead with and reports), change nothing, and exit (1 if the start or publishing would be refused)")
	adoptStore := cmd.Flags().Bool("adopt-store", false, "publish store.root although it is not the central store the generations come from (its identity is recorded from now on)")
	newKey := cmd.Flags().Bool("new-handle-key", false, "make a new NFS handle key although generations exist and the key is missing: every mounted client gets ESTALE until it remounts")
	claimDir := cmd.Flags().Bool("claim-snapshot-dir", false, "btrfs: make this server the owner of snapshot.snapshot_dir although another server's owner record names it or it holds live snapshots this state_dir does not know (only when they are this server's own, or that server is gone for good)")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		v, err := loadConfig(cmd, loader, *file)
		if err != nil {
			return err
		}
		cfg, err := server.ConfigFrom(v)
		if err != nil {
			return usageError{err}
		}
		cfg.AdoptStore, cfg.NewHandleKey, cfg.ClaimSnapshotDir = *adoptStore, *newKey, *claimDir
		if *checkOnly {
			return server.Check(cmd.Context(), cfg, cmd.OutOrStdout())
		}
		log, level := newLogger(cfg.LogLevel)
		err = server.Daemon(cmd.Context(), cfg, log, server.DaemonOptions{
			Notify:   lifecycle.Systemd(log),
			Watchdog: lifecycle.WatchdogInterval(),
			Hup:      hangups(cmd.Context()),
			Level:    level,
			Version:  version,
			Reload: func() (server.Config, error) {
				v, err := loadConfig(cmd, loader, *file)
				if err != nil {
					return server.Config{}, err
				}
				next, err := server.ConfigFrom(v)
				// One-shot start flags are not keys: a reload keeps them.
				next.AdoptStore, next.NewHandleKey, next.ClaimSnapshotDir = *adoptStore, *newKey, *claimDir
				return next, err
			},
		})
		if errors.Is(err, server.ErrConfig) {
			return usageError{err}
		}
		return err
	}
	return cmd
}
