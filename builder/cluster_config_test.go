package builder

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/strata-nix/strata/config"
)

func TestServerAPIMayBeEmptyOnlyWithJoin(t *testing.T) {
	load := func(yaml string) (Config, error) {
		f := filepath.Join(t.TempDir(), "builder.yaml")
		os.WriteFile(f, []byte(yaml), 0o644)
		v, err := config.New(Keys).Load(f, true)
		if err != nil {
			return Config{}, err
		}
		return ConfigFrom(v)
	}
	if _, err := load("server:\n  api: \"\"\n"); err == nil || !strings.Contains(err.Error(), "only with cluster.join") {
		t.Fatalf("empty server.api without cluster.join: %v", err)
	}
	c, err := load("server:\n  api: \"\"\ncluster:\n  join: [central:7946]\n  insecure: true\n")
	if err != nil || c.ServerAPI != "" || !c.Cluster.Enabled {
		t.Fatalf("empty server.api with cluster.join: %+v %v", c, err)
	}
	if _, err := load("cluster:\n  join: [central:7946]\n  keyring_file: /nonexistent/keys\n"); err == nil || !strings.Contains(err.Error(), `"cluster.keyring_file"`) {
		t.Fatalf("join without keyring: %v", err)
	}
}
