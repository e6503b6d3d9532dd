package server

import (
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestClusterConfig(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "cluster.keys")
	key := base64.StdEncoding.EncodeToString(make([]byte, 32))
	if err := os.WriteFile(keyFile, []byte(key+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	loose := filepath.Join(dir, "loose.keys")
	os.WriteFile(loose, []byte(key+"\n"), 0o644)
	short := filepath.Join(dir, "short.keys")
	os.WriteFile(short, []byte("# comment\n"+base64.StdEncoding.EncodeToString(make([]byte, 16))+"\n"), 0o600)

	cases := []struct{ name, yaml, want string }{
		{"missing keyring", "cluster:\n  bind: 127.0.0.1:7946\n  keyring_file: " + filepath.Join(dir, "none") + "\n", `"cluster.keyring_file"`},
		{"loose mode", "cluster:\n  bind: 127.0.0.1:7946\n  keyring_file: " + loose + "\n", "chmod 600"},
		{"short key", "cluster:\n  bind: 127.0.0.1:7946\n  keyring_file: " + short + "\n", "line 2: key is 16 bytes: want 32"},
		{"bad bind", "cluster:\n  bind: nowhere\n  insecure: true\n", `"cluster.bind"`},
		{"bad advertise", "cluster:\n  bind: 0.0.0.0:7946\n  advertise: 0.0.0.0:7946\n  insecure: true\n", `"cluster.advertise"`},
		{"bad join", "cluster:\n  join: [central]\n  insecure: true\n", `"cluster.join"`},
		{"bad grace", "cluster:\n  bind: 127.0.0.1:7946\n  insecure: true\n  dead_grace: -1s\n", `"cluster.dead_grace"`},
		{"bad name", "cluster:\n  bind: 127.0.0.1:7946\n  insecure: true\n  name: a b\n", `"cluster.name"`},
	}
	for _, tc := range cases {
		_, err := load(t, tc.yaml, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want an error naming %s", tc.name, err, tc.want)
		}
	}
	// Off by default: no keyring needed.
	c, err := load(t, "", nil)
	if err != nil || c.Cluster.Enabled {
		t.Fatalf("default: enabled=%v err=%v", c.Cluster.Enabled, err)
	}
	c, err = load(t, "api:\n  listen: 0.0.0.0:7480\ncluster:\n  bind: 0.0.0.0:7946\n  advertise: 10.1.2.3:7946\n  keyring_file: "+keyFile+"\n", nil)
	if err != nil || !c.Cluster.Enabled || c.Cluster.Keyring == nil {
		t.Fatalf("encrypted: %+v %v", c.Cluster, err)
	}
	if m := c.ClusterMeta("v"); m.API != "http://10.1.2.3:7480" || m.NFS != "10.1.2.3:2049" {
		t.Fatalf("advertised addresses: %+v", m)
	}
	c, err = load(t, "cluster:\n  join: [central:7946]\n  insecure: true\n", nil)
	if err != nil || !c.Cluster.Enabled || c.Cluster.Bind != "0.0.0.0:7946" || c.Cluster.Keyring != nil {
		t.Fatalf("insecure join: %+v %v", c.Cluster, err)
	}
	long := strings.Repeat("h", 300)
	if _, err := load(t, "nfs:\n  listen: "+long+":2049\napi:\n  listen: "+long+":7480\ncluster:\n  bind: 127.0.0.1:7946\n  insecure: true\n", nil); err == nil || !strings.Contains(err.Error(), "512 bytes") {
		t.Fatalf("oversized metadata: %v", err)
	}
}
