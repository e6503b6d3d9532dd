//go:build integration

package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/nfsraw"
	"github.com/strata-nix/strata/internal/testenv"
)

// freePort returns a TCP address on loopback nobody listens on, for a
// strata child to bind (testenv.ChildAddr).
func freePort(t *testing.T) string {
	t.Helper()
	return testenv.ChildAddr(t)
}

// lifecycleMsgs reads sd_notify messages until want (exact) arrives and
// returns the lifecycle ones seen on the way (READY, RELOADING, STOPPING;
// STATUS and WATCHDOG are counted apart).
func lifecycleMsgs(t *testing.T, ch <-chan string, want string, pings *int) []string {
	t.Helper()
	var seen []string
	deadline := time.After(60 * time.Second)
	for {
		select {
		case m := <-ch:
			switch {
			case m == "WATCHDOG=1":
				*pings++
				continue
			case strings.HasPrefix(m, "STATUS="):
				continue
			case strings.HasPrefix(m, "RELOADING=1"):
				m = "RELOADING=1"
			}
			seen = append(seen, m)
			if m == want {
				return seen
			}
		case <-deadline:
			t.Fatalf("no %q from sd_notify; saw %q", want, seen)
		}
	}
}

// TestServerDaemonLifecycle runs the real `strata server` as systemd would
// (NOTIFY_SOCKET, WATCHDOG_USEC) on a btrfs central store: READY=1 only
// once the API answers and every live generation is mountable; WATCHDOG=1
// pings; SIGHUP reloads nfs.allow and the API token without a restart
// (RELOADING=1, READY=1); SIGTERM sends STOPPING=1 and exits 0.
func TestServerDaemonLifecycle(t *testing.T) {
	testenv.RequireRoot(t)
	s := newSite(t)
	dir := t.TempDir()
	state := s.state
	tokenFile := filepath.Join(dir, "token")
	os.WriteFile(tokenFile, []byte("first\n"), 0o600)
	nfsAddr, apiAddr := freePort(t), freePort(t)
	cfg := filepath.Join(dir, "server.yaml") // one file: SIGHUP reads it again
	writeCfg := func(allow string) {
		b, err := os.ReadFile(s.config(t, map[string]string{"api.listen": apiAddr, "api.token_file": tokenFile,
			"nfs.listen": nfsAddr, "nfs.allow": allow}))
		if err == nil {
			err = os.WriteFile(cfg, b, 0o644)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	writeCfg("127.0.0.0/8")
	start := func() (*exec.Cmd, <-chan string) {
		sock, ch := testenv.NotifySocket(t)
		cmd := exec.Command(os.Args[0], "server", "--config", cfg)
		cmd.Env = append(os.Environ(), "STRATA_TEST_RUN_MAIN=1", "NOTIFY_SOCKET="+sock, "WATCHDOG_USEC=400000")
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd, ch
	}
	mountGen1 := func() (uint32, error) {
		c, err := nfsraw.Dial(nfsAddr)
		if err != nil {
			return 0, err
		}
		defer c.Close()
		c.SetTimeout(5 * time.Second)
		status, _, err := c.Mount("/gen/1")
		return status, err
	}
	publish := func(token string) int {
		req, _ := http.NewRequest("POST", "http://"+apiAddr+"/v1/publish", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("publish over TCP: %v", err)
		}
		res.Body.Close()
		return res.StatusCode
	}

	// First start publishes generation 1; stop it.
	cmd, ch := start()
	pings := 0
	lifecycleMsgs(t, ch, "READY=1", &pings)
	waitFor(t, ch, "STATUS=serving generation 1")
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("exit after SIGTERM: %v", err)
	}

	// Second start: at READY=1 (read before anything else is tried) the API
	// answers and generation 1 is already mountable.
	cmd, ch = start()
	pings = 0
	if got := lifecycleMsgs(t, ch, "READY=1", &pings); len(got) != 1 {
		t.Fatalf("before READY=1: %q", got)
	}
	if out, code := runStrata(t, nil, "status", "--api", "unix:"+filepath.Join(state, "api.sock")); code != 0 || !strings.Contains(out, "server") {
		t.Fatalf("status at READY: exit %d %q", code, out)
	}
	if status, err := mountGen1(); err != nil || status != 0 {
		t.Fatalf("MOUNT /gen/1 at READY: status %d, %v", status, err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for pings < 3 && time.Now().Before(deadline) {
		select {
		case m := <-ch:
			if m == "WATCHDOG=1" {
				pings++
			}
		case <-time.After(time.Second):
		}
	}
	if pings < 3 {
		t.Fatalf("%d WATCHDOG=1 pings in 30 s with WATCHDOG_USEC=400000, want at least 3", pings)
	}
	if code := publish("first"); code != http.StatusOK {
		t.Fatalf("publish with the first token: HTTP %d", code)
	}

	access := func() string {
		a, err := api.NewClient("http://"+apiAddr, "").NFSAccess(context.Background())
		if err != nil {
			t.Fatalf("GET /v1/nfs/access: %v", err)
		}
		return fmt.Sprintf("allowed=%v allow=%v", a.Allowed, a.Allow)
	}
	if got := access(); got != "allowed=true allow=[127.0.0.0/8]" {
		t.Errorf("GET /v1/nfs/access from 127.0.0.1: %s, want allowed=true allow=[127.0.0.0/8]", got)
	}

	// SIGHUP: a new token and an allowlist without loopback.
	os.WriteFile(tokenFile, []byte("second\n"), 0o600)
	writeCfg("10.99.0.0/16")
	cmd.Process.Signal(syscall.SIGHUP)
	if got := lifecycleMsgs(t, ch, "READY=1", &pings); strings.Join(got, ",") != "RELOADING=1,READY=1" {
		t.Fatalf("SIGHUP: got %q, want RELOADING=1 then READY=1", got)
	}
	if code := publish("first"); code != http.StatusUnauthorized {
		t.Fatalf("publish with the old token after reload: HTTP %d, want 401", code)
	}
	if code := publish("second"); code != http.StatusOK {
		t.Fatalf("publish with the new token after reload: HTTP %d, want 200", code)
	}
	if status, err := mountGen1(); err == nil {
		t.Fatalf("MOUNT from 127.0.0.1 after nfs.allow dropped loopback: status %d, want the connection refused", status)
	}
	// GET /v1/nfs/access, which a builder asks before it mounts, says the
	// same (before, it answered with the start's list: allowed).
	if got := access(); got != "allowed=false allow=[10.99.0.0/16]" {
		t.Errorf("GET /v1/nfs/access from 127.0.0.1 after nfs.allow dropped loopback: %s, want allowed=false allow=[10.99.0.0/16]", got)
	}
	// A broken config on SIGHUP keeps the previous settings and serving.
	writeCfg("not-a-cidr") // the whole config, only nfs.allow wrong
	cmd.Process.Signal(syscall.SIGHUP)
	if got := lifecycleMsgs(t, ch, "READY=1\nSTATUS=reload failed: config: key \"nfs.allow\" (from file): value \"not-a-cidr\": want a CIDR such as 10.0.0.0/8", &pings); len(got) != 2 {
		t.Fatalf("failed reload: %q", got)
	}
	if code := publish("second"); code != http.StatusOK {
		t.Fatalf("publish after a failed reload: HTTP %d, want 200 (token kept)", code)
	}
	if got := access(); got != "allowed=false allow=[10.99.0.0/16]" {
		t.Errorf("GET /v1/nfs/access after a failed reload: %s, want the list kept: allowed=false allow=[10.99.0.0/16]", got)
	}

	cmd.Process.Signal(syscall.SIGTERM)
	if got := lifecycleMsgs(t, ch, "STOPPING=1", &pings); len(got) != 1 {
		t.Fatalf("SIGTERM: %q before STOPPING=1", got)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("exit after SIGTERM: %v", err)
	}
	if cmd.Process.Pid != cmd.ProcessState.Pid() {
		t.Fatal("restarted")
	}
}
