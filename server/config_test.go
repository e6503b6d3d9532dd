package server

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"github.com/strata-nix/strata/config"
)

func load(t *testing.T, yaml string, env map[string]string, args ...string) (Config, error) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "server.yaml")
	if err := os.WriteFile(f, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	// snapshot.snapshot_dir is required with btrfs (the default backend):
	// cases about other keys get one unless they set it.
	if _, ok := env["STRATA_SNAPSHOT_SNAPSHOT_DIR"]; !ok && !strings.Contains(yaml, "snapshot_dir") {
		t.Setenv("STRATA_SNAPSHOT_SNAPSHOT_DIR", "/srv/snaps")
	}
	for k, v := range env {
		t.Setenv(k, v)
	}
	l := config.New(Keys)
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	l.BindFlags(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	v, err := l.Load(f, true)
	if err != nil {
		return Config{}, err
	}
	return ConfigFrom(v)
}

func TestConfigErrorsNameTheKey(t *testing.T) {
	cases := []struct {
		name, yaml string
		env        map[string]string
		args       []string
		want       []string // substrings of the error
	}{
		{"unknown key", "nfs:\n  alow: [10.0.0.0/8]\n", nil, nil, []string{`unknown key "nfs.alow"`, "nfs.allow"}},
		{"unknown section", "stor:\n  root: /nix\n", nil, nil, []string{`unknown key "stor.root"`}},
		{"wrong type int", "retention:\n  keep: ten\n", nil, nil, []string{`"retention.keep"`, `"ten"`, "an integer"}},
		{"wrong type duration", "publish:\n  interval: often\n", nil, nil, []string{`"publish.interval"`, `"often"`, "duration"}},
		{"wrong type list", "nfs:\n  allow: {a: b}\n", nil, nil, []string{`"nfs.allow"`, "list"}},
		{"wrong type in env", "", map[string]string{"STRATA_RETENTION_KEEP": "1.5"}, nil, []string{`"retention.keep"`, "STRATA_RETENTION_KEEP", `"1.5"`}},
		{"wrong type in flag", "", nil, []string{"--nfs-max-conns=lots"}, []string{`"nfs.max_conns"`, "--nfs-max-conns", `"lots"`}},
		{"missing required", "snapshot:\n  backend: zfs\n", nil, nil, []string{`missing required key "snapshot.dataset"`}},
		{"btrfs without snapshot dir", "store:\n  root: /srv/nix\n", map[string]string{"STRATA_SNAPSHOT_SNAPSHOT_DIR": ""}, nil, []string{`missing required key "snapshot.snapshot_dir"`, "btrfs", "outside store.root /srv/nix"}},
		{"snapshot dir inside store.root", "store:\n  root: /srv/nix\nsnapshot:\n  snapshot_dir: /srv/nix/.strata\n", nil, nil, []string{`"snapshot.snapshot_dir"`, `"/srv/nix/.strata"`, "outside store.root /srv/nix"}},
		{"snapshot dir is store.root", "store:\n  root: /srv/nix\nsnapshot:\n  snapshot_dir: /srv/nix/\n", nil, nil, []string{`"snapshot.snapshot_dir"`, "outside store.root"}},
		{"relative snapshot dir", "snapshot:\n  snapshot_dir: snaps\n", nil, nil, []string{`"snapshot.snapshot_dir"`, `"snaps"`, "absolute path"}},
		{"impossible keep", "retention:\n  keep: 0\n", nil, nil, []string{`"retention.keep"`, `"0"`, "at least 1"}},
		{"impossible backend", "snapshot:\n  backend: ext4\n", nil, nil, []string{`"snapshot.backend"`, `"ext4"`, "btrfs or zfs"}},
		{"relative path", "store:\n  root: nix\n", nil, nil, []string{`"store.root"`, `"nix"`, "absolute path"}},
		{"bad cidr", "nfs:\n  allow: [10.0.0.0/33]\n", nil, nil, []string{`"nfs.allow"`, `"10.0.0.0/33"`, "CIDR"}},
		{"empty allow in file", "nfs:\n  allow: []\n", nil, nil, []string{`"nfs.allow"`, "from file", "0.0.0.0/0", "::/0"}},
		{"empty allow in env", "", map[string]string{"STRATA_NFS_ALLOW": ""}, nil, []string{`"nfs.allow"`, "STRATA_NFS_ALLOW", "0.0.0.0/0", "::/0"}},
		{"comma allow in env", "", map[string]string{"STRATA_NFS_ALLOW": ","}, nil, []string{`"nfs.allow"`, "STRATA_NFS_ALLOW", "0.0.0.0/0"}},
		{"empty allow in flag", "", nil, []string{"--nfs-allow="}, []string{`"nfs.allow"`, "--nfs-allow", "0.0.0.0/0"}},
		{"short mapped allow", "nfs:\n  allow: ['::ffff:0.0.0.0/64']\n", nil, nil, []string{`"nfs.allow"`, "96 bits"}},
		{"per-client cap", "nfs:\n  max_conns_per_client: 0\n", nil, nil, []string{`"nfs.max_conns_per_client"`, "at least 1"}},
		{"bad listen", "nfs:\n  listen: 2049\n", nil, nil, []string{`"nfs.listen"`, `"2049"`, "host:port"}},
		// Review 19 #2: a port that is not a number was accepted at load
		// and refused only by the listen at start.
		{"nfs.listen port not a number", "nfs:\n  listen: ':2049x'\n", nil, nil, []string{`"nfs.listen"`, `":2049x"`, "numeric port"}},
		{"api.listen port not a number", "api:\n  listen: 127.0.0.1:http-alt\n", nil, nil, []string{`"api.listen"`, `"127.0.0.1:http-alt"`, "numeric port"}},
		{"api.listen port too big", "", map[string]string{"STRATA_API_LISTEN": "127.0.0.1:70000"}, nil, []string{`"api.listen"`, "numeric port"}},
		{"cluster.bind port not a number", "cluster:\n  bind: ':7946x'\n  insecure: true\n", nil, nil, []string{`"cluster.bind"`, `":7946x"`}},
		{"cluster.join port not a number", "cluster:\n  join: ['central:7946x']\n  insecure: true\n", nil, nil, []string{`"cluster.join"`, `"central:7946x"`}},
		{"tiny interval", "publish:\n  interval: 1ms\n", nil, nil, []string{`"publish.interval"`, "at least 1s"}},
		{"long busy poll", "nfs:\n  busy_poll: 5ms\n", nil, nil, []string{`"nfs.busy_poll"`, `"5ms"`, "up to 1ms"}},
		{"bad yaml", "store: [\n", nil, nil, []string{"server.yaml"}},
		{"replica.of not a URL", "replica:\n  of: primary:7480\n", nil, nil, []string{`"replica.of"`, `"primary:7480"`, "http://primary:7480"}},
		{"replica.of with the API's /v1", "replica:\n  of: http://p:7480/v1\n", nil, nil, []string{`"replica.of"`, "API URL without the API's own /v1"}},
		{"replica.of with the API's /v1/", "replica:\n  of: http://p:7480/strata/v1/\n", nil, nil, []string{`"replica.of"`, "drop the /v1"}},
		{"replica.of with a query", "replica:\n  of: http://p:7480/strata?x=1\n", nil, nil, []string{`"replica.of"`, "API URL"}},
		{"tiny replica interval", "replica:\n  of: http://p:7480\n  interval: 10ms\n", nil, nil, []string{`"replica.interval"`, "at least 1s"}},
		{"replica from cluster without gossip", "replica:\n  from_cluster: true\n", nil, nil, []string{`"replica.from_cluster"`, "gossip is off"}},
		{"replica of and from cluster", "replica:\n  of: http://p:7480\n  from_cluster: true\n", nil, nil, []string{`"replica.of"`, `"replica.from_cluster"`, "not both"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := load(t, tc.yaml, tc.env, tc.args...)
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}

// Every key ConfigFrom validates names where a refused value came from,
// here the environment: an operator whose file looks right must learn that
// a STRATA_* variable (a unit's Environment=, a shell's export) set it.
func TestConfigErrorsNameTheirSource(t *testing.T) {
	const p = "http://p:7480"
	cases := []struct {
		env  map[string]string
		want string // the variable the error must name as the source
	}{
		{map[string]string{"STRATA_STORE_ROOT": "nix"}, "STRATA_STORE_ROOT"},
		{map[string]string{"STRATA_STORE_DIR": "nix/store"}, "STRATA_STORE_DIR"},
		{map[string]string{"STRATA_STATE_DIR": "state"}, "STRATA_STATE_DIR"},
		{map[string]string{"STRATA_SNAPSHOT_SNAPSHOT_DIR": ""}, "STRATA_SNAPSHOT_SNAPSHOT_DIR"},
		{map[string]string{"STRATA_SNAPSHOT_SNAPSHOT_DIR": "snaps"}, "STRATA_SNAPSHOT_SNAPSHOT_DIR"},
		{map[string]string{"STRATA_SNAPSHOT_SNAPSHOT_DIR": "/nix/.strata"}, "STRATA_SNAPSHOT_SNAPSHOT_DIR"},
		{map[string]string{"STRATA_SNAPSHOT_BACKEND": "ext4"}, "STRATA_SNAPSHOT_BACKEND"},
		{map[string]string{"STRATA_SNAPSHOT_BACKEND": "zfs", "STRATA_SNAPSHOT_DATASET": ""}, "STRATA_SNAPSHOT_DATASET"},
		{map[string]string{"STRATA_SNAPSHOT_BACKEND": "zfs", "STRATA_SNAPSHOT_DATASET": "/tank/nix"}, "STRATA_SNAPSHOT_DATASET"},
		{map[string]string{"STRATA_PUBLISH_INTERVAL": "1ms"}, "STRATA_PUBLISH_INTERVAL"},
		{map[string]string{"STRATA_RETENTION_KEEP": "0"}, "STRATA_RETENTION_KEEP"},
		{map[string]string{"STRATA_API_LISTEN": "127.0.0.1:http"}, "STRATA_API_LISTEN"},
		{map[string]string{"STRATA_NFS_LISTEN": "2049"}, "STRATA_NFS_LISTEN"},
		{map[string]string{"STRATA_NFS_ALLOW": "10.0.0.0/33"}, "STRATA_NFS_ALLOW"},
		{map[string]string{"STRATA_NFS_ALLOW": ","}, "STRATA_NFS_ALLOW"},
		{map[string]string{"STRATA_NFS_MAX_CONNS": "0"}, "STRATA_NFS_MAX_CONNS"},
		{map[string]string{"STRATA_NFS_MAX_CONNS_PER_CLIENT": "0"}, "STRATA_NFS_MAX_CONNS_PER_CLIENT"},
		{map[string]string{"STRATA_NFS_IDLE_TIMEOUT": "1ms"}, "STRATA_NFS_IDLE_TIMEOUT"},
		{map[string]string{"STRATA_NFS_BUSY_POLL": "5ms"}, "STRATA_NFS_BUSY_POLL"},
		{map[string]string{"STRATA_LOG_LEVEL": "loud"}, "STRATA_LOG_LEVEL"},
		{map[string]string{"STRATA_WATCHDOG_STALL_AFTER": "1s"}, "STRATA_WATCHDOG_STALL_AFTER"},
		{map[string]string{"STRATA_REPLICA_OF": "primary:7480"}, "STRATA_REPLICA_OF"},
		{map[string]string{"STRATA_REPLICA_OF": p, "STRATA_REPLICA_INTERVAL": "10ms"}, "STRATA_REPLICA_INTERVAL"},
		{map[string]string{"STRATA_REPLICA_OF": p, "STRATA_REPLICA_STALL_TIMEOUT": "10ms"}, "STRATA_REPLICA_STALL_TIMEOUT"},
		{map[string]string{"STRATA_REPLICA_OF": p, "STRATA_REPLICA_FROM_CLUSTER": "true"}, "STRATA_REPLICA_OF"},
		{map[string]string{"STRATA_REPLICA_OF": p, "STRATA_REPLICA_FROM_CLUSTER": "true"}, "STRATA_REPLICA_FROM_CLUSTER"},
		{map[string]string{"STRATA_REPLICA_FROM_CLUSTER": "true"}, "STRATA_REPLICA_FROM_CLUSTER"},
		{map[string]string{"STRATA_CLUSTER_INSECURE": "true", "STRATA_CLUSTER_BIND": ":7946x"}, "STRATA_CLUSTER_BIND"},
		{map[string]string{"STRATA_CLUSTER_INSECURE": "true", "STRATA_CLUSTER_ADVERTISE": "0.0.0.0:7946"}, "STRATA_CLUSTER_ADVERTISE"},
		{map[string]string{"STRATA_CLUSTER_INSECURE": "true", "STRATA_CLUSTER_JOIN": "central:7946x"}, "STRATA_CLUSTER_JOIN"},
		{map[string]string{"STRATA_CLUSTER_NAME": "a b"}, "STRATA_CLUSTER_NAME"},
		{map[string]string{"STRATA_CLUSTER_NODE_NAME": "a b"}, "STRATA_CLUSTER_NODE_NAME"},
		{map[string]string{"STRATA_CLUSTER_DEAD_GRACE": "0s"}, "STRATA_CLUSTER_DEAD_GRACE"},
		{map[string]string{"STRATA_CLUSTER_JOIN": "central:7946", "STRATA_CLUSTER_KEYRING_FILE": ""}, "STRATA_CLUSTER_KEYRING_FILE"},
		{map[string]string{"STRATA_CLUSTER_JOIN": "central:7946", "STRATA_CLUSTER_KEYRING_FILE": "/nonexistent/keys"}, "STRATA_CLUSTER_KEYRING_FILE"},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprint(tc.env), func(t *testing.T) {
			_, err := load(t, "", tc.env)
			if want := "(from env " + tc.want + ")"; err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("error %v, want one naming its source %s", err, want)
			}
		})
	}
}

func TestConfigPrecedence(t *testing.T) {
	yaml := "retention:\n  keep: 3\nnfs:\n  listen: 0.0.0.0:2049\n  allow: [10.1.0.0/16]\n"
	c, err := load(t, yaml, map[string]string{"STRATA_NFS_LISTEN": "127.0.0.1:3049"}, "--retention-keep=7")
	if err != nil {
		t.Fatal(err)
	}
	if c.Keep != 7 {
		t.Errorf("keep %d: flag should win", c.Keep)
	}
	if c.NFSListen != "127.0.0.1:3049" {
		t.Errorf("nfs.listen %q: env should beat the file", c.NFSListen)
	}
	if len(c.NFSAllow) != 1 || c.NFSAllow[0].String() != "10.1.0.0/16" {
		t.Errorf("nfs.allow %v", c.NFSAllow)
	}
	c, err = load(t, "nfs:\n  allow: ['::ffff:127.0.0.0/104', 0.0.0.0/0, '::/0']\n", nil)
	if err != nil || len(c.NFSAllow) != 3 || c.NFSAllow[0].String() != "127.0.0.0/8" {
		t.Errorf("mapped and allow-all entries: %v %v", c.NFSAllow, err)
	}
	if c.SnapshotDir != "/srv/snaps" || c.Socket != "/var/lib/strata/server/api.sock" || c.PublishInterval.String() != "5m0s" {
		t.Errorf("derived defaults: %+v", c)
	}
}

// Review 18 #14: replica.of takes a path prefix (a reverse proxy) as a
// builder's server.api does; the API's own /v1 is refused above.
func TestReplicaOfPathPrefix(t *testing.T) {
	c, err := load(t, "replica:\n  of: http://proxy:8080/strata/\n", nil)
	if err != nil || c.ReplicaOf != "http://proxy:8080/strata/" {
		t.Fatalf("replica.of with a path prefix: %+v %v", c.ReplicaOf, err)
	}
}

func TestConfigMissingFile(t *testing.T) {
	l := config.New(Keys)
	if _, err := l.Load(filepath.Join(t.TempDir(), "nope.yaml"), true); err == nil || !strings.Contains(err.Error(), "nope.yaml") {
		t.Fatalf("error %v, want one naming the file", err)
	}
	v, err := l.Load(filepath.Join(t.TempDir(), "nope.yaml"), false)
	if err != nil {
		t.Fatal(err)
	}
	// The defaults lack only the btrfs snapshot dir, which has none.
	if _, err := ConfigFrom(v); err == nil || !strings.Contains(err.Error(), `missing required key "snapshot.snapshot_dir"`) {
		t.Fatalf("defaults: %v, want the missing snapshot.snapshot_dir named", err)
	}
	t.Setenv("STRATA_SNAPSHOT_SNAPSHOT_DIR", "/srv/snaps")
	if v, err = l.Load(filepath.Join(t.TempDir(), "nope.yaml"), false); err != nil {
		t.Fatal(err)
	}
	if _, err := ConfigFrom(v); err != nil {
		t.Fatalf("defaults with a snapshot dir do not validate: %v", err)
	}
	// A replica's snapshot dir is any btrfs directory: store.root is not
	// its concern.
	if _, err := load(t, "replica:\n  of: http://p:7480\nsnapshot:\n  snapshot_dir: /nix/.strata\n", nil); err != nil {
		t.Fatalf("replica with snapshot dir under the unused store.root: %v", err)
	}
	if _, err := load(t, "snapshot:\n  backend: zfs\n  dataset: tank/nix\n", nil); err != nil {
		t.Fatalf("zfs needs no snapshot dir: %v", err)
	}
}

// Every field of Config names the key it comes from, so that a reload
// logs keys (config.Changed), and every key has its field.
func TestConfigFieldsNameKeys(t *testing.T) {
	if err := config.CheckTags(Config{}, Keys); err != nil {
		t.Error(err)
	}
}

// A new-user test: a state_dir that exists but is a file gave errors that
// did not name state_dir ("read generations: open .../generations: not a
// directory"). The load refuses it naming the key (start and
// --check-config both load), and leaves the file as it was.
func TestConfigStateDirNotADirectory(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "state")
	if err := os.WriteFile(file, []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{file, filepath.Join(file, "server")} {
		_, err := load(t, "state_dir: "+p+"\n", nil)
		if err == nil || !strings.Contains(err.Error(), `config: key "state_dir" (from file`) ||
			!strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), "not a directory") {
			t.Errorf("state_dir %s: %v, want an error naming state_dir, the path and \"not a directory\"", p, err)
		}
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "data" {
		t.Errorf("the file state_dir named: %q %v, want it unchanged", b, err)
	}
	// A state_dir that does not exist yet is fine: a start makes it.
	if _, err := load(t, "state_dir: "+filepath.Join(dir, "new")+"\n", nil); err != nil {
		t.Errorf("state_dir that does not exist: %v", err)
	}
}
