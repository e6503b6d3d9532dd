//go:build integration

package main

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
)

// Review 19 #5 and #7: lowering retention.keep on SIGHUP waited for the
// next publish to destroy anything, and the reload named Go fields
// ("PublishInterval", "Keep") as needing a restart. Must show: after the
// reload, without a publish, only the newest generation is left (served,
// on disk, in the state dir); the log names the key that needs a restart
// by its config key, and not retention.keep (it applied).
func TestReloadAppliesRetentionKeep(t *testing.T) {
	s := newSite(t)
	cfg := s.config(t, map[string]string{"keep": "3"})
	srv := start(t, cfg, s.state, nil)
	srv.waitLog(t, "published generation")
	publishOne(t, s, srv, "second")
	publishOne(t, s, srv, "third")
	srv.waitServes(t, 1, 2, 3)

	b, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	y := strings.Replace(string(b), "keep: 3", "keep: 1", 1)
	y = strings.Replace(y, "interval: 0s", "interval: 1h", 1)
	if y == string(b) || strings.Count(y, "keep: 1")+strings.Count(y, "interval: 1h") != 2 {
		t.Fatalf("config layout changed:\n%s", b)
	}
	if err := os.WriteFile(cfg, []byte(y), 0o644); err != nil {
		t.Fatal(err)
	}
	srv.cmd.Process.Signal(syscall.SIGHUP)
	srv.waitLog(t, "msg=reloaded")
	srv.waitServes(t, 3)
	srv.waitLog(t, "retention destroyed generation\" generation=2")
	if got := s.snapshots(t); !slices.Equal(got, []string{"strata-3"}) {
		t.Errorf("after the reload: snapshots %v, want [strata-3]", got)
	}
	if got := manifests(t, s.state); !slices.Equal(got, []string{"3"}) {
		t.Errorf("after the reload: manifests %v, want [3]", got)
	}
	logs := srv.logs.String()
	if !strings.Contains(logs, `msg="reload: some changed keys take effect only after a restart" changed=[publish.interval]`) {
		t.Errorf("the reload does not name publish.interval (alone) as needing a restart:\n%s", logs)
	}
	if !strings.Contains(logs, "retention.keep=1") {
		t.Errorf("the reload does not say retention.keep=1 took effect:\n%s", logs)
	}
	out, code := runStrata(t, nil, "status", "--json", "--api", srv.api)
	if code != 0 || !strings.Contains(out, `"retention_keep": 1`) {
		t.Errorf("status after the reload: exit %d, want retention_keep 1:\n%s", code, out)
	}
	srv.stop(t)
}

// SIGHUP re-reads a replica's replica.token_file (before, only a restart
// did): after the primary's API token was rotated and the replica's token
// file updated, `systemctl reload` of the replica makes its next sync use
// the new token. A token file that is missing, empty or readable by others
// at a reload is refused with an error naming the file, and the replica
// goes on with the token it had (it keeps receiving from the primary).
func TestReloadReplicaToken(t *testing.T) {
	s := newSite(t)
	prim := startPrimary(t, s) // generation 1, token "primary-secret"
	rtok := filepath.Join(t.TempDir(), "replica-token")
	writeToken := func(file, tok string) {
		t.Helper()
		if err := os.WriteFile(file, []byte(tok), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(file, 0o600); err != nil { // WriteFile keeps an existing file's mode
			t.Fatal(err)
		}
	}
	writeToken(rtok, "primary-secret\n")
	rstate := filepath.Join(t.TempDir(), "rstate")
	cfg := prim.replicaConfig(t, replica{snaps: filepath.Join(s.mnt, "replica"), state: rstate, token: rtok})
	repl := start(t, cfg, rstate, nil)
	repl.waitServes(t, 1)

	reloads := 0
	reload := func(d *daemonProc) {
		t.Helper()
		reloads++
		d.cmd.Process.Signal(syscall.SIGHUP)
		d.waitLogCount(t, "reloading configuration (SIGHUP)", reloads)
	}
	bad := []struct {
		what string
		set  func()
	}{
		{"missing", func() { os.Remove(rtok) }},
		{"empty", func() { writeToken(rtok, "") }},
		{"readable by others", func() { writeToken(rtok, "primary-secret\n"); os.Chmod(rtok, 0o644) }},
	}
	for i, b := range bad {
		b.set()
		reload(repl)
		repl.waitLogCount(t, "reload failed; keeping the previous settings", i+1)
		lines := grepLines(repl.logs.String(), "reload failed")
		if last := lines[len(lines)-1]; !strings.Contains(last, "replica.token_file "+rtok) {
			t.Errorf("reload with a replica.token_file that is %s: %s, want an error naming replica.token_file %s", b.what, last, rtok)
		}
	}
	// The token it had still works: the replica receives what the primary
	// publishes.
	g2 := publishOne(t, s, prim.daemonProc, "second")
	repl.waitServes(t, 1, g2)

	// The operator rotates the primary's token: the replica's syncs are
	// refused until its token file has the new one and it is reloaded.
	writeToken(prim.token, "rotated-secret\n")
	prim.cmd.Process.Signal(syscall.SIGHUP)
	prim.waitLog(t, "msg=reloaded")
	repl.waitLog(t, "check replica.token_file")
	writeToken(rtok, "rotated-secret\n")
	reload(repl)
	repl.waitLog(t, `msg="reload: replica.token_file holds a new token; the next sync sends it" replica.token_file=`+rtok)
	g3 := publishOne(t, s, prim.daemonProc, "third")
	repl.waitServes(t, 1, g2, g3)
	repl.waitLog(t, "replica sync works again")
	logs := repl.logs.String()
	if strings.Contains(logs, "take effect only after a restart") {
		t.Errorf("the replica's reload names keys as needing a restart:\n%s", logs)
	}
	if !strings.Contains(logs, "replica.token_file="+rtok) || !strings.Contains(grepLines(logs, "msg=reloaded")[0], "replica.token_file="+rtok) {
		t.Errorf("the replica's reload does not name replica.token_file:\n%s", logs)
	}
	repl.stop(t)
	prim.stop(t)
}

// grepLines returns the lines of text that contain s.
func grepLines(text, s string) []string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, s) {
			out = append(out, l)
		}
	}
	return out
}
