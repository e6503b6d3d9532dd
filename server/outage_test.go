package server

import (
	"bytes"
	"errors"
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
