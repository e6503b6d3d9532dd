package server

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/cluster"
	"github.com/strata-nix/strata/config"
	"github.com/strata-nix/strata/server/nfs/guard"
)

// DefaultConfigFile is where `strata server` reads its settings.
const DefaultConfigFile = "/etc/strata/server.yaml"

// Keys is the server's configuration table: every key is a YAML key, a
// STRATA_* environment variable and a flag (see package config).
var Keys = []config.Key{
	{Name: "store.root", Kind: config.String, Default: "/nix", Usage: "central-store root: holds store/ and var/nix/db/, one btrfs subvolume or ZFS dataset"},
	{Name: "store.dir", Kind: config.String, Default: "/nix/store", Usage: "logical Nix store dir the registered paths are named in"},
	{Name: "snapshot.backend", Kind: config.String, Default: "btrfs", Usage: "snapshot backend: btrfs or zfs"},
	{Name: "snapshot.dataset", Kind: config.String, Default: "", Usage: "zfs: dataset that holds the central store (mounted at store.root)"},
	{Name: "snapshot.snapshot_dir", Kind: config.String, Default: "", Usage: "btrfs (required): directory where snapshots are made, on the central store's btrfs filesystem and outside store.root (a replica: any directory on btrfs)"},
	{Name: "snapshot.mount_dir", Kind: config.String, Default: "", Usage: "zfs: where snapshots are mounted read-only (default <state_dir>/mnt)"},
	{Name: "state_dir", Kind: config.String, Default: "/var/lib/strata/server", Usage: "server state: manifests, registrations, pins, NFS handle key, API socket"},
	{Name: "publish.interval", Kind: config.Duration, Default: "5m", Usage: "publish a new generation this often when the store changed (0 disables)"},
	{Name: "retention.keep", Kind: config.Int, Default: 10, Usage: "keep the newest N generations (plus pinned and in-use ones; SIGHUP applies a new value at once)"},
	{Name: "api.listen", Kind: config.String, Default: "127.0.0.1:7480", Usage: "HTTP API address (empty disables TCP)"},
	{Name: "api.token_file", Kind: config.String, Default: "/etc/strata/api-token", Usage: "file with the bearer token mutating TCP calls need"},
	{Name: "api.socket", Kind: config.String, Default: "", Usage: "unix socket for the API; calls on it need no token (default <state_dir>/api.sock)"},
	{Name: "nfs.listen", Kind: config.String, Default: "0.0.0.0:2049", Usage: "NFSv3 + MOUNT TCP address (empty disables the export)"},
	{Name: "nfs.allow", Kind: config.List, Default: []string{"127.0.0.0/8"}, Usage: "client networks (CIDR or address) allowed to connect to the export; must not be empty (allow everyone explicitly: 0.0.0.0/0,::/0)"},
	{Name: "nfs.max_conns", Kind: config.Int, Default: 1024, Usage: "maximum concurrent NFS connections"},
	{Name: "nfs.max_conns_per_client", Kind: config.Int, Default: 128, Usage: "maximum concurrent NFS connections from one client address"},
	{Name: "nfs.idle_timeout", Kind: config.Duration, Default: "15m", Usage: "close NFS connections idle this long"},
	{Name: "nfs.busy_poll", Kind: config.Duration, Default: "50us", Usage: "how long an NFS connection waits for its next call spinning, while CPU is spare, before it sleeps (0 disables)"},
	{Name: "log.level", Kind: config.String, Default: "info", Usage: "log level: debug, info, warn or error (SIGHUP reloads it, nfs.allow, retention.keep, the API token and a replica's replica.token_file)"},
	{Name: "watchdog.stall_after", Kind: config.Duration, Default: "30m", Usage: "a publish running longer than this (on a replica: a sync this long without stream bytes arriving) counts as wedged: systemd watchdog pings stop and systemd restarts the daemon (0: never)"},
}

func init() { Keys = append(Keys, cluster.Keys...); Keys = append(Keys, replicaKeys...) }

// replicaKeys make a server a replica of another (see package
// server/replica).
var replicaKeys = []config.Key{
	{Name: "replica.of", Kind: config.String, Default: "", Usage: "primary server's API URL (http://host:7480): this server publishes nothing and pulls the primary's generations (empty: a primary)"},
	{Name: "replica.token_file", Kind: config.String, Default: "/etc/strata/replica-token", Usage: "file with the primary's API token (streams need it; SIGHUP re-reads it)"},
	{Name: "replica.interval", Kind: config.Duration, Default: "10s", Usage: "how often a replica asks the primary for new generations"},
	{Name: "replica.stall_timeout", Kind: config.Duration, Default: "2m", Usage: "a replica aborts a snapshot stream from which no byte arrived for this long (the next sync asks again)"},
	{Name: "replica.from_cluster", Kind: config.Bool, Default: false, Usage: "be a replica of the cluster's primary server, found by gossip (cluster.*), instead of replica.of"},
}

// Config is the validated server configuration.
type Config struct {
	StoreRoot       string         `key:"store.root"`
	StoreDir        string         `key:"store.dir"`
	Backend         string         `key:"snapshot.backend"`
	Dataset         string         `key:"snapshot.dataset"`
	SnapshotDir     string         `key:"snapshot.snapshot_dir"`
	MountDir        string         `key:"snapshot.mount_dir"`
	StateDir        string         `key:"state_dir"`
	PublishInterval time.Duration  `key:"publish.interval"`
	Keep            int            `key:"retention.keep"`
	APIListen       string         `key:"api.listen"`
	TokenFile       string         `key:"api.token_file"`
	Socket          string         `key:"api.socket"`
	NFSListen       string         `key:"nfs.listen"`
	NFSAllow        []netip.Prefix `key:"nfs.allow"`
	NFSMaxConns     int            `key:"nfs.max_conns"`
	NFSMaxPerClient int            `key:"nfs.max_conns_per_client"`
	NFSIdleTimeout  time.Duration  `key:"nfs.idle_timeout"`
	NFSBusyPoll     time.Duration  `key:"nfs.busy_poll"`
	LogLevel        string         `key:"log.level"`
	StallAfter      time.Duration  `key:"watchdog.stall_after"`
	// ReplicaOf is the primary's API URL when this server is a replica.
	ReplicaOf        string        `key:"replica.of"`
	ReplicaTokenFile string        `key:"replica.token_file"`
	ReplicaInterval  time.Duration `key:"replica.interval"`
	// ReplicaStall aborts a stream that sends nothing for this long.
	ReplicaStall time.Duration `key:"replica.stall_timeout"`
	// ReplicaFromCluster: a replica of the primary that gossip names.
	ReplicaFromCluster bool `key:"replica.from_cluster"`
	// Cluster is gossip (cluster.*); off unless cluster.bind or
	// cluster.join is set.
	Cluster cluster.Settings

	// One-shot start flags of `strata server`, not configuration keys.

	// AdoptStore lets publishing go on when store.root is not the central
	// store the generations come from (--adopt-store).
	AdoptStore bool `key:"-"`
	// NewHandleKey lets a start make a new NFS handle key although
	// generations exist (--new-handle-key): every client gets ESTALE.
	NewHandleKey bool `key:"-"`
	// ClaimSnapshotDir makes this server the owner of the btrfs snapshot
	// dir although another server's owner record names it, or it holds
	// snapshots this state dir cannot account for (--claim-snapshot-dir).
	ClaimSnapshotDir bool `key:"-"`
}

// ConfigFrom validates loaded values and fills derived defaults. Each error
// names the key, the value and what was expected.
func ConfigFrom(v config.Values) (Config, error) {
	c := Config{
		StoreRoot:       v.String("store.root"),
		StoreDir:        v.String("store.dir"),
		Backend:         v.String("snapshot.backend"),
		Dataset:         v.String("snapshot.dataset"),
		SnapshotDir:     v.String("snapshot.snapshot_dir"),
		MountDir:        v.String("snapshot.mount_dir"),
		StateDir:        v.String("state_dir"),
		PublishInterval: v.Duration("publish.interval"),
		Keep:            v.Int("retention.keep"),
		APIListen:       v.String("api.listen"),
		TokenFile:       v.String("api.token_file"),
		Socket:          v.String("api.socket"),
		NFSListen:       v.String("nfs.listen"),
		NFSMaxConns:     v.Int("nfs.max_conns"),
		NFSMaxPerClient: v.Int("nfs.max_conns_per_client"),
		NFSIdleTimeout:  v.Duration("nfs.idle_timeout"),
		NFSBusyPoll:     v.Duration("nfs.busy_poll"),
		LogLevel:        v.String("log.level"),
		StallAfter:      v.Duration("watchdog.stall_after"),

		ReplicaOf:        v.String("replica.of"),
		ReplicaTokenFile: v.String("replica.token_file"),
		ReplicaInterval:  v.Duration("replica.interval"),
		ReplicaStall:     v.Duration("replica.stall_timeout"),

		ReplicaFromCluster: v.Bool("replica.from_cluster"),
	}
	bad := v.Bad // names the key's source: file, env or flag
	for key, p := range map[string]string{"store.root": c.StoreRoot, "store.dir": c.StoreDir, "state_dir": c.StateDir} {
		if !filepath.IsAbs(p) {
			return c, bad(key, p, "an absolute path")
		}
	}
	if err := v.NotDir("state_dir", c.StateDir); err != nil {
		return c, err
	}
	switch c.Backend {
	case "btrfs":
		// No default: the one place a default could be derived from,
		// store.root, is where snapshots must not go (every snapshot would
		// hold the older ones), and a sibling may be another filesystem.
		if c.SnapshotDir == "" {
			return c, fmt.Errorf("config: missing required key %q%s: snapshot.backend is btrfs: set it to a directory on the central store's btrfs filesystem outside store.root %s (a replica: any directory on btrfs)", "snapshot.snapshot_dir", v.From("snapshot.snapshot_dir"), c.StoreRoot)
		}
		if !filepath.IsAbs(c.SnapshotDir) {
			return c, bad("snapshot.snapshot_dir", c.SnapshotDir, "an absolute path")
		}
		if !c.Replica() && within(c.StoreRoot, c.SnapshotDir) {
			return c, bad("snapshot.snapshot_dir", c.SnapshotDir, "a directory outside store.root "+c.StoreRoot+" (on the same btrfs filesystem): every snapshot would hold the older ones")
		}
	case "zfs":
		if c.Dataset == "" {
			return c, fmt.Errorf("config: missing required key %q%s: snapshot.backend is zfs", "snapshot.dataset", v.From("snapshot.dataset"))
		}
		if strings.ContainsAny(c.Dataset, "@ ") || strings.HasPrefix(c.Dataset, "/") {
			return c, bad("snapshot.dataset", c.Dataset, "a ZFS dataset name such as tank/nix")
		}
		if c.MountDir == "" {
			c.MountDir = filepath.Join(c.StateDir, "mnt")
		}
	default:
		return c, bad("snapshot.backend", c.Backend, "btrfs or zfs")
	}
	if c.PublishInterval < 0 || (c.PublishInterval > 0 && c.PublishInterval < time.Second) {
		return c, bad("publish.interval", c.PublishInterval, "0 (disabled) or at least 1s")
	}
	if c.Keep < 1 {
		return c, bad("retention.keep", c.Keep, "at least 1")
	}
	if c.APIListen != "" {
		if _, _, err := config.HostPort(c.APIListen); err != nil {
			return c, bad("api.listen", c.APIListen, "host:port with a numeric port, such as 127.0.0.1:7480")
		}
	}
	if c.Socket == "" {
		c.Socket = filepath.Join(c.StateDir, "api.sock")
	}
	if c.NFSListen != "" {
		if _, _, err := config.HostPort(c.NFSListen); err != nil {
			return c, bad("nfs.listen", c.NFSListen, "host:port with a numeric port, such as 0.0.0.0:2049")
		}
	}
	allow, err := guard.ParseAllow(v.List("nfs.allow"))
	var ae *guard.AllowError
	switch {
	case errors.As(err, &ae):
		return c, bad("nfs.allow", ae.Entry, ae.Want)
	case err != nil:
		return c, fmt.Errorf("config: key %q%s: %w", "nfs.allow", v.From("nfs.allow"), err)
	}
	c.NFSAllow = allow
	if c.NFSMaxConns < 1 {
		return c, bad("nfs.max_conns", c.NFSMaxConns, "at least 1")
	}
	if c.NFSMaxPerClient < 1 {
		return c, bad("nfs.max_conns_per_client", c.NFSMaxPerClient, "at least 1")
	}
	if c.NFSIdleTimeout < time.Second {
		return c, bad("nfs.idle_timeout", c.NFSIdleTimeout, "at least 1s")
	}
	if c.NFSBusyPoll < 0 || c.NFSBusyPoll > time.Millisecond {
		return c, bad("nfs.busy_poll", c.NFSBusyPoll, "0 (disabled) up to 1ms")
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		return c, bad("log.level", c.LogLevel, "debug, info, warn or error")
	}
	if c.StallAfter < 0 || (c.StallAfter > 0 && c.StallAfter < time.Minute) {
		return c, bad("watchdog.stall_after", c.StallAfter, "0 (never) or at least 1m")
	}
	if c.ReplicaOf != "" && c.ReplicaFromCluster {
		return c, fmt.Errorf("config: keys %q%s and %q%s: set one, not both", "replica.of", v.From("replica.of"), "replica.from_cluster", v.From("replica.from_cluster"))
	}
	if c.Replica() && c.ReplicaInterval < time.Second {
		return c, bad("replica.interval", c.ReplicaInterval, "at least 1s")
	}
	if c.Replica() && c.ReplicaStall < time.Second {
		return c, bad("replica.stall_timeout", c.ReplicaStall, "at least 1s")
	}
	if c.ReplicaOf != "" {
		if err := api.CheckBaseURL(c.ReplicaOf, "http://primary:7480"); err != nil {
			return c, v.Invalid("replica.of", c.ReplicaOf, err)
		}
	}
	cs, err := cluster.SettingsFrom(v)
	if err != nil {
		return c, err
	}
	c.Cluster = cs
	if c.ReplicaFromCluster && !cs.Enabled {
		return c, fmt.Errorf("config: key %q%s: gossip is off: set cluster.bind or cluster.join, or name the primary with replica.of", "replica.from_cluster", v.From("replica.from_cluster"))
	}
	if cs.Enabled {
		if err := cluster.CheckMeta(c.ClusterMeta("")); err != nil {
			return c, fmt.Errorf("config: api.listen %q%s and nfs.listen %q%s: %w", c.APIListen, v.From("api.listen"), c.NFSListen, v.From("nfs.listen"), err)
		}
	}
	return c, nil
}

// ClusterMeta is what the server tells cluster members about itself: its
// API URL and NFS address as builders reach them (an unspecified host in
// api.listen or nfs.listen becomes the host of cluster.advertise, else of
// cluster.bind).
func (c Config) ClusterMeta(version string) cluster.Meta {
	host := ""
	for _, a := range []string{c.Cluster.Advertise, c.Cluster.Bind} {
		if h, _, err := net.SplitHostPort(a); err == nil && h != "" && !net.ParseIP(h).IsUnspecified() {
			host = h
			break
		}
	}
	reach := func(addr string) string {
		h, p, err := net.SplitHostPort(addr)
		if err != nil {
			return ""
		}
		if ip := net.ParseIP(h); (h == "" || (ip != nil && ip.IsUnspecified())) && host != "" {
			h = host
		}
		return net.JoinHostPort(h, p)
	}
	m := cluster.Meta{Role: cluster.RoleServer, Version: version, NFS: reach(c.NFSListen), Replica: c.Replica()}
	if a := reach(c.APIListen); a != "" {
		m.API = "http://" + a
	}
	return m
}

// ErrConfig is wrapped by the errors with which Daemon refuses a start over
// what the configuration names (an unsafe api.token_file, a replica's
// missing replica.token_file, a snapshot dir another server owns or holds,
// a missing NFS handle key once generations exist, a store.dir that is not
// the generations' store dir, a replica.of answering
// as this server or another replica): configuration errors as ConfigFrom's are,
// which `strata server` exits 2 on (and its unit does not restart on).
var ErrConfig = errors.New("configuration error")

// configError marks err as an ErrConfig without changing its message.
type configError struct{ err error }

func (e configError) Error() string   { return e.err.Error() }
func (e configError) Unwrap() []error { return []error{e.err, ErrConfig} }

// Replica reports whether the server is a replica (replica.of or
// replica.from_cluster): it publishes nothing and receives the primary's
// generations.
func (c Config) Replica() bool { return c.ReplicaOf != "" || c.ReplicaFromCluster }

// within reports whether path is dir or lies under it (lexically; the
// btrfs backend checks again with symlinks resolved).
func within(dir, path string) bool {
	rel, err := filepath.Rel(filepath.Clean(dir), filepath.Clean(path))
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

// PhysicalStore is the directory under a central-store root (live or a
// snapshot of it) that holds the store paths.
func PhysicalStore(root string) string { return filepath.Join(root, "store") }

// DBDir is the directory under a central-store root that holds db.sqlite.
func DBDir(root string) string { return filepath.Join(root, "var", "nix", "db") }
