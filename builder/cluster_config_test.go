package builder

import (
	"os"
	"path/filepath"
	"slices"
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

// Every field of Config names the key it comes from, so that a reload
// logs keys (config.Changed), and every key has its field.
func TestConfigFieldsNameKeys(t *testing.T) {
	tags, err := config.Tags(Config{})
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, k := range Keys {
		keys = append(keys, k.Name)
	}
	slices.Sort(tags)
	slices.Sort(keys)
	if !slices.Equal(tags, keys) {
		t.Errorf("Config's key tags %v\ndiffer from the keys %v", tags, keys)
	}
}
