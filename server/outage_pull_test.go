package server

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/lifecycle"
	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/server/replica"
	"github.com/strata-nix/strata/snapshot"
)

// fullBackend is a replica backend whose disk is full: every receive
// logs the removal of its half-received snapshot and fails with ENOSPC
// naming another file, as btrfs receive does.
type fullBackend struct {
	log *slog.Logger
	n   atomic.Int64
}

func (f *fullBackend) Kind() string { return "btrfs" }
func (f *fullBackend) Send(context.Context, io.Writer, uint64, uint64) error {
	return fmt.Errorf("not used")
}
func (f *fullBackend) List(context.Context) ([]snapshot.Snapshot, error) {
	return []snapshot.Snapshot{{ID: 1, Name: "strata-1"}}, nil
}
func (f *fullBackend) Destroy(context.Context, uint64) error { return nil }
func (f *fullBackend) Receive(_ context.Context, r io.Reader, id, from uint64) (snapshot.Snapshot, error) {
	io.Copy(io.Discard, r)
	f.log.Warn("removing half-received snapshot", "path", "/r/strata-2")
	return snapshot.Snapshot{}, fmt.Errorf("btrfs receive /r/strata-2: ERROR: writing to store/%d-big failed: No space left on device", f.n.Add(1))
}

type oneGenTarget struct{ sum string }

func (t oneGenTarget) Generations() []api.Generation {
	return []api.Generation{{ID: 1, RegistrationSHA256: t.sum}}
}
func (oneGenTarget) StoreID() string                                            { return "" }
func (oneGenTarget) PrepareReceived(context.Context, api.Generation, api.Delta) {}
func (oneGenTarget) DropPrepared(uint64)                                        {}
func (oneGenTarget) AddReceived(context.Context, api.Generation, snapshot.Snapshot, string) (api.Generation, error) {
	return api.Generation{}, fmt.Errorf("not used")
}
func (oneGenTarget) SetUpstreamPinned(map[uint64]string) {}
func (oneGenTarget) Missing() []api.Generation           { return nil }
func (oneGenTarget) Retain(context.Context)              {}

// A replica whose disk is full syncs every few milliseconds against a
// primary with a generation it cannot receive, then the primary drops the
// generation (the sync works), then the primary is unreachable: each
// problem is logged once, the lines of the failing syncs (the removed
// half-received snapshot) once, and the end once.
func TestReplicaRetriesLogOnce(t *testing.T) {
	var mu sync.Mutex
	gens := []api.Generation{{ID: 1, RegistrationSHA256: "s1"}, {ID: 2, RegistrationSHA256: "s2"}}
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		list := api.GenerationList{Backend: "btrfs", Generations: gens}
		mu.Unlock()
		switch {
		case r.URL.Path == "/v1/generations":
			json.NewEncoder(w).Encode(list)
		case strings.HasSuffix(r.URL.Path, "/delta"):
			http.Error(w, "no delta here", http.StatusNotFound)
		default:
			w.Write([]byte("stream-bytes"))
		}
	}))
	defer ts.Close()

	var buf testenv.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	failing := &outage{}
	syncLog := failing.quiet(log)
	p := replica.New(replica.Options{Primary: replica.Fixed(api.NewClient(ts.URL, "tok"), ts.URL),
		Backend: &fullBackend{log: syncLog}, Target: oneGenTarget{"s1"}, Logger: syncLog})

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	syncs := make(chan error, 1000)
	done := make(chan error, 1)
	go func() {
		done <- runPuller(ctx, p, 2*time.Millisecond, lifecycle.NewStep("sync", 0), func() {}, func(err error) { syncs <- err }, failing, log)
	}()
	wait := func(n int, failed bool) {
		t.Helper()
		for i := 0; i < n; {
			select {
			case err := <-syncs:
				if (err != nil) == failed {
					i++
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("no sync for 10 s:\n%s", buf.String())
			}
		}
	}
	wait(20, true)
	mu.Lock()
	gens = gens[:1]
	mu.Unlock()
	wait(3, false)
	ts.Close()
	wait(20, true)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	out := buf.String()
	for line, want := range map[string]int{
		"replica sync failed": 2, "No space left on device": 1, "connection refused": 1,
		"removing half-received snapshot": 1, "replica sync works again": 1,
	} {
		if n := strings.Count(out, line); n != want {
			t.Errorf("%q logged %d times, want %d:\n%s", line, n, want, out)
		}
	}
}
