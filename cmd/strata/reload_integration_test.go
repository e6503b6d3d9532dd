//go:build integration

package main

import (
	"os"
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
