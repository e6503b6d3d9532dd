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
	dir := t.TempDir()
	p := &primaryProc{cfg: filepath.Join(dir, "primary.yaml"), addr: freePort(t), token: filepath.Join(dir, "token")}
	if err := os.WriteFile(p.token, []byte("primary-secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p.cfg, []byte(fmt.Sprintf("store:\n  root: %s\nsnapshot:\n  snapshot_dir: %s\nstate_dir: %s\npublish:\n  interval: 0s\napi:\n  listen: %s\n  token_file: %s\nnfs:\n  listen: 127.0.0.1:0\n",
		s.store.NixRoot(), s.snaps, s.state, p.addr, p.token)), 0o644); err != nil {
		t.Fatal(err)
	}
	p.daemonProc = start(t, p.cfg, s.state, nil)
	p.waitLog(t, "published generation")
	return p
}

// restart starts the primary again (after a kill or stop).
func (p *primaryProc) restart(t *testing.T, s *site) {
	t.Helper()
	p.daemonProc = start(t, p.cfg, s.state, nil)
}

// replicaConfig writes the config of a replica that pulls from the API at
// of (host:port) every interval into snaps, with state dir state, and
// returns its path.
func (p *primaryProc) replicaConfig(t *testing.T, of, snaps, state, interval string) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "replica.yaml")
	if err := os.WriteFile(f, []byte(fmt.Sprintf("replica:\n  of: http://%s\n  token_file: %s\n  interval: %s\nsnapshot:\n  snapshot_dir: %s\nstate_dir: %s\napi:\n  listen: \"\"\nnfs:\n  listen: 127.0.0.1:0\n",
		of, p.token, interval, snaps, state)), 0o644); err != nil {
		t.Fatal(err)
	}
	return f
}
