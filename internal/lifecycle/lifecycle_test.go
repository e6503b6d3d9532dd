package lifecycle

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

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

// next returns the next datagram that is not a WATCHDOG=1 ping, counting
// the pings skipped.
func next(t *testing.T, ch <-chan string, pings *int) string {
	t.Helper()
	for {
		select {
		case m := <-ch:
			if m == "WATCHDOG=1" {
				*pings++
				continue
			}
			return m
		case <-time.After(10 * time.Second):
			t.Fatal("no sd_notify message within 10 s")
		}
	}
}

func TestMainPingsReloadsAndReturns(t *testing.T) {
	ch := notifySocket(t)
	hup := make(chan os.Signal, 1)
	reloadErr := error(nil)
	reloads := 0
	m := Main{Notify: Systemd(slog.Default()), Log: slog.Default(), Watchdog: 20 * time.Millisecond, Hup: hup,
		Reload: func(context.Context) error { reloads++; return reloadErr }}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx, nil) }()

	pings := 0
	for pings < 3 {
		if m := <-ch; m == "WATCHDOG=1" {
			pings++
		} else {
			t.Fatalf("unexpected %q before any reload", m)
		}
	}
	hup <- syscall.SIGHUP
	if got := next(t, ch, &pings); !strings.HasPrefix(got, "RELOADING=1\nMONOTONIC_USEC=") {
		t.Fatalf("after SIGHUP got %q, want RELOADING=1 with MONOTONIC_USEC", got)
	}
	if got := next(t, ch, &pings); got != "READY=1" {
		t.Fatalf("after reload got %q, want READY=1", got)
	}
	reloadErr = errors.New("config: key \"nfs.allow\": bad")
	hup <- syscall.SIGHUP
	next(t, ch, &pings) // RELOADING=1
	if got := next(t, ch, &pings); got != "READY=1\nSTATUS=reload failed: config: key \"nfs.allow\": bad" {
		t.Fatalf("after a failed reload got %q", got)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run after cancel: %v", err)
	}
	if reloads != 2 {
		t.Fatalf("%d reloads, want 2", reloads)
	}
}

// A step that runs past its limit stops the pings; they resume when it ends.
func TestWedgedStepWithholdsPings(t *testing.T) {
	ch := notifySocket(t)
	step := NewStep("publish loop", 50*time.Millisecond)
	m := Main{Notify: Systemd(slog.Default()), Log: slog.Default(), Watchdog: 10 * time.Millisecond, Checks: []Check{step.Check}}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx, errc) }()

	<-ch // healthy: a ping
	step.Begin()
	time.Sleep(60 * time.Millisecond) // now past the limit
	if err := step.Check(time.Now()); err == nil || !strings.Contains(err.Error(), "publish loop: one step running for") {
		t.Fatalf("wedged step check: %v", err)
	}
	drain(ch)
	select {
	case m := <-ch:
		t.Fatalf("got %q while the step is wedged, want no ping", m)
	case <-time.After(200 * time.Millisecond):
	}
	step.End()
	select {
	case m := <-ch:
		if m != "WATCHDOG=1" {
			t.Fatalf("got %q, want pings to resume", m)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("pings did not resume after the step ended")
	}
	errc <- errors.New("serve api: closed")
	if err := <-done; err == nil || err.Error() != "serve api: closed" {
		t.Fatalf("Run returned %v, want the serving error", err)
	}
}

// drain empties ch of what is already queued (pings sent before the step
// wedged, up to one interval late).
func drain(ch <-chan string) {
	deadline := time.After(30 * time.Millisecond)
	for {
		select {
		case <-ch:
		case <-deadline:
			return
		}
	}
}

// The accept loop is healthy while someone waits in Accept, and wedged once
// nobody has for longer than the limit.
func TestListenerCheck(t *testing.T) {
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := WatchListener(raw, "nfs accept loop", time.Second)
	defer l.Close()
	now := time.Now()
	if err := l.Check(now); err != nil {
		t.Fatalf("fresh listener: %v", err)
	}
	if err := l.Check(now.Add(2 * time.Second)); err == nil || !strings.Contains(err.Error(), "nfs accept loop: no goroutine accepting") {
		t.Fatalf("listener nobody accepts on: %v", err)
	}
	accepted := make(chan net.Conn)
	go func() {
		c, err := l.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	for l.waiting.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	if err := l.Check(time.Now().Add(time.Hour)); err != nil {
		t.Fatalf("while waiting in Accept: %v", err)
	}
	c, err := net.Dial("tcp", raw.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sc := <-accepted
	defer sc.Close()
	if err := l.Check(time.Now()); err != nil {
		t.Fatalf("just after Accept returned: %v", err)
	}
	if err := l.Check(time.Now().Add(2 * time.Second)); err == nil {
		t.Fatal("accept loop stuck handing off a connection counts as healthy")
	}
	if _, ok := sc.(*net.TCPConn); !ok {
		t.Fatalf("Accept returned %T, want the inner *net.TCPConn", sc)
	}
}

func TestStopIsBounded(t *testing.T) {
	if err := Stop(time.Second, "x", func() {}); err != nil {
		t.Fatal(err)
	}
	block := make(chan struct{})
	defer close(block)
	err := Stop(50*time.Millisecond, "publish loop", func() { <-block })
	if err == nil || err.Error() != "graceful stop: publish loop did not finish within 50ms" {
		t.Fatalf("Stop of a hung part: %v", err)
	}
}

// A step that reports progress is wedged only when it made none for longer
// than the limit, however long it runs.
func TestStepProgress(t *testing.T) {
	step := NewStep("replica sync", time.Minute)
	step.Progress() // idle: nothing to move
	if err := step.Check(time.Now().Add(time.Hour)); err != nil {
		t.Fatalf("idle step: %v", err)
	}
	step.Begin()
	if err := step.Check(time.Now().Add(2 * time.Minute)); err == nil {
		t.Fatal("a step without progress for twice its limit is not wedged")
	}
	time.Sleep(10 * time.Millisecond)
	began := time.Now()
	step.Progress()
	if err := step.Check(began.Add(50 * time.Second)); err != nil {
		t.Fatalf("50 s after its last progress (limit 1m): %v", err)
	}
	if err := step.Check(began.Add(2 * time.Minute)); err == nil {
		t.Fatal("2 min after its last progress (limit 1m): not wedged")
	}
	step.End()
	step.Progress()
	if err := step.Check(time.Now().Add(time.Hour)); err != nil {
		t.Fatalf("ended step: %v", err)
	}
}
