// Package phase records where the time of one operation goes: each step
// records its span (start and end relative to the operation's start), so
// that steps which run in parallel show as overlapping spans. The log
// travels in the context; without one every call does nothing, so the code
// being timed pays nothing when nobody asks. bench/replica uses it to break
// a replica's receive of a generation into its steps.
package phase

import (
	"context"
	"sync"
	"time"
)

// Span is one step's time, relative to the start of the log.
type Span struct {
	Name       string
	Start, End time.Duration
}

// Took is the step's length.
func (s Span) Took() time.Duration { return s.End - s.Start }

// Log collects the spans of one operation. It is safe for concurrent use.
type Log struct {
	mu    sync.Mutex
	start time.Time
	spans []Span
}

// New returns an empty log whose time starts now.
func New() *Log { return &Log{start: time.Now()} }

// Add records a step that ran from start to end.
func (l *Log) Add(name string, start, end time.Time) {
	if l == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.spans = append(l.spans, Span{Name: name, Start: start.Sub(l.start), End: end.Sub(l.start)})
}

// Spans returns the recorded steps in the order they ended.
func (l *Log) Spans() []Span {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]Span(nil), l.spans...)
}

type key struct{}

// With returns ctx carrying l.
func With(ctx context.Context, l *Log) context.Context { return context.WithValue(ctx, key{}, l) }

// From returns the log ctx carries, nil if none.
func From(ctx context.Context) *Log {
	l, _ := ctx.Value(key{}).(*Log)
	return l
}

// Begin starts step name in ctx's log; the returned func ends it. Without
// a log both do nothing.
func Begin(ctx context.Context, name string) (end func()) {
	l := From(ctx)
	if l == nil {
		return func() {}
	}
	start := time.Now()
	return func() { l.Add(name, start, time.Now()) }
}
