package cluster

import (
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/strata-nix/strata/config"
)

// Keys are the cluster.* settings both daemons take (appended to their key
// tables). Gossip is on when cluster.bind or cluster.join is set.
var Keys = []config.Key{
	{Name: "cluster.bind", Kind: config.String, Default: "", Usage: "gossip address host:port, TCP and UDP (empty: gossip off unless cluster.join is set, then 0.0.0.0:7946)"},
	{Name: "cluster.advertise", Kind: config.String, Default: "", Usage: "gossip address other members reach this one at (default: cluster.bind; an unspecified host becomes the first private address)"},
	{Name: "cluster.join", Kind: config.List, Default: []string{}, Usage: "seed members host:port to join (retried with backoff; lost seeds re-joined every 5s)"},
	{Name: "cluster.name", Kind: config.String, Default: "strata", Usage: "cluster name put on every gossip packet; members of another cluster are refused"},
	{Name: "cluster.node_name", Kind: config.String, Default: "", Usage: "this member's unique name (default: the hostname)"},
	{Name: "cluster.keyring_file", Kind: config.String, Default: "/etc/strata/cluster.keys", Usage: "gossip keyring: one base64 32-byte AES key per line, the first the primary; mode 0600"},
	{Name: "cluster.insecure", Kind: config.Bool, Default: false, Usage: "gossip in plaintext without a keyring (only on a trusted network)"},
	{Name: "cluster.dead_grace", Kind: config.Duration, Default: "1h", Usage: "a builder dead (not merely suspect) this long stops holding its generations; one that left gracefully holds nothing"},
}

// Settings are the validated cluster.* values.
type Settings struct {
	Enabled     bool          `key:"-"`
	Bind        string        `key:"cluster.bind"`
	Advertise   string        `key:"cluster.advertise"`
	Join        []string      `key:"cluster.join"`
	ClusterName string        `key:"cluster.name"`
	NodeName    string        `key:"cluster.node_name"`
	KeyringFile string        `key:"cluster.keyring_file"`
	Keyring     *Keyring      `key:"-"` // nil with Insecure
	Insecure    bool          `key:"cluster.insecure"`
	DeadGrace   time.Duration `key:"cluster.dead_grace"`
}

// DefaultBind is cluster.bind when only cluster.join is set.
const DefaultBind = "0.0.0.0:7946"

// SettingsFrom validates the cluster.* keys and loads the keyring. Each
// error names the key, the value and what was expected.
func SettingsFrom(v config.Values) (Settings, error) {
	s := Settings{
		Bind:        v.String("cluster.bind"),
		Advertise:   v.String("cluster.advertise"),
		Join:        v.List("cluster.join"),
		ClusterName: v.String("cluster.name"),
		NodeName:    v.String("cluster.node_name"),
		KeyringFile: v.String("cluster.keyring_file"),
		Insecure:    v.Bool("cluster.insecure"),
		DeadGrace:   v.Duration("cluster.dead_grace"),
	}
	bad := v.Bad // names the key's source: file, env or flag
	s.Enabled = s.Bind != "" || len(s.Join) > 0
	if s.Bind == "" && s.Enabled {
		s.Bind = DefaultBind
	}
	if s.Enabled {
		if _, _, err := splitHostPort(s.Bind); err != nil {
			return s, bad("cluster.bind", s.Bind, "host:port such as 0.0.0.0:7946")
		}
	}
	if s.Advertise != "" {
		h, p, err := splitHostPort(s.Advertise)
		if err != nil || net.ParseIP(h) == nil || net.ParseIP(h).IsUnspecified() || p == 0 {
			return s, bad("cluster.advertise", s.Advertise, "ip:port other members can reach, such as 10.0.0.5:7946")
		}
	}
	for _, j := range s.Join {
		if h, p, err := config.HostPort(j); err != nil || h == "" || p == 0 {
			return s, bad("cluster.join", j, "host:port of a member such as central:7946")
		}
	}
	if s.ClusterName == "" || len(s.ClusterName) > 200 || strings.ContainsAny(s.ClusterName, " \t\n") {
		return s, bad("cluster.name", s.ClusterName, "a name of 1 to 200 characters without spaces")
	}
	if s.NodeName == "" {
		h, err := os.Hostname()
		if err != nil {
			return s, fmt.Errorf("config: key %q%s: empty and the hostname is unknown: %w", "cluster.node_name", v.From("cluster.node_name"), err)
		}
		s.NodeName = h
	}
	if len(s.NodeName) > 200 || strings.ContainsAny(s.NodeName, " \t\n") {
		return s, bad("cluster.node_name", s.NodeName, "a name of 1 to 200 characters without spaces")
	}
	if s.DeadGrace <= 0 {
		return s, bad("cluster.dead_grace", s.DeadGrace, "a positive duration such as 1h")
	}
	if !s.Enabled || s.Insecure {
		return s, nil
	}
	if s.KeyringFile == "" {
		return s, fmt.Errorf("config: key %q%s: empty: gossip needs a keyring (or cluster.insecure: true on a trusted network)", "cluster.keyring_file", v.From("cluster.keyring_file"))
	}
	if _, err := os.Stat(s.KeyringFile); os.IsNotExist(err) {
		return s, fmt.Errorf("config: key %q%s: %s does not exist: gossip needs a keyring (one base64 32-byte key per line, e.g. `head -c32 /dev/urandom | base64`), or cluster.insecure: true", "cluster.keyring_file", v.From("cluster.keyring_file"), s.KeyringFile)
	}
	kr, err := LoadKeyring("cluster.keyring_file", s.KeyringFile)
	if err != nil {
		return s, err
	}
	s.Keyring = kr
	return s, nil
}

// CheckMeta checks that m (with the longest version string strata prints)
// fits memberlist's metadata limit; daemons call it at config load.
func CheckMeta(m Meta) error {
	if len(m.Version) < 64 {
		m.Version = strings.Repeat("v", 64)
	}
	_, err := EncodeMeta(m)
	return err
}

// Config returns the member configuration for these settings.
func (s Settings) Config(meta Meta) Config {
	return Config{Name: s.NodeName, ClusterName: s.ClusterName, Bind: s.Bind, Advertise: s.Advertise, Join: s.Join,
		Keyring: s.Keyring, DeadGrace: s.DeadGrace, Meta: meta}
}
