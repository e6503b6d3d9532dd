package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/strata-nix/strata/server/replica"
)

// streak is one problem that repeats (a sync or a stream that keeps
// failing): it says to log the failure when it first appears, when it
// turns into another problem, and again every outageRepeat while it lasts.
type streak struct {
	since, logged time.Time
	last          string
	count         int
}

const outageRepeat = 5 * time.Minute

// fail counts a failure at now and reports whether to log it.
func (s *streak) fail(now time.Time, err error) bool {
	s.count++
	if s.since.IsZero() {
		s.since = now
	}
	if p := problem(err); p != s.last || now.Sub(s.logged) >= outageRepeat {
		s.last, s.logged = p, now
		return true
	}
	return false
}

// problem is what makes two failures the same one: the error's text, but
// for a full disk only that (btrfs names the file it was writing, which
// differs from one attempt to the next), and for a stream the replica
// broke off only that (errReplicaGone).
func problem(err error) string {
	if replica.NoSpace(err) {
		return "no space left on device"
	}
	if errors.Is(err, errReplicaGone) {
		return errReplicaGone.Error()
	}
	return err.Error()
}

// outage keeps a replica's failing syncs from flooding the log (a sync
// every replica.interval while the primary is down or refuses, or the
// replica's disk is full): the failure is logged as streak says; the end
// of an outage is logged once. Lines the failing syncs log on their way
// (through a logger from quiet: a half-received snapshot removed, a base
// tried) are logged once, then at most every outageRepeat.
//
// Its methods may be called from any goroutine.
type outage struct {
	mu sync.Mutex
	streak
	// seen is when each distinct line of quiet's loggers was last let
	// through during this outage.
	seen map[string]time.Time
	now  func() time.Time // nil: time.Now
}

func (o *outage) failed(now time.Time, err error, log *slog.Logger) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.fail(now, err) {
		log.Error("replica sync failed", "err", err, "failing_since", o.since.Format(time.RFC3339), "failed_syncs", o.count)
	}
}

func (o *outage) ok(log *slog.Logger) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.count > 0 {
		log.Info("replica sync works again", "failed_syncs", o.count, "failing_for", o.clock().Sub(o.since).Round(time.Second))
	}
	o.streak, o.seen = streak{}, nil
}

func (o *outage) clock() time.Time {
	if o.now != nil {
		return o.now()
	}
	return time.Now()
}

// pass reports whether a line with this key may be logged: always outside
// an outage, and during one the first time and then every outageRepeat.
// Lines outside an outage are remembered too (until the next sync that
// works clears them), so that the lines of the first failing sync count as
// the outage's first.
func (o *outage) pass(key string) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	now := o.clock()
	if t, ok := o.seen[key]; ok && o.count > 0 && now.Sub(t) < outageRepeat {
		return false
	}
	if o.seen == nil {
		o.seen = map[string]time.Time{}
	}
	o.seen[key] = now
	return true
}

// quiet returns a logger that logs as log does, except that during an
// outage a line that repeats (same level, message and attributes, the
// error's text aside) is dropped until outageRepeat has passed.
func (o *outage) quiet(log *slog.Logger) *slog.Logger {
	return slog.New(quietHandler{h: log.Handler(), o: o})
}

type quietHandler struct {
	h      slog.Handler
	o      *outage
	prefix string // attributes and groups added by WithAttrs and WithGroup
}

func (q quietHandler) Enabled(ctx context.Context, l slog.Level) bool { return q.h.Enabled(ctx, l) }

func (q quietHandler) Handle(ctx context.Context, r slog.Record) error {
	var b strings.Builder
	fmt.Fprintf(&b, "%s|%s|%s", q.prefix, r.Level, r.Message)
	r.Attrs(func(a slog.Attr) bool {
		if a.Key != "err" {
			fmt.Fprintf(&b, "|%s=%v", a.Key, a.Value)
		}
		return true
	})
	if !q.o.pass(b.String()) {
		return nil
	}
	return q.h.Handle(ctx, r)
}

func (q quietHandler) WithAttrs(as []slog.Attr) slog.Handler {
	p := q.prefix
	for _, a := range as {
		p += fmt.Sprintf("|%s=%v", a.Key, a.Value)
	}
	return quietHandler{h: q.h.WithAttrs(as), o: q.o, prefix: p}
}

func (q quietHandler) WithGroup(name string) slog.Handler {
	return quietHandler{h: q.h.WithGroup(name), o: q.o, prefix: q.prefix + "|" + name + ":"}
}

// streamFailures keeps a primary's log to one line per problem while a
// replica asks again and again for a stream that fails (its disk is full:
// it breaks off every receive), as outage does on the replica: per
// generation, the failure when it appears or changes and every
// outageRepeat, and one line when a stream of it is sent again.
type streamFailures struct {
	mu sync.Mutex
	m  map[uint64]*streak
}

// failed logs a failed stream of generation id as streak says.
func (f *streamFailures) failed(now time.Time, id uint64, err error, log *slog.Logger, args ...any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.m == nil {
		f.m = map[uint64]*streak{}
	}
	s := f.m[id]
	if s == nil {
		// Bounded: a generation whose streams never work again (destroyed
		// meanwhile) is dropped, oldest first.
		for len(f.m) >= maxStreaks {
			delete(f.m, slices.Min(slices.Collect(maps.Keys(f.m))))
		}
		s = &streak{}
		f.m[id] = s
	}
	if s.fail(now, err) {
		log.Error("stream failed", append(args, "err", err, "failing_since", s.since.Format(time.RFC3339), "failed_streams", s.count)...)
	}
}

// maxStreaks bounds the generations streamFailures tracks.
const maxStreaks = 64

// sent ends generation id's streak of failed streams, if any, with a line.
func (f *streamFailures) sent(now time.Time, id uint64, log *slog.Logger) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if s := f.m[id]; s != nil {
		log.Info("streams of the generation work again", "generation", id, "failed_streams", s.count, "failing_for", now.Sub(s.since).Round(time.Second))
		delete(f.m, id)
	}
}
