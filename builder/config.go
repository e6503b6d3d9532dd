package builder

import (
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/cluster"
	"github.com/strata-nix/strata/config"
	"github.com/strata-nix/strata/overlay"
)

// DefaultConfigFile is where `strata builder` reads its settings.
const DefaultConfigFile = "/etc/strata/builder.yaml"

// Keys is the builder agent's configuration table: every key is a YAML key,
// a STRATA_* environment variable and a flag (see package config).
var Keys = []config.Key{
	{Name: "server.api", Kind: config.String, Default: "http://127.0.0.1:7480", Usage: "the strata server's HTTP API (http://host:port, without the API's own /v1); may be empty with cluster.join (servers are found by gossip) or API URLs in server.prefer, and its default is not used then unless this key is set"},
	{Name: "server.nfs", Kind: config.String, Default: "", Usage: "the server's NFS address host:port (default: the \"nfs\" field of GET /v1/generations, with an unspecified host replaced by the API host)"},
	{Name: "server.prefer", Kind: config.List, Default: []string{}, Usage: "servers to prefer, best first: gossip member names or API URLs (a URL is also a failover candidate without gossip); after them come server.api, then the lowest gossip round-trip time"},
	{Name: "failover.after", Kind: config.Duration, Default: "30s", Usage: "move to another server that serves the same generation when the one in use leaves API or NFS calls unanswered this long, or at once when gossip declares it dead and its API does not answer (0: never)"},
	{Name: "store.dir", Kind: config.String, Default: "/nix/store", Usage: "store directory the overlay is mounted on"},
	{Name: "nix.state_dir", Kind: config.String, Default: "/nix/var/nix", Usage: "Nix state directory holding db/db.sqlite"},
	{Name: "nix.store", Kind: config.String, Default: "", Usage: "value of nix-store --store (empty: the default store; a directory: a chroot store whose <dir>/nix/store is store.dir)"},
	{Name: "nix.bin", Kind: config.String, Default: "nix-store", Usage: "the nix-store executable"},
	{Name: "state_dir", Kind: config.String, Default: "/var/lib/strata/builder", Usage: "agent state: upper/, work/, lower/<N>/, state.json, api.sock"},
	{Name: "mount.options", Kind: config.List, Default: []string{}, Usage: "extra NFS mount options for tuning, e.g. timeo=600 (options strata sets itself, such as vers, proto, port, addr, soft/hard, ro/rw, noacl, sharecache, nolock, nconnect, are refused)"},
	{Name: "mount.nconnect", Kind: config.Int, Default: 4, Usage: "TCP connections per NFS mount (1-16)"},
	{Name: "rotate.policy", Kind: config.String, Default: "immediate", Usage: "when to rotate to a new generation: immediate, or idle (when no build runs)"},
	{Name: "rotate.max_wait", Kind: config.Duration, Default: "1h", Usage: "idle policy: rotate anyway after waiting this long for builds to end"},
	{Name: "rotate.check_interval", Kind: config.Duration, Default: "30s", Usage: "how often to ask the server for a newer generation"},
	{Name: "swap.method", Kind: config.String, Default: "auto", Usage: "overlay swap method: auto, beneath (Linux 6.5+) or propagation"},
	{Name: "overlay.metacopy", Kind: config.Bool, Default: true, Usage: "mount the overlay with metacopy=on, so hard links to generation files (sandboxed builds, nix-store --optimise) copy no data into the upper"},
	{Name: "swap.staging_dir", Kind: config.String, Default: overlay.DefaultStagingDir, Usage: "propagation swap: where the private staging tmpfs lives"},
	{Name: "api.socket", Kind: config.String, Default: "", Usage: "unix socket for the agent's API; calls on it need no token (default <state_dir>/api.sock)"},
	{Name: "api.listen", Kind: config.String, Default: "", Usage: "TCP address for the agent's API (empty: socket only)"},
	{Name: "api.token_file", Kind: config.String, Default: "/etc/strata/api-token", Usage: "file with the bearer token mutating TCP calls need"},
	{Name: "log.level", Kind: config.String, Default: "info", Usage: "log level: debug, info, warn or error (SIGHUP reloads it and the API token)"},
	{Name: "watchdog.stall_after", Kind: config.Duration, Default: "30m", Usage: "a mount, import or rotation running longer than this counts as wedged: systemd watchdog pings stop and systemd restarts the agent (0: never)"},
}

func init() { Keys = append(Keys, cluster.Keys...) }

// Policy says when the agent rotates to a newer generation.
type Policy int

const (
	// PolicyImmediate rotates as soon as a newer generation is seen.
	PolicyImmediate Policy = iota
	// PolicyIdle waits until no build is running (see Busy), at most
	// rotate.max_wait.
	PolicyIdle
)

// String returns "immediate" or "idle".
func (p Policy) String() string {
	switch p {
	case PolicyImmediate:
		return "immediate"
	case PolicyIdle:
		return "idle"
	}
	return fmt.Sprintf("Policy(%d)", int(p))
}

// Config is the validated builder configuration.
type Config struct {
	ServerAPI string `key:"server.api"`
	ServerNFS string `key:"server.nfs"` // host:port, or "" to ask the server
	// Prefer lists servers (gossip names or API URLs) best first.
	Prefer []string `key:"server.prefer"`
	// FailoverAfter is failover.after (0: no automatic failover).
	FailoverAfter time.Duration  `key:"failover.after"`
	StoreDir      string         `key:"store.dir"`
	NixStateDir   string         `key:"nix.state_dir"`
	NixStore      string         `key:"nix.store"`
	NixBin        string         `key:"nix.bin"`
	StateDir      string         `key:"state_dir"`
	MountOptions  []string       `key:"mount.options"`
	NConnect      int            `key:"mount.nconnect"`
	Policy        Policy         `key:"rotate.policy"`
	MaxWait       time.Duration  `key:"rotate.max_wait"`
	CheckInterval time.Duration  `key:"rotate.check_interval"`
	SwapMethod    overlay.Method `key:"swap.method"`
	StagingDir    string         `key:"swap.staging_dir"`
	Socket        string         `key:"api.socket"`
	APIListen     string         `key:"api.listen"`
	TokenFile     string         `key:"api.token_file"`
	LogLevel      string         `key:"log.level"`
	StallAfter    time.Duration  `key:"watchdog.stall_after"`
	// Cluster is gossip (cluster.*): with it the agent learns of a publish
	// at once and, when ServerAPI is empty, finds its server.
	Cluster cluster.Settings
	// NoMetacopy turns overlay.metacopy off (the zero Config keeps it on).
	NoMetacopy bool `key:"overlay.metacopy"`
}

// ConfigFrom validates loaded values and fills derived defaults. Each error
// names the key, the value and what was expected.
func ConfigFrom(v config.Values) (Config, error) {
	c := Config{
		ServerAPI:     v.String("server.api"),
		ServerNFS:     v.String("server.nfs"),
		Prefer:        v.List("server.prefer"),
		FailoverAfter: v.Duration("failover.after"),
		StoreDir:      v.String("store.dir"),
		NixStateDir:   v.String("nix.state_dir"),
		NixStore:      v.String("nix.store"),
		NixBin:        v.String("nix.bin"),
		StateDir:      v.String("state_dir"),
		MountOptions:  v.List("mount.options"),
		NConnect:      v.Int("mount.nconnect"),
		MaxWait:       v.Duration("rotate.max_wait"),
		CheckInterval: v.Duration("rotate.check_interval"),
		StagingDir:    v.String("swap.staging_dir"),
		NoMetacopy:    !v.Bool("overlay.metacopy"),
		Socket:        v.String("api.socket"),
		APIListen:     v.String("api.listen"),
		TokenFile:     v.String("api.token_file"),
		LogLevel:      v.String("log.level"),
		StallAfter:    v.Duration("watchdog.stall_after"),
	}
	bad := v.Bad // names the key's source: file, env or flag
	cs, err := cluster.SettingsFrom(v)
	if err != nil {
		return c, err
	}
	c.Cluster = cs
	// server.api's default (a server on this host) is no candidate when
	// the servers are found otherwise: by gossip, or listed in
	// server.prefer. Only a server.api given explicitly is.
	if v.Source["server.api"] == "default" && (len(cs.Join) > 0 || slices.ContainsFunc(c.Prefer, isURL)) {
		c.ServerAPI = ""
	}
	if c.ServerAPI == "" && len(cs.Join) == 0 && !slices.ContainsFunc(c.Prefer, isURL) {
		return c, bad("server.api", c.ServerAPI, "an http:// URL such as http://central:7480 (it may be empty only with cluster.join or API URLs in server.prefer)")
	}
	if c.ServerAPI != "" {
		if err := api.CheckBaseURL(c.ServerAPI, "http://central:7480"); err != nil {
			return c, v.Invalid("server.api", c.ServerAPI, err)
		}
	}
	if c.ServerNFS != "" {
		if h, p, err := config.HostPort(c.ServerNFS); err != nil || h == "" || p == 0 {
			return c, bad("server.nfs", c.ServerNFS, "host:port such as central:2049")
		}
	}
	for _, p := range c.Prefer {
		if p == "" || strings.ContainsAny(p, " \t\n,") {
			return c, bad("server.prefer", p, "a gossip member name or an http:// API URL per entry")
		}
		if strings.Contains(p, "://") {
			if err := api.CheckBaseURL(p, "http://central:7480"); err != nil {
				return c, fmt.Errorf("config: key %q%s: entry %q: %w", "server.prefer", v.From("server.prefer"), p, err)
			}
		}
	}
	if c.FailoverAfter < 0 || (c.FailoverAfter > 0 && c.FailoverAfter < time.Second) {
		return c, bad("failover.after", c.FailoverAfter, "0 (never) or at least 1s")
	}
	for _, kv := range [][2]string{{"store.dir", c.StoreDir}, {"nix.state_dir", c.NixStateDir}, {"state_dir", c.StateDir}, {"swap.staging_dir", c.StagingDir}} {
		if !filepath.IsAbs(kv[1]) || strings.ContainsAny(kv[1], ",:\\\n") {
			return c, bad(kv[0], kv[1], "an absolute path without ',', ':' or '\\'")
		}
	}
	if c.NixStore != "" && !storeURL(c.NixStore) && !filepath.IsAbs(c.NixStore) {
		return c, bad("nix.store", c.NixStore, "a store URL (auto, daemon, local, scheme://...) or an absolute directory")
	}
	if c.NixBin == "" {
		return c, bad("nix.bin", c.NixBin, "the nix-store executable")
	}
	for _, o := range c.MountOptions {
		if o == "" || strings.ContainsAny(o, ", \t\n") {
			return c, bad("mount.options", o, "NFS options without commas or spaces, one per list entry")
		}
		if err := overlay.CheckExtraNFSOption(o); err != nil {
			return c, fmt.Errorf("config: key %q%s: %w; mount.options is for tuning only (rsize, wsize, timeo, retrans, actimeo, ...)", "mount.options", v.From("mount.options"), err)
		}
	}
	if c.NConnect < 1 || c.NConnect > 16 {
		return c, bad("mount.nconnect", c.NConnect, "1 to 16")
	}
	switch p := v.String("rotate.policy"); p {
	case "immediate":
		c.Policy = PolicyImmediate
	case "idle":
		c.Policy = PolicyIdle
	default:
		return c, bad("rotate.policy", p, "immediate or idle")
	}
	if c.MaxWait < 0 {
		return c, bad("rotate.max_wait", c.MaxWait, "a duration of 0 or more")
	}
	if c.CheckInterval < 100*time.Millisecond {
		return c, bad("rotate.check_interval", c.CheckInterval, "at least 100ms")
	}
	m, err := overlay.ParseMethod(v.String("swap.method"))
	if err != nil {
		return c, bad("swap.method", v.String("swap.method"), "auto, beneath or propagation")
	}
	c.SwapMethod = m
	if err := v.NotDir("state_dir", c.StateDir); err != nil {
		return c, err
	}
	if rel, err := filepath.Rel(c.StoreDir, c.StateDir); err == nil && !strings.HasPrefix(rel, "..") {
		return c, bad("state_dir", c.StateDir, "a directory outside store.dir")
	}
	if c.Socket == "" {
		c.Socket = filepath.Join(c.StateDir, "api.sock")
	}
	if c.APIListen != "" {
		if _, _, err := config.HostPort(c.APIListen); err != nil {
			return c, bad("api.listen", c.APIListen, "host:port with a numeric port, such as 127.0.0.1:7481")
		}
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		return c, bad("log.level", c.LogLevel, "debug, info, warn or error")
	}
	if c.StallAfter < 0 || (c.StallAfter > 0 && c.StallAfter < time.Minute) {
		return c, bad("watchdog.stall_after", c.StallAfter, "0 (never) or at least 1m")
	}
	return c, nil
}

// NFSAddress returns the NFS host:port to mount from: server.nfs when set,
// else advertised (the "nfs" field of GET /v1/generations) with an
// unspecified or empty host (0.0.0.0, ::) replaced by the API URL's host.
func (c Config) NFSAddress(advertised string) (host string, port int, err error) {
	addr := c.ServerNFS
	if addr == "" {
		addr = advertised
	}
	if addr == "" {
		return "", 0, fmt.Errorf("nfs address: server.nfs is not set and the server advertises none")
	}
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, fmt.Errorf("nfs address %q: %w", addr, err)
	}
	if ip := net.ParseIP(h); h == "" || (ip != nil && ip.IsUnspecified()) {
		u, err := url.Parse(c.ServerAPI)
		if err != nil {
			return "", 0, fmt.Errorf("nfs address: server.api %q: %w", c.ServerAPI, err)
		}
		h = u.Hostname()
	}
	var n int
	if _, err := fmt.Sscanf(p, "%d", &n); err != nil || n < 1 || n > 65535 {
		return "", 0, fmt.Errorf("nfs address %q: port %q: want 1-65535", addr, p)
	}
	return h, n, nil
}

// Layout paths under the state dir.
func (c Config) upperDir() string  { return filepath.Join(c.StateDir, "upper") }
func (c Config) workRoot() string  { return filepath.Join(c.StateDir, "work") }
func (c Config) lowerRoot() string { return filepath.Join(c.StateDir, "lower") }
func (c Config) stateFile() string { return filepath.Join(c.StateDir, "state.json") }
func (c Config) localDir() string  { return filepath.Join(c.StateDir, "local") }
func (c Config) lowerDir(g uint64) string {
	return filepath.Join(c.lowerRoot(), fmt.Sprint(g))
}

// storeURL reports whether s names a Nix store the way --store takes it
// other than as a directory: a scheme://... URL, or auto, daemon or local
// with or without ?parameters.
func storeURL(s string) bool {
	if strings.Contains(s, "://") {
		return true
	}
	name, _, _ := strings.Cut(s, "?")
	return name == "auto" || name == "daemon" || name == "local"
}
