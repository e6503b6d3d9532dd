package builder

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/strata-nix/strata/config"
)

// loadConfig loads and validates the builder's configuration as `strata
// builder` does: yaml is the config file (none when empty), env the
// STRATA_* variables set for the test.
func loadConfig(t *testing.T, yaml string, env map[string]string) (Config, error) {
	t.Helper()
	for k, v := range env {
		t.Setenv(k, v)
	}
	f := ""
	if yaml != "" {
		f = filepath.Join(t.TempDir(), "builder.yaml")
		if err := os.WriteFile(f, []byte(yaml), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	v, err := config.New(Keys).Load(f, f != "")
	if err != nil {
		return Config{}, err
	}
	return ConfigFrom(v)
}

// mustConfig is loadConfig of a configuration the test needs valid.
func mustConfig(t *testing.T, yaml string, env map[string]string) Config {
	t.Helper()
	c, err := loadConfig(t, yaml, env)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
