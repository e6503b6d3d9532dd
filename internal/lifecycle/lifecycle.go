// Package lifecycle ties a strata daemon to its service manager (systemd's
// notify protocol, through go-systemd):
//
//   - READY=1 once the daemon serves (the daemon decides when; see Main);
//   - WATCHDOG=1 from the daemon's main loop, every half WatchdogSec, but
//     only while every health Check passes: a loop that stopped making
//     progress (a Step running past its limit, a Listener nobody accepts
//     on) withholds the pings and systemd kills and restarts the daemon;
//   - RELOADING=1, the reload, then READY=1 for SIGHUP;
//   - STOPPING=1 when the main loop ends, before the bounded graceful stop.
//
// Health is defined by progress, not by liveness of a goroutine: a Step is
// wedged when one step (a publish, a mount, an import, a rotation) runs
// longer than its limit; a Listener is wedged when no goroutine has waited
// in Accept for longer than its limit (the accept loop is stuck handing a
// connection off). Waiting for work is always healthy.
package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync/atomic"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
)

// Notifier sends one service-manager notification, such as "READY=1".
type Notifier func(state string)

// Systemd returns a Notifier that writes to $NOTIFY_SOCKET (go-systemd's
// SdNotify from the calling process, so NotifyAccess=main holds). Without
// $NOTIFY_SOCKET it does nothing.
func Systemd(log *slog.Logger) Notifier {
	return func(state string) {
		if _, err := daemon.SdNotify(false, state); err != nil {
			log.Warn("sd_notify", "state", state, "err", err)
		}
	}
}

// WatchdogInterval returns how often to send WATCHDOG=1: half of
// $WATCHDOG_USEC when systemd set it for this process, else 0 (no pings).
func WatchdogInterval() time.Duration {
	d, err := daemon.SdWatchdogEnabled(false)
	if err != nil || d <= 0 {
		return 0
	}
	return d / 2
}

// A Check reports why a part of the daemon no longer makes progress, or nil.
type Check func(now time.Time) error

// Step tracks a loop that does one bounded step at a time. It is wedged
// when a step has run longer than its limit since it began or last reported
// Progress. The zero limit never wedges.
type Step struct {
	name  string
	limit time.Duration
	since atomic.Int64 // unix nanoseconds the running step began; 0: idle
}

// NewStep returns an idle Step named name (used in the Check's error).
func NewStep(name string, limit time.Duration) *Step {
	return &Step{name: name, limit: limit}
}

// Begin marks the start of a step; End its end. A nil Step ignores both.
func (s *Step) Begin() {
	if s != nil {
		s.since.Store(time.Now().UnixNano())
	}
}

// End marks the end of the running step.
func (s *Step) End() {
	if s != nil {
		s.since.Store(0)
	}
}

// Progress says the running step is moving (bytes of a long stream
// arrived): its clock restarts, so a step is wedged only when it made no
// progress for longer than the limit. Idle or nil, it does nothing.
func (s *Step) Progress() {
	if s == nil {
		return
	}
	if since := s.since.Load(); since != 0 {
		s.since.CompareAndSwap(since, time.Now().UnixNano())
	}
}

// Check is the Step's health Check.
func (s *Step) Check(now time.Time) error {
	since := s.since.Load()
	if since == 0 || s.limit <= 0 {
		return nil
	}
	if d := now.Sub(time.Unix(0, since)); d > s.limit {
		return fmt.Errorf("%s: one step running for %s (limit %s)", s.name, d.Round(time.Second), s.limit)
	}
	return nil
}

// Listener wraps a net.Listener and watches its accept loop: the loop is
// healthy while a goroutine waits in Accept, or Accept returned less than
// limit ago (the loop is handing a connection off).
type Listener struct {
	net.Listener
	name    string
	limit   time.Duration
	waiting atomic.Int32
	left    atomic.Int64 // unix nanoseconds Accept last returned (or the wrap)
}

// WatchListener wraps l; name is used in the Check's error.
func WatchListener(l net.Listener, name string, limit time.Duration) *Listener {
	w := &Listener{Listener: l, name: name, limit: limit}
	w.left.Store(time.Now().UnixNano())
	return w
}

// Accept is the inner listener's Accept, timed.
func (l *Listener) Accept() (net.Conn, error) {
	l.waiting.Add(1)
	c, err := l.Listener.Accept()
	l.left.Store(time.Now().UnixNano())
	l.waiting.Add(-1)
	return c, err
}

// Check is the accept loop's health Check.
func (l *Listener) Check(now time.Time) error {
	if l.waiting.Load() > 0 {
		return nil
	}
	if d := now.Sub(time.Unix(0, l.left.Load())); d > l.limit {
		return fmt.Errorf("%s: no goroutine accepting for %s (limit %s)", l.name, d.Round(time.Second), l.limit)
	}
	return nil
}

// Main is a daemon's main loop once it has started: it pings the watchdog
// while healthy, reloads on SIGHUP and returns when the daemon must stop.
type Main struct {
	Notify   Notifier
	Log      *slog.Logger
	Watchdog time.Duration // WATCHDOG=1 interval; 0: no pings
	Checks   []Check
	// Hup delivers reload requests (SIGHUP); nil: none.
	Hup <-chan os.Signal
	// Reload applies what can change without a restart. An error keeps
	// the previous settings; the daemon goes on serving.
	Reload func(ctx context.Context) error
}

// Healthy runs every check and joins their errors.
func (m *Main) Healthy(now time.Time) error {
	var errs []error
	for _, c := range m.Checks {
		if err := c(now); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Run loops until ctx ends (nil) or errc delivers (that error). It does not
// send READY=1 or STOPPING=1: the daemon sends READY=1 when it serves, and
// STOPPING=1 when Run returns.
func (m *Main) Run(ctx context.Context, errc <-chan error) error {
	var tick <-chan time.Time
	if m.Watchdog > 0 {
		t := time.NewTicker(m.Watchdog)
		defer t.Stop()
		tick = t.C
		m.ping(time.Now(), nil)
	}
	var sick error
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-errc:
			return err
		case <-m.Hup:
			m.Notify(fmt.Sprintf("RELOADING=1\nMONOTONIC_USEC=%d", monotonicUsec()))
			m.Log.Info("reloading configuration (SIGHUP)")
			if m.Reload != nil {
				if err := m.Reload(ctx); err != nil {
					m.Log.Error("reload failed; keeping the previous settings", "err", err)
					m.Notify("READY=1\nSTATUS=reload failed: " + err.Error())
					continue
				}
			}
			m.Notify("READY=1")
		case now := <-tick:
			sick = m.ping(now, sick)
		}
	}
}

// ping sends WATCHDOG=1 when healthy; it logs the transitions.
func (m *Main) ping(now time.Time, wasSick error) error {
	err := m.Healthy(now)
	if err != nil {
		if wasSick == nil || wasSick.Error() != err.Error() {
			m.Log.Error("unhealthy: withholding watchdog pings", "err", err)
		}
		return err
	}
	if wasSick != nil {
		m.Log.Info("healthy again: watchdog pings resume")
	}
	m.Notify("WATCHDOG=1")
	return nil
}

// Stop runs stop (the graceful part of shutdown) and waits for it at most
// limit. It returns an error naming what did not finish in time; stop may
// still be running then, and the process is expected to exit.
func Stop(limit time.Duration, what string, stop func()) error {
	done := make(chan struct{})
	go func() { stop(); close(done) }()
	select {
	case <-done:
		return nil
	case <-time.After(limit):
		return fmt.Errorf("graceful stop: %s did not finish within %s", what, limit)
	}
}

// monotonicUsec is CLOCK_MONOTONIC in microseconds, which systemd (v253+,
// Type=notify-reload) expects next to RELOADING=1.
func monotonicUsec() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0
	}
	return ts.Nano() / 1000
}
