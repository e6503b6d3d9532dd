package server

import (
	"context"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/strata-nix/strata/nixstore"
)

// TestRowsWritesBounded: background rows writes (a replica's FinishRows
// for many generations at once) run at most maxRowsWrites at a time, and
// every one is written; one not started when the server shuts down is
// left to the next start.
func TestRowsWritesBounded(t *testing.T) {
	s := &Server{state: state{dir: t.TempDir()}, log: slog.New(slog.DiscardHandler), cfg: Config{StoreDir: "/nix/store"}}
	s.life, s.stopLife = context.WithCancel(context.Background())
	const n = 8
	var running, most, starts atomic.Int32
	release := make(chan struct{})
	var started sync.WaitGroup
	started.Add(maxRowsWrites)
	for id := uint64(1); id <= n; id++ {
		if err := os.MkdirAll(s.state.genDir(id), 0o755); err != nil {
			t.Fatal(err)
		}
		s.writeRowsLater(id, func() (*nixstore.Rows, error) {
			r := running.Add(1)
			for m := most.Load(); r > m && !most.CompareAndSwap(m, r); m = most.Load() {
			}
			if starts.Add(1) <= maxRowsWrites {
				started.Done()
			}
			<-release
			running.Add(-1)
			return &nixstore.Rows{}, nil
		})
	}
	started.Wait()
	time.Sleep(100 * time.Millisecond) // room for more to start, if they could
	close(release)
	for id := uint64(1); id <= n; id++ {
		s.waitRows(id)
		if !s.state.hasRows(id) {
			t.Errorf("generation %d: no rows written", id)
		}
	}
	if m := most.Load(); m != maxRowsWrites {
		t.Errorf("%d rows writes ran at once, want at most %d", m, maxRowsWrites)
	}

	// Shut down with writes queued: those not started are not.
	block := make(chan struct{})
	for id := uint64(n + 1); id <= n+4; id++ {
		os.MkdirAll(s.state.genDir(id), 0o755)
		s.writeRowsLater(id, func() (*nixstore.Rows, error) { <-block; return &nixstore.Rows{}, nil })
	}
	time.Sleep(50 * time.Millisecond)
	s.stopLife()
	close(block)
	s.detached.Wait()
	written := 0
	for id := uint64(n + 1); id <= n+4; id++ {
		if s.state.hasRows(id) {
			written++
		}
	}
	if written != maxRowsWrites {
		t.Errorf("%d rows written after shutdown began, want the %d under way only", written, maxRowsWrites)
	}
}
