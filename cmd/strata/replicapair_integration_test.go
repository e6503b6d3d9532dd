//go:build integration

package main

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// primaryProc is a primary `strata server` with its API on TCP and a token
// file, as a replica reaches it.
type primaryProc struct {
	*daemonProc
	cfg   string // its config file (to restart it)
	addr  string // API host:port
	token string // token file, also the replica's replica.token_file
}

// startPrimary starts the real `strata server` on site s as a primary (API
// on a free port, token "primary-secret") and waits for its first publish.
func startPrimary(t *testing.T, s *site) *primaryProc {
	t.Helper()
	p := &primaryProc{addr: freePort(t), token: filepath.Join(t.TempDir(), "token")}
	if err := os.WriteFile(p.token, []byte("primary-secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p.cfg = s.config(t, map[string]string{"api.listen": p.addr, "api.token_file": p.token})
	p.daemonProc = start(t, p.cfg, s.state, nil)
	p.waitLog(t, "published generation")
	return p
}

// restart starts the primary again (after a kill or stop) with args.
func (p *primaryProc) restart(t *testing.T, s *site, args ...string) {
	t.Helper()
	p.daemonProc = start(t, p.cfg, s.state, nil, args...)
}

// replica is the config of a replica of a primaryProc: what tests vary.
type replica struct {
	snaps, state string // snapshot.snapshot_dir, state_dir
	of           string // replica.of host:port; default the primary's API
	interval     string // replica.interval; default 1s
	token        string // replica.token_file; default the primary's token
	listen       string // api.listen (with the primary's token); default none
	keep         int    // retention.keep; default the server's
}

// replicaConfig writes the config of replica r of p and returns its path.
func (p *primaryProc) replicaConfig(t *testing.T, r replica) string {
	t.Helper()
	if r.of == "" {
		r.of = p.addr
	}
	if r.interval == "" {
		r.interval = "1s"
	}
	if r.token == "" {
		r.token = p.token
	}
	api := "api:\n  listen: \"\"\n"
	if r.listen != "" {
		api = fmt.Sprintf("api:\n  listen: %s\n  token_file: %s\n", r.listen, p.token)
	}
	yaml := fmt.Sprintf("replica:\n  of: http://%s\n  token_file: %s\n  interval: %s\nsnapshot:\n  snapshot_dir: %s\nstate_dir: %s\n%snfs:\n  listen: 127.0.0.1:0\n",
		r.of, r.token, r.interval, r.snaps, r.state, api)
	if r.keep != 0 {
		yaml += fmt.Sprintf("retention:\n  keep: %d\n", r.keep)
	}
	f := filepath.Join(t.TempDir(), "replica.yaml")
	if err := os.WriteFile(f, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	return f
}
