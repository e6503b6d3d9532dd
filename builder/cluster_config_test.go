package builder

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/strata-nix/strata/config"
	"github.com/strata-nix/strata/internal/apiserve"
)

func TestServerAPIMayBeEmptyOnlyWithJoin(t *testing.T) {
	load := func(yaml string) (Config, error) { return loadConfig(t, yaml, nil) }
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
	if err := config.CheckTags(Config{}, Keys); err != nil {
		t.Error(err)
	}
}

// Review 19 #7: a reload said only that some keys need a restart (the
// server named Go fields, "Retention.Keep"). It names the keys.
func TestReloadNamesChangedKeys(t *testing.T) {
	dir := t.TempDir()
	tok := filepath.Join(dir, "token")
	if err := os.WriteFile(tok, []byte("t\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cur := mustConfig(t, "", map[string]string{"STRATA_API_TOKEN_FILE": tok})
	next := mustConfig(t, "", map[string]string{"STRATA_ROTATE_POLICY": "idle", "STRATA_MOUNT_NCONNECT": "8", "STRATA_OVERLAY_METACOPY": "false", "STRATA_LOG_LEVEL": "debug"})
	var logs logBuffer
	if err := applyReload(cur, next, apiserve.NewToken(""), nil, logs.logger()); err != nil {
		t.Fatal(err)
	}
	if logs.count("take effect only after a restart", "changed=\"[mount.nconnect rotate.policy overlay.metacopy]\"") != 1 {
		t.Errorf("reload log lacks the changed keys:\n%s", logs.String())
	}
	var again logBuffer
	if err := applyReload(next, next, apiserve.NewToken(""), nil, again.logger()); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(again.String(), "restart") {
		t.Errorf("reload without changes:\n%s", again.String())
	}
}
