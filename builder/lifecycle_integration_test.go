//go:build integration

package builder

import (
	"context"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/lifecycle"
	"github.com/strata-nix/strata/internal/testenv"
)

// notifySocket points NOTIFY_SOCKET at a real unixgram socket
// (testenv.NotifySocket), as systemd does, and returns the datagrams
// received.
func notifySocket(t *testing.T) <-chan string {
	t.Helper()
	path, ch := testenv.NotifySocket(t)
	t.Setenv("NOTIFY_SOCKET", path)
	return ch
}

// until reads messages until one equals want; it returns the lifecycle ones
// (not WATCHDOG=1, not STATUS=) seen, want included.
func until(t *testing.T, ch <-chan string, want string) []string {
	t.Helper()
	var seen []string
	deadline := time.After(30 * time.Second)
	for {
		select {
		case m := <-ch:
			if m == "WATCHDOG=1" || strings.HasPrefix(m, "STATUS=") {
				continue
			}
			if strings.HasPrefix(m, "RELOADING=1") {
				m = "RELOADING=1"
			}
			seen = append(seen, m)
			if m == want {
				return seen
			}
		case <-deadline:
			t.Fatalf("no %q; saw %q", want, seen)
		}
	}
}

// TestDaemonLifecycle drives Serve as systemd would see it: READY=1 only
// once the store dir is mounted and imported; WATCHDOG=1 while healthy; a
// rotation wedged past its limit stops the pings until it moves again;
// SIGHUP reloads the API token (RELOADING=1, READY=1); cancel sends
// STOPPING=1 and Serve returns nil.
func TestDaemonLifecycle(t *testing.T) {
	e := newEnv(t)
	e.central.Fill(t)
	g1 := e.publish(t)
	e.startServer(t)
	ch := notifySocket(t)

	tokenFile := filepath.Join(t.TempDir(), "token")
	os.WriteFile(tokenFile, []byte("first"), 0o600)
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	apiAddr := l.Addr().String()
	l.Close()
	e.cfg.TokenFile, e.cfg.APIListen = tokenFile, apiAddr

	step := lifecycle.NewStep("builder loop", 300*time.Millisecond)
	release := make(chan struct{})
	wedged := make(chan struct{})
	a := e.agent(t, func(o *Options) {
		o.Config = e.cfg
		o.Notify = lifecycle.Systemd(testLogger(t))
		o.Progress = step
		o.OnTransition = func(s State) {
			if s.Target == g1+1 && s.Phase == PhaseMounting {
				close(wedged)
				<-release
			}
		}
	})
	hup := make(chan os.Signal, 1)
	reloaded := e.cfg
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Serve(ctx, a, e.cfg, testLogger(t), DaemonOptions{Notify: lifecycle.Systemd(testLogger(t)),
			Watchdog: 20 * time.Millisecond, Hup: hup, Reload: func() (Config, error) { return reloaded, nil }})
	}()
	defer func() {
		cancel()
		<-done
	}()

	if got := until(t, ch, "READY=1"); len(got) != 1 {
		t.Fatalf("before READY=1: %q", got)
	}
	st := a.State()
	if st.Generation != g1 || !a.Ready() {
		t.Fatalf("READY=1 in state %s", st)
	}
	e.checkMounts(t, st)
	e.verify(t)
	waitPings(t, ch, 3)

	// Wedge a rotation: pings stop once it runs past the limit.
	e.central.AddText(t, "next", "next\n")
	e.publish(t)
	<-wedged
	time.Sleep(400 * time.Millisecond) // past the 300 ms limit
	drainFor(ch, 50*time.Millisecond)
	select {
	case m := <-ch:
		t.Fatalf("got %q during a wedged rotation, want silence", m)
	case <-time.After(500 * time.Millisecond):
	}
	close(release)
	waitPings(t, ch, 1)

	// SIGHUP: a new token.
	rotate := func(token string) int {
		req, _ := http.NewRequest("POST", "http://"+apiAddr+"/v1/rotate", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		return res.StatusCode
	}
	if code := rotate("first"); code != http.StatusOK {
		t.Fatalf("rotate with the first token: HTTP %d", code)
	}
	os.WriteFile(tokenFile, []byte("second"), 0o600)
	hup <- syscall.SIGHUP
	if got := until(t, ch, "READY=1"); strings.Join(got, ",") != "RELOADING=1,READY=1" {
		t.Fatalf("SIGHUP: %q", got)
	}
	if code := rotate("first"); code != http.StatusUnauthorized {
		t.Fatalf("old token after reload: HTTP %d, want 401", code)
	}
	if code := rotate("second"); code != http.StatusOK {
		t.Fatalf("new token after reload: HTTP %d, want 200", code)
	}

	cancel()
	if got := until(t, ch, "STOPPING=1"); len(got) != 1 {
		t.Fatalf("cancel: %q", got)
	}
	if err := <-done; err != nil {
		t.Fatalf("Serve after cancel: %v", err)
	}
	done <- nil
}

func waitPings(t *testing.T, ch <-chan string, n int) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for n > 0 {
		select {
		case m := <-ch:
			if m == "WATCHDOG=1" {
				n--
			}
		case <-deadline:
			t.Fatalf("%d WATCHDOG=1 pings missing", n)
		}
	}
}

func drainFor(ch <-chan string, d time.Duration) {
	deadline := time.After(d)
	for {
		select {
		case <-ch:
		case <-deadline:
			return
		}
	}
}
