package server

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/cluster"
	"github.com/strata-nix/strata/config"
	"github.com/strata-nix/strata/internal/apiserve"
	"github.com/strata-nix/strata/internal/lifecycle"
	"github.com/strata-nix/strata/internal/secretfile"
	"github.com/strata-nix/strata/server/nfs"
	"github.com/strata-nix/strata/server/replica"
	"github.com/strata-nix/strata/snapshot"
	"github.com/strata-nix/strata/snapshot/btrfs"
	"github.com/strata-nix/strata/snapshot/zfs"
)

// OpenBackend returns the snapshot backend the configuration names.
func OpenBackend(cfg Config, log *slog.Logger) (snapshot.Backend, error) {
	if cfg.Replica() {
		switch cfg.Backend {
		case "btrfs":
			// Checked where it would be created before it is created.
			if parent := existingParent(cfg.SnapshotDir); parent != filepath.Clean(cfg.SnapshotDir) {
				if _, err := btrfs.InspectReplica(parent, nil); err != nil {
					return nil, fmt.Errorf("snapshot.snapshot_dir %s does not exist, and creating it in %s would not help: %w", cfg.SnapshotDir, parent, err)
				}
			}
			return btrfs.NewReplica(cfg.SnapshotDir, log)
		case "zfs":
			return zfs.NewReplica(cfg.Dataset, cfg.MountDir, log)
		}
	}
	switch cfg.Backend {
	case "btrfs":
		if parent := existingParent(cfg.SnapshotDir); parent != filepath.Clean(cfg.SnapshotDir) {
			if _, err := btrfs.Inspect(cfg.StoreRoot, parent, nil); err != nil {
				return nil, fmt.Errorf("snapshot.snapshot_dir %s does not exist, and creating it in %s would not help: %w", cfg.SnapshotDir, parent, err)
			}
		}
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
	// Reload re-reads the configuration. nfs.allow, api.token_file,
	// log.level, retention.keep and (a replica) replica.token_file take
	// effect; other changed keys are logged, by key, as needing a restart.
	Reload func() (Config, error)
	Level  *slog.LevelVar // the logger's level; reload sets it
	// StopTimeout bounds the graceful stop (default 20 s, below the unit's
	// TimeoutStopSec).
	StopTimeout time.Duration
	// Version is strata's version, told to cluster members.
	Version string
}

// acceptStall is how long the NFS accept loop may be away from Accept
// (handing a connection off) before it counts as wedged.
const acceptStall = time.Minute

// checkSnapshotDir refuses a btrfs snapshot dir that does not exist while
// the state records generations: creating it would hide them all.
func checkSnapshotDir(cfg Config, st state) error {
	if cfg.Backend != "btrfs" {
		return nil
	}
	if _, err := os.Stat(cfg.SnapshotDir); !errors.Is(err, os.ErrNotExist) {
		return nil
	}
	gens, err := st.generations()
	if err != nil || len(gens) == 0 {
		return err
	}
	ids := make([]uint64, 0, len(gens))
	for _, g := range gens {
		ids = append(ids, g.ID)
	}
	return fmt.Errorf("snapshot.snapshot_dir %s does not exist, but state_dir %s records generations %v in it: is snapshot.snapshot_dir mistyped? Nothing was changed",
		cfg.SnapshotDir, cfg.StateDir, ids)
}

// checkHandleKey refuses to start without the NFS handle key once
// generations exist: a new key makes every handle that clients hold stale.
// The key is made only by the very first start, or with --new-handle-key.
func checkHandleKey(cfg Config, p *plan, log *slog.Logger) error {
	if cfg.NFSListen == "" {
		return nil
	}
	key := nfs.KeyFile(cfg.StateDir)
	if _, err := os.Stat(key); !errors.Is(err, os.ErrNotExist) {
		if err == nil && cfg.NewHandleKey {
			log.Warn("--new-handle-key given but the handle key exists; keeping it", "file", key)
		}
		return nil
	}
	if !p.hasGenerations() {
		return nil
	}
	if cfg.NewHandleKey {
		log.Warn("making a new NFS handle key (--new-handle-key): every mounted client gets ESTALE until it remounts", "file", key)
		return nil
	}
	err := fmt.Errorf("NFS handle key %s is missing, but generations exist and clients hold file handles sealed with it. "+
		"Either restore the file from a backup of state_dir, "+
		"or start once with `strata server --new-handle-key` to make a new key, accepting that every mounted client gets ESTALE (Stale file handle) until it remounts", key)
	if len(p.stored) == 0 && p.ownSnapshots {
		err = fmt.Errorf("%w (the snapshot dir's owner record names this host and state_dir: the snapshots are this server's own, its state_dir was lost)", err)
	} else if len(p.stored) == 0 {
		// A new state_dir over existing snapshots: a lost state_dir, or
		// another server's snapshots. A new key is no fix for the latter.
		err = fmt.Errorf("%w. But first: state_dir %s records no generation, so the snapshots in %s are either this server's own (its state_dir was lost) or another server's; "+
			"if they are another server's, do neither: give this server its own snapshot location", err, cfg.StateDir, where(cfg))
	}
	return err
}

// Check reports to w what a start with cfg would do, changing nothing
// (`strata server --check-config`): it reads the secret files the start
// reads, checks the snapshot location the way the start does (a missing
// snapshot dir where the start would create it), and reports the
// generations it would serve, rebuild, destroy or report missing, the store
// identity, the snapshot dir's owner and the handle key. What would stop
// the start or refuse publishing is printed as an ERROR line; what the
// start goes ahead with and reports (kept snapshots, missing ones) as a
// WARNING line; then "configuration: ok" or "configuration: refused"; it
// returns an error when the start, or publishing, would be refused.
func Check(ctx context.Context, cfg Config, w io.Writer) error {
	problems := 0
	say := func(format string, args ...any) { fmt.Fprintf(w, format+"\n", args...) }
	refuse := func(err error) {
		say("ERROR: %v", err)
		problems++
	}
	done := func() error {
		if problems == 0 {
			say("configuration: ok")
			return nil
		}
		say("configuration: refused")
		return fmt.Errorf("check config: %d problem(s), printed above as ERROR", problems)
	}
	// The secrets first, as the start reads them before anything else.
	if tok, err := apiserve.ReadToken(cfg.TokenFile, "api.token_file"); err != nil {
		refuse(err)
	} else if w := apiserve.TokenWarning(tok, cfg.TokenFile, "api.token_file", cfg.APIListen); w != "" {
		say("WARNING: %s", w)
	}
	replicaTok := ""
	if cfg.Replica() {
		var err error
		if replicaTok, err = replicaToken(cfg); err != nil {
			refuse(err)
		}
	}
	st := state{dir: cfg.StateDir}
	if !st.exists() {
		say("state_dir %s does not exist: a start creates it", cfg.StateDir)
	}
	if err := checkSnapshotDir(cfg, st); err != nil {
		refuse(err)
		return done()
	}
	b, err := inspectBackend(cfg, say)
	if err != nil {
		refuse(fmt.Errorf("snapshot backend: %w", err))
		return done()
	}
	if replicaTok != "" && !cfg.ReplicaFromCluster {
		for _, line := range askPrimary(ctx, cfg, replicaTok) {
			say("%s", line)
			if strings.HasPrefix(line, "ERROR: ") {
				problems++
			}
		}
	}
	if bb, ok := b.(*btrfs.Backend); ok {
		// What the backend's open removes first: a start goes ahead.
		left, err := bb.Leftovers(cfg.Replica())
		if err != nil {
			refuse(err)
		}
		for _, l := range left {
			say("would remove %s", l)
		}
	}
	p, err := inspect(ctx, cfg, st, b)
	if err != nil {
		refuse(err)
		return done()
	}
	if cfg.Backend == "btrfs" {
		if err := checkOwner(cfg, p, say); err != nil {
			refuse(err)
		}
	}
	for _, line := range p.report(cfg) {
		say("%s", line)
		if strings.HasPrefix(line, "ERROR: ") {
			problems++
		}
	}
	if err := p.refusal(cfg); err != nil {
		refuse(err)
	}
	if err := p.storeDirMismatch(cfg); err != nil {
		refuse(err)
	}
	if err := p.storeMismatch(cfg); err != nil && cfg.AdoptStore {
		problems-- // the report's ERROR line: --adopt-store accepts it
		say("--adopt-store: publishing store.root %s from now on", cfg.StoreRoot)
	}
	if cfg.NFSListen != "" {
		if err := checkHandleKey(cfg, p, slog.New(slog.DiscardHandler)); err != nil {
			refuse(err)
		} else if _, serr := os.Stat(nfs.KeyFile(cfg.StateDir)); serr == nil {
			say("NFS handle key: %s", nfs.KeyFile(cfg.StateDir))
		} else {
			say("NFS handle key: %s would be made by this start", nfs.KeyFile(cfg.StateDir))
		}
	}
	return done()
}

// existingParent returns dir's nearest ancestor that exists (dir itself if
// it does).
func existingParent(dir string) string {
	dir = filepath.Clean(dir)
	for {
		if _, err := os.Stat(dir); err == nil {
			return dir
		}
		up := filepath.Dir(dir)
		if up == dir {
			return dir
		}
		dir = up
	}
}

// inspectBackend opens cfg's snapshot location for looking only, as a
// start would find it: a btrfs snapshot dir that does not exist yet is
// checked where the start would create it and lists no snapshot. say
// reports what it found (--check-config).
func inspectBackend(cfg Config, say func(string, ...any)) (snapshot.Backend, error) {
	if cfg.Replica() {
		return checkReplica(cfg, say)
	}
	switch cfg.Backend {
	case "btrfs":
		if _, serr := os.Stat(cfg.SnapshotDir); errors.Is(serr, os.ErrNotExist) {
			// The start creates it: the nearest existing parent must be
			// where the start's checks would then pass.
			parent := existingParent(cfg.SnapshotDir)
			if _, err := btrfs.Inspect(cfg.StoreRoot, parent, nil); err != nil {
				return nil, fmt.Errorf("snapshot.snapshot_dir %s does not exist, and a start would create it in %s, where it fails: %w", cfg.SnapshotDir, parent, err)
			}
			say("snapshot.snapshot_dir %s does not exist: a start creates it", cfg.SnapshotDir)
			return emptyInspect{}, nil
		}
		return btrfs.Inspect(cfg.StoreRoot, cfg.SnapshotDir, nil)
	case "zfs":
		return zfs.Inspect(cfg.Dataset, cfg.MountDir, nil)
	}
	return nil, fmt.Errorf("snapshot backend %q: want btrfs or zfs", cfg.Backend)
}

// checkOwner is --check-config's report of the btrfs snapshot dir's owner
// (owner.go): the error a start would refuse with, or what it would do.
func checkOwner(cfg Config, p *plan, say func(string, ...any)) error {
	me, err := selfOf(cfg)
	if err != nil {
		return err
	}
	rec, err := readOwner(cfg.SnapshotDir)
	if err != nil {
		return err
	}
	c, err := decideOwner(cfg, rec, me, p)
	if err != nil {
		return err
	}
	p.ownSnapshots = c == claimSameStateDir
	say("snapshot dir owner: %s", c)
	return nil
}

// ownerError marks a refusal over the snapshot dir's owner (another
// server's record, or its lock held by a running server) as a
// configuration error: two servers configured on one snapshot dir, which a
// restart by systemd would only repeat.
func ownerError(err error) error {
	if errors.Is(err, ErrOwnedByOther) {
		return configError{err}
	}
	return err
}

// emptyInspect stands for a btrfs snapshot dir that does not exist yet.
type emptyInspect struct{}

func (emptyInspect) Kind() string { return "btrfs" }
func (emptyInspect) Create(context.Context, uint64, snapshot.Labels) (snapshot.Snapshot, error) {
	return snapshot.Snapshot{}, snapshot.ErrUnsupported
}
func (emptyInspect) SetLabels(context.Context, uint64, snapshot.Labels) error {
	return snapshot.ErrNotFound
}
func (emptyInspect) List(context.Context) ([]snapshot.Snapshot, error) { return nil, nil }
func (emptyInspect) Destroy(context.Context, uint64) error             { return snapshot.ErrNotFound }

// Daemon runs `strata server` until ctx ends. The order of start:
//  1. refuse a missing btrfs snapshot dir while the state records
//     generations, open the backend and the state dir, refuse a missing NFS
//     handle key once generations exist (unless --new-handle-key);
//  2. reconcile the state with the snapshots' labels (New) and re-export
//     the live generations;
//  3. bind the NFS listener and the API (TCP and unix socket);
//  4. READY=1 to systemd (the API answers and every live generation is
//     exported), then publish once and every publish.interval.
//
// While it runs, the main loop sends WATCHDOG=1 when the publish loop and
// the NFS accept loop make progress (see package lifecycle), and reloads
// nfs.allow, the API token, log.level, retention.keep and a replica's
// token for its primary on SIGHUP (RELOADING=1 … READY=1).
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
	// A second daemon on the same state dir, or an unsafe token file,
	// stops here, before anything is bound or touched.
	if err := apiserve.CheckSocket(cfg.Socket); err != nil {
		return err
	}
	tokenText, err := apiserve.ReadToken(cfg.TokenFile, "api.token_file")
	if err != nil {
		return configError{err}
	}
	if w := apiserve.TokenWarning(tokenText, cfg.TokenFile, "api.token_file", cfg.APIListen); w != "" {
		log.Warn("no API token", "why", w)
	}
	var auth *replicaAuth // a replica's token for its primary
	if cfg.Replica() {
		tok, err := replicaToken(cfg)
		if err != nil {
			return configError{err}
		}
		auth = &replicaAuth{token: tok}
	}
	// Everything that refuses a start is checked before anything is
	// created (state_dir, snapshot dir, owner record, handle key) or any
	// snapshot is touched, on the snapshot location opened for looking.
	st := state{dir: cfg.StateDir}
	if err := checkSnapshotDir(cfg, st); err != nil {
		return err
	}
	ib, err := inspectBackend(cfg, func(string, ...any) {})
	if err != nil {
		return fmt.Errorf("snapshot backend: %w", err)
	}
	me, err := selfOf(cfg)
	if err != nil {
		return err
	}
	var lock *os.File
	// madeLock: this start made strata.owner.lock; goingAhead: every
	// check passed. A start refused in between removes the file again:
	// a refused start changes nothing (before, it left the file in a
	// mistyped snapshot dir).
	var madeLock, goingAhead bool
	defer func() {
		if lock != nil {
			releaseLock(lock, madeLock && !goingAhead)
		}
	}()
	if _, err := os.Stat(cfg.SnapshotDir); cfg.Backend == "btrfs" && err == nil {
		if lock, madeLock, err = lockSnapshotDir(cfg.SnapshotDir); err != nil {
			return ownerError(err)
		}
	}
	p, err := inspect(ctx, cfg, st, ib)
	if err != nil {
		return err
	}
	var rec *owner
	own := claimNone
	if cfg.Backend == "btrfs" {
		if rec, err = readOwner(cfg.SnapshotDir); err != nil {
			return err
		}
		if own, err = decideOwner(cfg, rec, me, p); err != nil {
			return ownerError(err)
		}
		p.ownSnapshots = own == claimSameStateDir
	}
	if err := checkHandleKey(cfg, p, log); err != nil {
		// Restore the key or start once with --new-handle-key: a
		// restart by systemd only repeats this.
		return configError{err}
	}
	if err := p.refusal(cfg); err != nil {
		return err
	}
	if err := p.storeDirMismatch(cfg); err != nil {
		return configError{err}
	}
	goingAhead = true

	tightened, err := secretfile.PrivateDir(cfg.StateDir)
	if err != nil {
		return err
	}
	if tightened {
		log.Warn("state dir was readable by other users; made it 0700", "dir", cfg.StateDir)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	// A replica's failing syncs log each problem once, then every
	// outageRepeat (see outage); so do the lines the backend and the
	// puller log along the way.
	failing, syncLog := &outage{}, log
	if cfg.Replica() {
		syncLog = failing.quiet(log)
	}
	backend, err := OpenBackend(cfg, syncLog)
	if err != nil {
		return err
	}
	if cfg.Backend == "btrfs" {
		if lock == nil { // the dir was made just now by OpenBackend
			if lock, _, err = lockSnapshotDir(cfg.SnapshotDir); err != nil {
				return ownerError(err)
			}
			if rec, err = readOwner(cfg.SnapshotDir); err != nil {
				return err
			}
			if own, err = decideOwner(cfg, rec, me, &plan{}); err != nil {
				return ownerError(err)
			}
		}
		if own == claimSameStateDir {
			me.ServerID = rec.ServerID
		}
	}
	if err := me.save(cfg.StateDir); err != nil {
		return err
	}
	if cfg.Backend == "btrfs" {
		switch {
		case own != claimNone:
			if rec != nil {
				log.Warn("claiming snapshot dir", "dir", cfg.SnapshotDir, "how", own.String(), "previous_owner", rec.String())
			} else {
				log.Info("claiming snapshot dir", "dir", cfg.SnapshotDir, "how", own.String())
			}
			if err := writeOwner(cfg.SnapshotDir, me.owner); err != nil {
				return err
			}
		case rec.Role != me.Role || rec.Host != me.Host || filepath.Clean(rec.StateDir) != me.StateDir:
			// Same server, promoted or moved: keep the record true.
			me.Since = rec.Since
			if err := writeOwner(cfg.SnapshotDir, me.owner); err != nil {
				return err
			}
		}
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
	opts := Options{Config: cfg, Logger: log, Backend: backend, Export: exporter, Registry: reg, Progress: step, ServerID: me.ServerID,
		// systemctl status follows every publish (the API's too), not
		// only the start's: it said "serving generation 1" for ever.
		Published: func(g api.Generation) { o.Notify(fmt.Sprintf("STATUS=serving generation %d", g.ID)) }}
	var node *cluster.Node
	if cfg.Cluster.Enabled {
		node, err = cluster.New(cfg.Cluster.Config(cfg.ClusterMeta(o.Version)), log)
		if err != nil {
			ex.close()
			return err
		}
		defer node.Close()
		if err := node.Register(reg); err != nil {
			ex.close()
			return err
		}
		opts.InUse = node.Holds
		opts.Announce = func(gs []api.Generation) { node.SetServerState(ClusterGenerations(gs)) }
	}
	srv, err := New(ctx, opts)
	if err != nil {
		ex.close()
		return err
	}
	if node != nil {
		node.SetServerState(ClusterGenerations(srv.Generations()))
	}

	token := apiserve.NewToken(tokenText)
	var puller *replica.Puller
	if cfg.Replica() {
		if puller, err = openPuller(cfg, auth.token, me.ServerID, srv, node, syncLog, reg, step.Progress); err != nil {
			ex.close()
			return err
		}
		auth.puller = puller
	}
	var syncErr atomic.Pointer[string] // the replica's last sync failure, "" once one succeeds
	status := func() any {
		g, _ := srv.Latest()
		var missing []uint64
		for _, m := range srv.Missing() {
			missing = append(missing, m.ID)
		}
		st := map[string]any{"role": "server", "latest": g.ID, "generations": srv.Generations(),
			"nfs": cfg.NFSListen, "backend": cfg.Backend, "missing": missing, "problems": srv.Problems(),
			"retention_keep": srv.Keep(), "retention_waits": srv.RetentionWaits(), "server_id": me.ServerID}
		if node != nil {
			st["cluster"] = map[string]any{"name": cfg.Cluster.ClusterName, "member": node.Name(), "address": node.Addr(),
				"members": len(node.Members()), "settling_for": node.SettleLeft().Round(time.Second).String()}
		}
		if cfg.Replica() {
			st["role"], st["replica_of"] = "replica", puller.Primary()
			if e := syncErr.Load(); e != nil && *e != "" {
				st["last_error"] = "replica sync: " + *e
			}
		} else if e := srv.LastPublishError(); e != nil {
			msg := e.Err // most say "publish generation N: ..." already
			if !strings.HasPrefix(msg, "publish") {
				msg = "publish: " + msg
			}
			st["last_error"] = msg
			st["last_error_at"] = e.At.UTC().Format(time.RFC3339)
		}
		return st
	}
	var h http.Handler = srv.Handler(token, reg, status)
	mux := http.NewServeMux()
	if node != nil {
		node.Routes(mux, token)
	} else {
		cluster.OffRoutes(mux)
	}
	mux.Handle("/", h)
	h = mux
	as, err := apiserve.Start(h, cfg.APIListen, cfg.Socket, log)
	if err != nil {
		ex.close()
		return err
	}
	if puller != nil && !cfg.ReplicaFromCluster {
		// replica.of naming this server (its own api.listen) or another
		// replica stops the start when the primary answers now (this
		// API listens already, so a replica of itself answers); when it
		// does not, the sync loop finds it and logs it once per outage.
		pctx, pcancel := context.WithTimeout(ctx, 10*time.Second)
		err := puller.Probe(pctx)
		pcancel()
		if errors.Is(err, replica.ErrNotPrimary) {
			as.Shutdown(ctx)
			srv.Shutdown()
			ex.close()
			return configError{err} // replica.of names this server or a replica
		}
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
		if puller != nil {
			errc <- runPuller(runCtx, puller, cfg.ReplicaInterval, step, notifyStatus, func(err error) {
				srv.FinishRows()
				msg := ""
				if err != nil {
					msg = err.Error()
				}
				syncErr.Store(&msg)
			}, failing, log)
			return
		}
		// Options.Published tells systemd of what it publishes, as of
		// every later publish.
		step.Begin()
		_, _ = srv.Publish(runCtx)
		step.End()
		errc <- srv.Run(runCtx)
	}()
	go func() {
		if err, ok := <-as.Err(); ok {
			errc <- err
		}
	}()
	retainDone := make(chan struct{})
	if node != nil {
		go func() { defer close(retainDone); retainOnHoldChange(runCtx, srv, node) }()
	} else {
		close(retainDone)
	}

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
			return applyReload(cfg, next, ex, token, auth, o.Level, srv, log)
		}}
	runErr := main.Run(ctx, errc)

	o.Notify("STOPPING=1")
	log.Info("shutting down")
	cancel()
	stopErr := lifecycle.Stop(o.StopTimeout, "publish loop, API and NFS export", func() {
		<-pubDone
		<-retainDone
		if node != nil {
			node.Leave(2 * time.Second)
		}
		as.Shutdown(ctx)
		srv.Shutdown() // publishes started over the API: cancelled and waited for
		<-nfsDone
		ex.close()
	})
	if runErr == nil {
		runErr = stopErr
	}
	return runErr
}

// ClusterGenerations is what gossip carries of live generations.
func ClusterGenerations(gs []api.Generation) []cluster.Generation {
	out := make([]cluster.Generation, 0, len(gs))
	for _, g := range gs {
		cg := cluster.Generation{ID: g.ID}
		hex.Decode(cg.RegistrationSHA256[:], []byte(g.RegistrationSHA256))
		out = append(out, cg)
	}
	return out
}

// retainOnHoldChange runs a retention pass whenever the builders' holds
// change (a builder reported another generation, left, or its dead_grace
// ran out), checking at least every second, until ctx ends.
func retainOnHoldChange(ctx context.Context, srv *Server, node *cluster.Node) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	last := ""
	for {
		select {
		case <-ctx.Done():
			return
		case <-node.Changed():
		case <-t.C:
		}
		h, known := node.Holds()
		key := fmt.Sprint(known, h)
		if key == last {
			continue
		}
		last = key
		srv.Retain(ctx)
	}
}

// checkReplica is --check-config's part for a replica: the backend opened
// for looking only (a missing snapshot dir checked where the start would
// create it).
func checkReplica(cfg Config, say func(string, ...any)) (snapshot.Backend, error) {
	of := cfg.ReplicaOf
	if cfg.ReplicaFromCluster {
		of = "the cluster's primary (found by gossip)"
	}
	say("replica of %s: receives the primary's generations every %s, publishes nothing; store.root is not used", of, cfg.ReplicaInterval)
	if cfg.Backend == "zfs" {
		return zfs.InspectReplica(cfg.Dataset, cfg.MountDir, nil)
	}
	if _, serr := os.Stat(cfg.SnapshotDir); errors.Is(serr, os.ErrNotExist) {
		parent := existingParent(cfg.SnapshotDir)
		if _, err := btrfs.InspectReplica(parent, nil); err != nil {
			return nil, fmt.Errorf("snapshot.snapshot_dir %s does not exist, and a start would create it in %s, where it fails: %w", cfg.SnapshotDir, parent, err)
		}
		say("snapshot.snapshot_dir %s does not exist: a start creates it", cfg.SnapshotDir)
		return emptyInspect{}, nil
	}
	return btrfs.InspectReplica(cfg.SnapshotDir, nil)
}

// askPrimary is --check-config's look at a replica's primary, changing
// nothing there (two GETs): whether replica.of answers, as a primary (one
// that is this server or a replica refuses the start: an ERROR line), and
// accepts replica.token_file's token (if not, the start goes ahead and
// every sync is refused: a WARNING line).
func askPrimary(ctx context.Context, cfg Config, token string) []string {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c := api.NewClient(cfg.ReplicaOf, token)
	list, err := c.Generations(ctx)
	if err != nil {
		return []string{fmt.Sprintf("WARNING: replica.of %s does not answer now (%v): a start goes ahead, serves what it has and syncs once it answers", cfg.ReplicaOf, err)}
	}
	me, _ := selfOf(cfg)
	switch {
	case list.Server != "" && list.Server == me.ServerID:
		return []string{fmt.Sprintf("ERROR: replica.of %s is this server itself (it answers with this server's identity %s): set replica.of to the primary's API URL", cfg.ReplicaOf, me.ServerID)}
	case list.Role == "replica":
		return []string{fmt.Sprintf("ERROR: replica.of %s is itself a replica (of %s), which publishes nothing of its own: set replica.of to the primary's API URL", cfg.ReplicaOf, list.ReplicaOf)}
	}
	newest := "none yet"
	if n := len(list.Generations); n > 0 {
		newest = fmt.Sprint(list.Generations[n-1].ID)
	}
	out := []string{fmt.Sprintf("primary %s answers: %d live generations, newest %s", cfg.ReplicaOf, len(list.Generations), newest)}
	if list.StoreDir != "" && list.StoreDir != cfg.StoreDir {
		// Every sync refuses such a primary, naming both (the start
		// itself goes ahead and serves what it has).
		out = append(out, fmt.Sprintf("WARNING: primary %s serves generations of store dir %s, but this replica's store.dir is %s: a start goes ahead, and every sync is refused until store.dir is the primary's", cfg.ReplicaOf, list.StoreDir, cfg.StoreDir))
	}
	var se *api.StatusError
	switch err := c.CheckToken(ctx); {
	case err == nil:
		out = append(out, fmt.Sprintf("primary %s accepts the token in replica.token_file %s", cfg.ReplicaOf, cfg.ReplicaTokenFile))
	case errors.As(err, &se) && se.Code == http.StatusUnauthorized:
		out = append(out, fmt.Sprintf("WARNING: primary %s refuses the token in replica.token_file %s (%v): a start goes ahead, and every sync is refused until the file holds the primary's API token", cfg.ReplicaOf, cfg.ReplicaTokenFile, err))
	case errors.As(err, &se) && se.Code == http.StatusNotFound:
		// A primary older than GET /v1/token: its streams will tell.
	default:
		out = append(out, fmt.Sprintf("WARNING: could not check replica.token_file's token with primary %s: %v", cfg.ReplicaOf, err))
	}
	return out
}

// replicaToken reads replica.token_file, which a replica needs.
func replicaToken(cfg Config) (string, error) {
	tok, err := apiserve.ReadToken(cfg.ReplicaTokenFile, "replica.token_file")
	if err != nil {
		return "", err
	}
	if tok == "" {
		return "", fmt.Errorf("replica.token_file %s is missing or empty: a replica needs the primary's API token", cfg.ReplicaTokenFile)
	}
	return tok, nil
}

// openPuller makes a replica's puller: the primary's API client with tok,
// the token from replica.token_file (streams need it).
func openPuller(cfg Config, tok, self string, srv *Server, node *cluster.Node, log *slog.Logger, reg *prometheus.Registry, progress func()) (*replica.Puller, error) {
	b, ok := srv.Backend().(replica.Backend)
	if !ok {
		return nil, fmt.Errorf("the %s backend cannot receive snapshots", srv.Backend().Kind())
	}
	var primary replica.Primary = replica.Fixed(api.NewClient(cfg.ReplicaOf, tok), cfg.ReplicaOf)
	if cfg.ReplicaFromCluster {
		if node == nil {
			return nil, fmt.Errorf("replica.from_cluster needs gossip (cluster.bind or cluster.join)")
		}
		primary = replica.FromCluster(node.Servers, tok)
	}
	return replica.New(replica.Options{Primary: primary, Backend: b, Target: srv, StateDir: cfg.StateDir, Logger: log, Registry: reg,
		Pause: os.Getenv("STRATA_DEBUG_REPLICA_PAUSE"), Stall: cfg.ReplicaStall, Progress: progress, Self: self, StoreDir: cfg.StoreDir}), nil
}

// runPuller syncs the replica now and every interval until ctx ends, each
// sync bracketed by step for the watchdog; the puller reports progress to
// step as stream bytes arrive, so only a sync that stopped moving for
// watchdog.stall_after counts as wedged, however long a stream takes.
// After each sync, successful or not, it calls after with the sync's error
// (status shows it; the rows a failed write left out are written again).
func runPuller(ctx context.Context, p *replica.Puller, interval time.Duration, step *lifecycle.Step, notify func(), after func(error), failing *outage, log *slog.Logger) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		step.Begin()
		_, err := p.Sync(ctx)
		step.End()
		if ctx.Err() == nil {
			after(err)
		}
		switch {
		case ctx.Err() != nil:
			return nil
		case err != nil:
			failing.failed(time.Now(), err, log)
		default:
			failing.ok(log)
			notify()
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// replicaAuth is a replica's token for its primary: what
// replica.token_file held at the start or the last reload, and the puller
// that sends it.
type replicaAuth struct {
	token  string
	puller *replica.Puller
}

// applyReload makes next's nfs.allow, token, log level, retention.keep
// and, on a replica (auth), the token in replica.token_file current (a
// lower retention.keep destroys what it no longer keeps at once, see
// Server.SetKeep; the next sync sends the new replica token). It reads
// everything first, so a bad token file changes nothing: a replica's
// replica.token_file that is missing, empty or unsafe keeps the token it
// had. Other changed keys are logged, by key, as needing a restart.
func applyReload(cur, next Config, ex export, token *apiserve.Token, auth *replicaAuth, level *slog.LevelVar, srv *Server, log *slog.Logger) error {
	text, err := apiserve.ReadToken(next.TokenFile, "api.token_file")
	if err != nil {
		return fmt.Errorf("reload: %w", err)
	}
	var replicaTok string
	if auth != nil && next.Replica() {
		if replicaTok, err = replicaToken(next); err != nil {
			return fmt.Errorf("reload: %w (the replica goes on with the token it had)", err)
		}
	}
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(next.LogLevel)); err != nil {
		return fmt.Errorf("reload: log.level %q: %w", next.LogLevel, err)
	}
	if ex.guard != nil {
		ex.guard.SetAllow(next.NFSAllow)
	}
	if srv != nil {
		// GET /v1/nfs/access, which builders ask before mounting, answers
		// with the guard's list (before, with the start's).
		srv.SetNFSAllow(next.NFSAllow)
	}
	if w := apiserve.TokenWarning(text, next.TokenFile, "api.token_file", cur.APIListen); w != "" {
		log.Warn("no API token", "why", w)
	}
	token.Set(text)
	if level != nil {
		level.Set(lv)
	}
	reloaded := []any{"nfs.allow", next.NFSAllow, "log.level", next.LogLevel, "api.token_file", next.TokenFile, "retention.keep", next.Keep}
	if replicaTok != "" {
		if replicaTok != auth.token {
			auth.token = replicaTok
			if auth.puller != nil {
				auth.puller.SetToken(replicaTok)
			}
			log.Info("reload: replica.token_file holds a new token; the next sync sends it", "replica.token_file", next.ReplicaTokenFile)
		}
		reloaded = append(reloaded, "replica.token_file", next.ReplicaTokenFile)
	}
	// Everything else needs a restart: say which keys differ.
	a, b := cur, next
	a.NFSAllow, a.TokenFile, a.LogLevel, a.Keep, a.ReplicaTokenFile = nil, "", "", 0, ""
	b.NFSAllow, b.TokenFile, b.LogLevel, b.Keep, b.ReplicaTokenFile = nil, "", "", 0, ""
	if changed := config.Changed(a, b); len(changed) > 0 {
		log.Warn("reload: some changed keys take effect only after a restart", "changed", changed)
	}
	log.Info("reloaded", reloaded...)
	if srv != nil {
		srv.SetKeep(next.Keep)
	}
	return nil
}
