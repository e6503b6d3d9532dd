package main

import (
	"bytes"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/strata-nix/strata/builder"
	"github.com/strata-nix/strata/config"
	"github.com/strata-nix/strata/server"
)

// A mistyped STRATA_* variable stops both daemons, their start and
// --check-config alike, as an unknown key in the file does: exit 2, the
// variable and the name it was probably meant to be. Variables strata
// reads that are not keys (debug hooks, test knobs) and the other daemon's
// keys are accepted.
func TestEnvTypoRefused(t *testing.T) {
	dir := t.TempDir()
	token := filepath.Join(dir, "token")
	os.WriteFile(token, []byte("secret\n"), 0o600)
	state := filepath.Join(dir, "state")
	bcfg := filepath.Join(dir, "builder.yaml")
	os.WriteFile(bcfg, []byte(fmt.Sprintf("server:\n  api: http://127.0.0.1:1\nstore:\n  dir: %s\nnix:\n  state_dir: %s\nstate_dir: %s\napi:\n  token_file: %s\n",
		filepath.Join(dir, "store"), filepath.Join(dir, "var"), state, token)), 0o644)
	scfg := filepath.Join(dir, "server.yaml")
	os.WriteFile(scfg, []byte(fmt.Sprintf("store:\n  root: %s\nsnapshot:\n  snapshot_dir: %s\nstate_dir: %s\napi:\n  listen: \"\"\nnfs:\n  listen: \"\"\n",
		filepath.Join(dir, "nix"), filepath.Join(dir, "snaps"), state)), 0o644)

	// Spelt from config.EnvPrefix so that TestEnvNamesKnown does not find it.
	typo := config.EnvPrefix + "API_TOKNE_FILE"
	for _, args := range [][]string{
		{"server", "--config", scfg}, {"server", "--config", scfg, "--check-config"},
		{"builder", "--config", bcfg}, {"builder", "--config", bcfg, "--check-config"},
	} {
		out, code := runStrata(t, []string{typo + "=" + token}, args...)
		if code != 2 || !strings.Contains(out, "unknown environment variable "+typo) || !strings.Contains(out, "did you mean STRATA_API_TOKEN_FILE (key api.token_file)") {
			t.Errorf("%v with %s set: exit %d, want 2 naming it and STRATA_API_TOKEN_FILE:\n%s", args, typo, code, out)
		}
	}
	out, code := runStrata(t, []string{config.EnvPrefix + "DEBUG_REPLICA_PASUE=receive"}, "server", "--config", scfg)
	if code != 2 || !strings.Contains(out, "did you mean STRATA_DEBUG_REPLICA_PAUSE (replica debug hook") {
		t.Errorf("a typo of a debug hook: exit %d\n%s", code, out)
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Errorf("a refused start made state_dir: %v", err)
	}

	allowed := []string{"STRATA_DEBUG_REPLICA_PAUSE=receive", "STRATA_TEST_ZPOOL=tank", "STRATA_BENCH_PATHS=10",
		"STRATA_REPLICA_TOKEN_FILE=" + token, "STRATA_API_TOKEN_FILE=" + token, "STRATA_API=unix:/nowhere"}
	if out, code := runStrata(t, allowed, "builder", "--config", bcfg, "--check-config"); code != 0 || !strings.Contains(out, "configuration: ok") {
		t.Errorf("builder --check-config with known variables set: exit %d\n%s", code, out)
	}
}

// Every STRATA_* name anywhere in the repository is a key of a daemon or
// in otherEnv, so no daemon refuses a variable strata or its tests use;
// each shipped unit sets only its own daemon's keys; otherEnv names no key.
func TestEnvNamesKnown(t *testing.T) {
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatal(err)
	}
	keys := map[string]string{}
	for _, ks := range []struct {
		role string
		keys []config.Key
	}{{"server", server.Keys}, {"builder", builder.Keys}} {
		for _, k := range ks.keys {
			keys[k.EnvName()] += ks.role + " "
			if what, ok := otherEnv[k.EnvName()]; ok {
				t.Errorf("otherEnv lists %s (%s), which is the key %s", k.EnvName(), what, k.Name)
			}
		}
	}
	// Placeholders in documentation, not variables.
	placeholder := map[string]bool{"STRATA_SECTION_KEY": true, "STRATA_SECTION_NAME": true}
	re := regexp.MustCompile(`\bSTRATA_[A-Z0-9_]*[A-Z0-9]\b`)
	found := map[string][]string{}
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if d.Name() == ".git" || d.Name() == "node_modules" {
				return filepath.SkipDir
			}
			return nil
		}
		if !d.Type().IsRegular() {
			return nil
		}
		if info, err := d.Info(); err != nil || info.Size() > 4<<20 {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil || bytes.IndexByte(b, 0) >= 0 {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		for _, name := range re.FindAllString(string(b), -1) {
			if seen := found[name]; len(seen) == 0 || seen[len(seen)-1] != rel {
				found[name] = append(seen, rel)
			}
			if unit := strings.TrimSuffix(strings.TrimPrefix(rel, "systemd/strata-"), ".service"); unit != rel && strings.HasSuffix(rel, ".service") {
				if !strings.Contains(keys[name], unit+" ") {
					t.Errorf("%s sets %s, which is not a key of strata %s", rel, name, unit)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for name := range found {
		names = append(names, name)
	}
	sort.Strings(names)
	known := knownEnv()
	for _, name := range names {
		if _, ok := known[name]; !ok && !placeholder[name] {
			t.Errorf("%s (in %s) is neither a daemon's key nor in otherEnv (cmd/strata/env.go): a daemon started with it set refuses to start; add it there", name, strings.Join(found[name], ", "))
		}
	}
	if len(names) < 20 || found["STRATA_DEBUG_REPLICA_PAUSE"] == nil {
		t.Fatalf("the scan of %s found only %v", root, names)
	}
}
