//go:build integration

package main

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// Review 18 #12: a missing api.token_file with an API reachable from other
// hosts was accepted silently, and a wrong token got the same 401 text as
// none, naming the server's key. Must show: --check-config and the start
// warn (naming the key, the file and api.listen) and still start; a
// publish over TCP is refused saying the server has no token; with the
// token there (SIGHUP), no token sent and a wrong token get different
// answers, neither naming a key of the caller's side; the right one works.
func TestAPITokenMissingOrWrong(t *testing.T) {
	s := newSite(t)
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "api-tokn") // mistyped: not there
	port := freePort(t)
	_, p, _ := strings.Cut(port, ":")
	cfg := s.config(t, map[string]string{"api.listen": "0.0.0.0:" + p, "api.token_file": tokenFile})
	warn := "api.token_file " + tokenFile + " is missing or empty, but api.listen 0.0.0.0:" + p + " is reachable from other hosts"
	out, code := runStrata(t, nil, "server", "--config", cfg, "--check-config")
	if code != 0 || !strings.Contains(out, "WARNING: "+warn) || !strings.Contains(out, "\nconfiguration: ok\n") {
		t.Errorf("--check-config without the token file: exit %d, want 0 with a warning %q\n%s", code, warn, out)
	}
	srv := start(t, cfg, s.state, nil)
	srv.waitLog(t, "published generation")
	if !strings.Contains(srv.logs.String(), "level=WARN msg=\"no API token\"") || !strings.Contains(srv.logs.String(), warn) {
		t.Errorf("start without the token file did not warn %q", warn)
	}
	api := "http://" + port
	publish := func(token string) string {
		t.Helper()
		f := filepath.Join(t.TempDir(), "tok") // empty: no token sent
		os.WriteFile(f, []byte(token+"\n"), 0o600)
		out, _ := runStrata(t, nil, "publish", "--api", api, "--token-file", f)
		return out
	}
	if out := publish("anything"); !strings.Contains(out, "this daemon has no API token") {
		t.Errorf("publish against a server without a token: %s", out)
	}
	os.WriteFile(tokenFile, []byte("right\n"), 0o600)
	srv.cmd.Process.Signal(syscall.SIGHUP)
	srv.waitLog(t, "reloaded")
	for token, want := range map[string]string{"": "no bearer token sent", "wrong": "the bearer token sent is not this daemon's API token"} {
		out := publish(token)
		if !strings.Contains(out, want) || strings.Contains(out, "token_file") {
			t.Errorf("publish with token %q: want %q and no key name:\n%s", token, want, out)
		}
	}
	if out := publish("right"); strings.Contains(out, "refused") {
		t.Errorf("publish with the right token: %s", out)
	}
	srv.stop(t)
}
