package server

import (
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
// every one is written.
func TestRowsWritesBounded(t *testing.T) {
	s := &Server{state: state{dir: t.TempDir()}, log: slog.New(slog.DiscardHandler), cfg: Config{StoreDir: "/nix/store"}}
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
}
