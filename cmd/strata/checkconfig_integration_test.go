//go:build integration

package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/strata-nix/strata/internal/testenv"
)

// `strata server --check-config` runs the checks a start runs, changing
// nothing: what it passes, a start accepts, and what a start refuses it
// reports as an ERROR, once, ending in "configuration: refused" and exit 1.
func TestServerCheckConfigMatchesStart(t *testing.T) {
	s := newSite(t)
	dir := t.TempDir()
	loose := filepath.Join(dir, "loose-token")
	if err := os.WriteFile(loose, []byte("secret\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	withToken := func(cfg, token string) string {
		b, _ := os.ReadFile(cfg)
		f := filepath.Join(t.TempDir(), "server.yaml")
		os.WriteFile(f, []byte(strings.Replace(string(b), "api:\n", "api:\n  token_file: "+token+"\n", 1)), 0o644)
		return f
	}
	refusedBoth := func(name, cfg string, want ...string) {
		t.Helper()
		out, code := runStrata(t, nil, "server", "--config", cfg, "--check-config")
		if code != 1 || !strings.Contains(out, "\nconfiguration: refused\n") || strings.Contains(out, "configuration: ok") {
			t.Errorf("%s: --check-config exit %d, want 1 ending in \"configuration: refused\":\n%s", name, code, out)
		}
		for _, w := range want {
			if n := strings.Count(out, w); n != 1 {
				t.Errorf("%s: --check-config says %q %d times, want once:\n%s", name, w, n, out)
			}
		}
		start := refused(t, cfg)
		if !strings.Contains(start, want[0]) {
			t.Errorf("%s: the start is refused for another reason than --check-config's %q:\n%s", name, want[0], start)
		}
	}

	// A token file that other users can read.
	cfg := withToken(s.config(t, nil), loose)
	refusedBoth("api.token_file 0644", cfg, "api.token_file "+loose+" has mode 0644", "chmod 600 "+loose)

	// A snapshot dir whose parent does not exist, on a filesystem that is
	// not btrfs: the start would create it there and then fail.
	missing := filepath.Join(dir, "no-such-parent", "snaps")
	refusedBoth("snapshot_dir on ext4", s.config(t, map[string]string{"snapshot_dir": missing}), "not on btrfs")
	if _, err := os.Stat(filepath.Dir(missing)); !os.IsNotExist(err) {
		t.Errorf("--check-config or the refused start created %s: %v", filepath.Dir(missing), err)
	}
	// On the store's btrfs, a missing snapshot dir is fine: a start creates it.
	out, code := runStrata(t, nil, "server", "--config", s.config(t, map[string]string{"snapshot_dir": filepath.Join(s.mnt, "new", "snaps")}), "--check-config")
	if code != 0 || !strings.Contains(out, "a start creates it") || !strings.HasSuffix(strings.TrimSpace(out), "configuration: ok") {
		t.Errorf("missing snapshot dir on btrfs: exit %d\n%s", code, out)
	}

	// A replica: its token file is replica.token_file in every message.
	rmnt := testenv.LoopBtrfs(t, "1G")
	rcfg := func(token, snaps string) string {
		f := filepath.Join(t.TempDir(), "replica.yaml")
		os.WriteFile(f, []byte(fmt.Sprintf("replica:\n  of: http://127.0.0.1:1\n  token_file: %s\nsnapshot:\n  snapshot_dir: %s\nstate_dir: %s\napi:\n  listen: \"\"\nnfs:\n  listen: 127.0.0.1:0\n",
			token, snaps, filepath.Join(t.TempDir(), "rstate"))), 0o644)
		return f
	}
	refusedBoth("replica.token_file 0644", rcfg(loose, filepath.Join(rmnt, "gens")), "replica.token_file "+loose+" has mode 0644")
	good := filepath.Join(dir, "token")
	os.WriteFile(good, []byte("secret\n"), 0o600)
	refusedBoth("replica snapshot_dir on ext4", rcfg(good, missing), "not on btrfs")
	out, code = runStrata(t, nil, "server", "--config", rcfg(good, filepath.Join(rmnt, "gens")), "--check-config")
	if code != 0 || !strings.HasSuffix(strings.TrimSpace(out), "configuration: ok") {
		t.Errorf("fresh replica: exit %d\n%s", code, out)
	}
	for _, no := range []string{"api.token_file", "store identity", "next generation id", "ERROR"} {
		if strings.Contains(out, no) {
			t.Errorf("fresh replica: --check-config says %q, which does not apply to a replica:\n%s", no, out)
		}
	}
}

// `strata builder --check-config` reads the token file a start reads; the
// start refuses it before it creates anything in state_dir.
func TestBuilderCheckConfigReadsSecrets(t *testing.T) {
	dir := t.TempDir()
	loose := filepath.Join(dir, "loose-token")
	os.WriteFile(loose, []byte("secret\n"), 0o644)
	state := filepath.Join(dir, "state")
	cfg := filepath.Join(dir, "builder.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf("server:\n  api: http://127.0.0.1:1\nstore:\n  dir: %s\nnix:\n  state_dir: %s\nstate_dir: %s\napi:\n  token_file: %s\n",
		filepath.Join(dir, "store"), filepath.Join(dir, "var"), state, loose)), 0o644)
	want := "api.token_file " + loose + " has mode 0644"
	out, code := runStrata(t, nil, "builder", "--config", cfg, "--check-config")
	if code != 1 || !strings.Contains(out, "ERROR: "+want) || !strings.Contains(out, "\nconfiguration: refused\n") || strings.Contains(out, "configuration: ok") {
		t.Errorf("builder --check-config with a 0644 token file: exit %d, want 1 and %q:\n%s", code, want, out)
	}
	// The start refuses it as a configuration error: exit 2 (the unit does
	// not restart on it).
	out, code = runStrata(t, nil, "builder", "--config", cfg)
	if code != 2 || !strings.Contains(out, want) {
		t.Errorf("builder start with a 0644 token file: exit %d, want 2 and %q:\n%s", code, want, out)
	}
	if ents, err := os.ReadDir(state); !os.IsNotExist(err) {
		t.Errorf("the refused start made state_dir %s (%d entries: %v)", state, len(ents), err)
	}
	os.Chmod(loose, 0o600)
	if out, code := runStrata(t, nil, "builder", "--config", cfg, "--check-config"); code != 0 || !strings.Contains(out, "configuration: ok") {
		t.Errorf("builder --check-config with a 0600 token file: exit %d\n%s", code, out)
	}
}

// What a start removes before anything else (a half-made snapshot of a
// publish a crash cut short; on a replica, a half-received one) is named by
// --check-config, which removes nothing; the start then removes it. (A new
// user killed a publish and a receive with -9: --check-config said nothing
// of either, then the start removed them.)
func TestCheckConfigNamesLeftovers(t *testing.T) {
	s := newSite(t)
	if err := os.MkdirAll(s.snaps, 0o755); err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(s.snaps, ".tmp-strata-3")
	testenv.Run(t, "btrfs", "subvolume", "snapshot", "-r", s.store.NixRoot(), tmp)
	cfg := s.config(t, nil)
	out, code := runStrata(t, nil, "server", "--config", cfg, "--check-config")
	if code != 0 || !strings.Contains(out, "would remove half-made snapshot "+tmp) || !strings.HasSuffix(strings.TrimSpace(out), "configuration: ok") {
		t.Errorf("--check-config with a half-made snapshot: exit %d\n%s", code, out)
	}
	if _, err := os.Lstat(tmp); err != nil {
		t.Fatalf("--check-config removed %s: %v", tmp, err)
	}
	srv := start(t, cfg, s.state, nil)
	if _, err := os.Lstat(tmp); !os.IsNotExist(err) {
		t.Errorf("the start left %s: %v", tmp, err)
	}
	srv.stop(t)

	rmnt := testenv.LoopBtrfs(t, "1G")
	gens := filepath.Join(rmnt, "gens")
	if err := os.MkdirAll(gens, 0o755); err != nil {
		t.Fatal(err)
	}
	half := filepath.Join(gens, "strata-2")
	testenv.Run(t, "btrfs", "subvolume", "create", half)
	token := filepath.Join(t.TempDir(), "token")
	os.WriteFile(token, []byte("secret\n"), 0o600)
	rstate := filepath.Join(t.TempDir(), "rstate")
	rcfg := filepath.Join(t.TempDir(), "replica.yaml")
	os.WriteFile(rcfg, []byte(fmt.Sprintf("replica:\n  of: http://127.0.0.1:1\n  token_file: %s\nsnapshot:\n  snapshot_dir: %s\nstate_dir: %s\napi:\n  listen: \"\"\nnfs:\n  listen: 127.0.0.1:0\n",
		token, gens, rstate)), 0o644)
	out, code = runStrata(t, nil, "server", "--config", rcfg, "--check-config")
	if code != 0 || !strings.Contains(out, "would remove half-received snapshot "+half) || !strings.HasSuffix(strings.TrimSpace(out), "configuration: ok") {
		t.Errorf("replica --check-config with a half-received snapshot: exit %d\n%s", code, out)
	}
	if _, err := os.Lstat(half); err != nil {
		t.Fatalf("--check-config removed %s: %v", half, err)
	}
	repl := start(t, rcfg, rstate, nil)
	if _, err := os.Lstat(half); !os.IsNotExist(err) {
		t.Errorf("the replica's start left %s: %v", half, err)
	}
	repl.stop(t)
}

// `strata builder --check-config` asks server.api, changing nothing: a
// server that answers and admits this host says so; one whose nfs.allow
// leaves this host out, or of another store dir, or that does not answer,
// is a WARNING (the start goes ahead and waits). A new user's builder
// check said "configuration: ok" whatever server.api and nfs.allow were.
func TestBuilderCheckConfigAsksServer(t *testing.T) {
	s := newSite(t)
	addr := freePort(t)
	cfg := s.config(t, map[string]string{"api.listen": addr, "nfs.allow": "10.0.0.0/8"})
	srv := start(t, cfg, s.state, nil)
	srv.waitLog(t, "published generation")
	dir := t.TempDir()
	bcfg := func(api, storeDir string) string {
		f := filepath.Join(t.TempDir(), "builder.yaml")
		os.WriteFile(f, []byte(fmt.Sprintf("server:\n  api: %s\nstore:\n  dir: %s\nnix:\n  state_dir: %s\nstate_dir: %s\napi:\n  token_file: \"\"\n",
			api, storeDir, filepath.Join(dir, "var"), filepath.Join(dir, "state"))), 0o644)
		return f
	}
	check := func(name, cfg string, want ...string) {
		t.Helper()
		out, code := runStrata(t, nil, "builder", "--config", cfg, "--check-config")
		if code != 0 || !strings.HasSuffix(strings.TrimSpace(out), "configuration: ok") {
			t.Errorf("%s: exit %d, want 0 and ok\n%s", name, code, out)
		}
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Errorf("%s: output lacks %q\n%s", name, w, out)
			}
		}
	}
	api := "http://" + addr
	check("nfs.allow leaves this host out", bcfg(api, "/nix/store"), "server "+api+" answers: 1 live generations, newest 1",
		"WARNING: server "+api+" refuses NFS connections from this host: it sees this host as 127.0.0.1, which is not in its nfs.allow [10.0.0.0/8]")
	check("another store dir", bcfg(api, "/gnu/store"), "WARNING: server "+api+" serves generations of store dir /nix/store, but this builder's store.dir is /gnu/store")
	srv.stop(t)
	srv = start(t, s.config(t, map[string]string{"api.listen": addr}), s.state, nil)
	check("admitted", bcfg(api, "/nix/store"), "server "+api+"'s nfs.allow [127.0.0.0/8] admits this host (127.0.0.1)")
	srv.stop(t)
	check("no answer", bcfg(api, "/nix/store"), "WARNING: server.api "+api+" does not answer now")
	if _, err := os.Stat(filepath.Join(dir, "state")); !os.IsNotExist(err) {
		t.Errorf("--check-config made the builder's state_dir: %v", err)
	}
}
