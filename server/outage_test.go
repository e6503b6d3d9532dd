package server

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// A primary that stays down for an hour, with a sync every second, gives
// one error line per distinct error and one every outageRepeat, and one
// line when syncs work again.
func TestReplicaOutageLogsOnce(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	var o outage
	start := time.Now()
	down := errors.New("ask primary: connection refused")
	for s := 0; s < 3600; s++ {
		err := down
		if s >= 1800 && s < 1810 {
			err = errors.New("receive generation 4: stream broken")
		}
		o.failed(start.Add(time.Duration(s)*time.Second), err, log)
	}
	o.ok(log)
	out := buf.String()
	errs := strings.Count(out, "replica sync failed")
	// refused at 0, 300, ... 1500 (6); broken at 1800 (1); refused again at 1810, 2110, ... 3310 (6)
	if errs != 13 {
		t.Errorf("%d error lines for an hour of failing syncs, want 13:\n%s", errs, out)
	}
	if !strings.Contains(out, "replica sync works again") || !strings.Contains(out, "failed_syncs=3600") {
		t.Errorf("no recovery line counting 3600 failed syncs:\n%s", out)
	}
	buf.Reset()
	o.ok(log)
	if buf.Len() != 0 {
		t.Errorf("a sync that works after one that worked logged %q", buf.String())
	}
}

// A full disk is one problem whichever file btrfs receive names; lines the
// failing syncs log on their way through a quiet logger come once, then
// every outageRepeat; outside an outage every line passes.
func TestOutageQuietsRepeats(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	o := &outage{now: func() time.Time { return now }}
	q := o.quiet(log).With("backend", "btrfs")
	q.Warn("before any failure", "path", "/r/strata-2")
	q.Warn("before any failure", "path", "/r/strata-2")
	for s := 0; s < 3600; s++ {
		now = now.Add(time.Second)
		q.Warn("removing half-received snapshot", "path", "/r/strata-2")
		q.Warn("incremental stream failed", "generation", 2, "err", fmt.Sprintf("attempt %d", s))
		if s == 100 {
			q.Info("snapshot destroyed", "id", 3) // distinct lines pass
			q.Info("snapshot destroyed", "id", 4)
		}
		o.failed(now, fmt.Errorf("btrfs receive: ERROR: writing to store/%d-big failed: No space left on device", s), log)
	}
	o.ok(log)
	q.Warn("removing half-received snapshot", "path", "/r/strata-2")
	out := buf.String()
	for line, want := range map[string]int{
		"before any failure": 2, "replica sync failed": 12, "removing half-received snapshot": 13,
		"incremental stream failed": 12, "snapshot destroyed": 2, "replica sync works again": 1,
	} {
		if n := strings.Count(out, line); n != want {
			t.Errorf("%q logged %d times, want %d", line, n, want)
		}
	}
	if !strings.Contains(out, "backend=btrfs") {
		t.Errorf("the quiet logger lost its attributes:\n%s", out)
	}
}

// A primary whose stream of a generation keeps failing (the replica's disk
// is full and it breaks off every receive) logs it once, then every
// outageRepeat, and once when a stream of it is sent again; another
// generation is another problem.
func TestStreamFailuresLogOnce(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	var f streamFailures
	start := time.Now()
	killed := errors.New("btrfs send: signal: killed")
	for s := 0; s < 3600; s++ {
		f.failed(start.Add(time.Duration(s)*time.Second), 2, killed, log, "generation", 2, "bytes", s)
	}
	f.failed(start, 3, killed, log, "generation", 3)
	f.sent(start.Add(time.Hour), 2, log)
	f.sent(start.Add(time.Hour), 2, log)
	out := buf.String()
	if n := strings.Count(out, `msg="stream failed" generation=2`); n != 12 {
		t.Errorf("%d lines for an hour of failed streams of generation 2, want 12:\n%s", n, out)
	}
	if n := strings.Count(out, `msg="stream failed" generation=3`); n != 1 {
		t.Errorf("generation 3's failure logged %d times, want 1", n)
	}
	if n := strings.Count(out, "streams of the generation work again"); n != 1 || !strings.Contains(out, "failed_streams=3600") {
		t.Errorf("end of the failures: %d lines, want 1 counting 3600:\n%s", n, out)
	}
	for id := uint64(10); id < 10+2*maxStreaks; id++ {
		f.failed(start, id, killed, slog.New(slog.DiscardHandler))
	}
	if len(f.m) > maxStreaks {
		t.Errorf("%d generations tracked, want at most %d", len(f.m), maxStreaks)
	}
}

// A replica that breaks off its receive again and again (its disk is full)
// ends the primary's btrfs send one way or another (killed with the
// request, or a broken pipe): one problem, logged once.
func TestStreamFailuresReplicaGone(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	var f streamFailures
	start := time.Now()
	for i, cause := range []string{"signal: killed", "signal: broken pipe", "signal: killed", "write: connection reset by peer"} {
		err := fmt.Errorf("%w (btrfs send -q -p strata-1 strata-2: %s)", errReplicaGone, cause)
		f.failed(start.Add(time.Duration(i)*2*time.Second), 2, err, log, "generation", 2)
	}
	if n := strings.Count(buf.String(), `msg="stream failed"`); n != 1 {
		t.Errorf("4 streams the replica broke off: %d lines, want 1:\n%s", n, buf.String())
	}
	f.failed(start.Add(10*time.Second), 2, errors.New("btrfs send: no such subvolume"), log, "generation", 2)
	if n := strings.Count(buf.String(), `msg="stream failed"`); n != 2 {
		t.Errorf("another problem after them: %d lines, want 2:\n%s", n, buf.String())
	}
}
