//go:build integration

package main

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/testenv"
)

func waitFor(t *testing.T, ch <-chan string, want string) {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		select {
		case m := <-ch:
			if strings.Contains(m, want) {
				return
			}
		case <-deadline:
			t.Fatalf("no %q from sd_notify", want)
		}
	}
}

// TestServerDaemon runs the real `strata server` on a btrfs central store:
// sd_notify READY/STATUS/STOPPING, the CLI against its socket, and a restart
// that serves the same generations.
func TestServerDaemon(t *testing.T) {
	s := newSite(t)
	st, state, cfg := s.store, s.state, s.config(t, nil)

	start := func() (*exec.Cmd, <-chan string) {
		sock, ch := testenv.NotifySocket(t)
		cmd := exec.Command(os.Args[0], "server", "--config", cfg)
		cmd.Env = append(os.Environ(), "STRATA_TEST_RUN_MAIN=1", "NOTIFY_SOCKET="+sock)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		waitFor(t, ch, "READY=1")
		return cmd, ch
	}
	// A token file others can read: refused before anything starts.
	tok := filepath.Join(t.TempDir(), "token")
	os.WriteFile(tok, []byte("secret\n"), 0o644)
	if out, code := runStrata(t, nil, "server", "--config", cfg, "--api-token-file", tok); code == 0 || !strings.Contains(out, tok) || !strings.Contains(out, "chmod 600") {
		t.Fatalf("server with a 0644 token file: exit %d %q; want a refusal naming the file and chmod 600", code, out)
	}

	cmd, ch := start()
	// Every STATUS= the first run sends, in order: systemctl status shows
	// the latest, and each publish should change it once.
	var statuses []string
	waitStatus := func(want string) {
		t.Helper()
		deadline := time.After(30 * time.Second)
		for {
			select {
			case m := <-ch:
				if strings.HasPrefix(m, "STATUS=") {
					statuses = append(statuses, m)
				}
				if strings.Contains(m, want) {
					return
				}
			case <-deadline:
				t.Fatalf("no %q from sd_notify; STATUS= so far %q", want, statuses)
			}
		}
	}
	waitStatus("STATUS=serving generation 1")

	apiAddr := "unix:" + filepath.Join(state, "api.sock")
	// A second server on the same state dir fails clearly; the first one's
	// socket keeps working.
	if out, code := runStrata(t, nil, "server", "--config", cfg); code == 0 || !strings.Contains(out, "api.sock") || !strings.Contains(out, "running daemon") {
		t.Fatalf("second server on the same state dir: exit %d %q", code, out)
	}
	if fi, err := os.Stat(state); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("state dir: %v %v, want mode 0700", fi, err)
	}
	out, code := runStrata(t, nil, "generations", "--json", "--api", apiAddr)
	var l api.GenerationList
	if code != 0 || json.Unmarshal([]byte(out), &l) != nil || len(l.Generations) != 1 || l.Generations[0].ID != 1 {
		t.Fatalf("generations: exit %d %q", code, out)
	}
	st.AddText(t, "new", "new path\n")
	if out, code := runStrata(t, nil, "publish", "--api", apiAddr); code != 0 || !strings.Contains(out, "published generation 2") {
		t.Fatalf("publish: exit %d %q", code, out)
	}
	// systemctl status follows every publish, not only the first.
	waitStatus("STATUS=serving generation 2")
	// strata registration N prints the dump-db text nix-store prints;
	// strata paths N --from M the added rows as JSON lines.
	if out, code := runStrata(t, nil, "registration", "2", "--api", apiAddr); code != 0 || out != st.DumpDB(t) {
		t.Fatalf("registration 2: exit %d\n%s\nwant (nix-store --dump-db)\n%s", code, out, st.DumpDB(t))
	}
	if out, code := runStrata(t, nil, "paths", "2", "--from", "1", "--api", apiAddr); code != 0 ||
		strings.Count(out, "\n") != 2 || !strings.Contains(out, `"format":"strata-rows"`) || !strings.Contains(out, `-new","nar_hash":"`) {
		t.Fatalf("paths 2 --from 1: exit %d\n%s", code, out)
	}
	if out, code := runStrata(t, nil, "paths", "9", "--api", apiAddr); code == 0 || !strings.Contains(out, "no such generation") {
		t.Fatalf("paths 9: exit %d %q", code, out)
	}
	// Without cluster.*, strata members and strata cluster keys say gossip
	// is off (before: "404 page not found").
	for _, args := range [][]string{{"members"}, {"cluster", "keys"}} {
		if out, code := runStrata(t, nil, append(args, "--api", apiAddr)...); code != 1 || !strings.Contains(out, "gossip is off on this daemon") {
			t.Errorf("strata %s without gossip: exit %d %q, want exit 1 saying gossip is off", strings.Join(args, " "), code, out)
		}
	}
	// Review 19 #8: a name a label cannot hold is bad input (400, the
	// rule named), not a server error (was 500); the pin is not made.
	if out, code := runStrata(t, nil, "pin", "1", "--name", "two\nlines", "--api", apiAddr); code == 0 ||
		!strings.Contains(out, "(400 Bad Request)") || !strings.Contains(out, "without NUL, newline or tab") {
		t.Fatalf("pin with a newline in the name: exit %d %q, want a 400 naming the rule", code, out)
	}
	if out, code := runStrata(t, nil, "pin", "1", "--name", "keep", "--api", apiAddr); code != 0 {
		t.Fatalf("pin: exit %d %q", code, out)
	}

	cmd.Process.Signal(syscall.SIGTERM)
	waitStatus("STOPPING=1")
	if err := cmd.Wait(); err != nil {
		t.Fatalf("server exit after SIGTERM: %v", err)
	}
	// Once per publish: the start's publish sent its STATUS= twice.
	if want := []string{"STATUS=no generation yet", "STATUS=serving generation 1", "STATUS=serving generation 2"}; !slices.Equal(statuses, want) {
		t.Errorf("STATUS= messages %q, want %q", statuses, want)
	}

	start()
	c := api.NewClient(apiAddr, "")
	l, err := c.Generations(context.Background())
	if err != nil || len(l.Generations) != 2 || !l.Generations[0].Pinned || l.Generations[0].PinName != "keep" {
		t.Fatalf("after restart: %+v %v", l, err)
	}
}
