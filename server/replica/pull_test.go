package replica

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/lifecycle"
	"github.com/strata-nix/strata/snapshot"
)

// streamingPrimary serves a generation list and streams (a few bytes with
// the right trailers) over real HTTP, and records the streams asked for.
func streamingPrimary(t *testing.T, list api.GenerationList, sum string) (*httptest.Server, *[]string) {
	var asked []string
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/generations" {
			json.NewEncoder(w).Encode(list)
			return
		}
		if r.URL.Path == "/v1/token" {
			w.WriteHeader(http.StatusNoContent)
			return
		}
		if strings.HasSuffix(r.URL.Path, "/delta") {
			http.Error(w, "no delta here", http.StatusNotFound)
			return
		}
		asked = append(asked, r.URL.Path+"?"+r.URL.RawQuery)
		body := []byte("stream-bytes")
		w.Header().Set("Trailer", api.TrailerStreamBytes+", "+api.TrailerStreamSHA256)
		w.Write(body)
		w.Header().Set(api.TrailerStreamBytes, strconv.Itoa(len(body)))
		w.Header().Set(api.TrailerStreamSHA256, sum)
	}))
	t.Cleanup(ts.Close)
	return ts, &asked
}

// failingBackend refuses incrementals from the bases in bad, as btrfs
// receive does when it finds no parent.
type failingBackend struct {
	bad       map[uint64]bool
	destroyed []uint64
	here      []snapshot.Snapshot // List's answer
}

func (f *failingBackend) Kind() string { return "btrfs" }
func (f *failingBackend) Send(context.Context, io.Writer, uint64, uint64) error {
	return errors.New("not used")
}
func (f *failingBackend) Receive(_ context.Context, r io.Reader, id, from uint64) (snapshot.Snapshot, error) {
	io.Copy(io.Discard, io.LimitReader(r, 4))
	if f.bad[from] {
		return snapshot.Snapshot{}, fmt.Errorf("ERROR: cannot find parent subvolume of generation %d", from)
	}
	return snapshot.Snapshot{ID: id, Name: snapshot.Name(id)}, nil
}
func (f *failingBackend) List(context.Context) ([]snapshot.Snapshot, error) { return f.here, nil }
func (f *failingBackend) Destroy(_ context.Context, id uint64) error {
	f.destroyed = append(f.destroyed, id)
	return nil
}

type recordingTarget struct {
	fakeTarget
	added  []uint64
	refuse bool
}

func (r *recordingTarget) AddReceived(_ context.Context, g api.Generation, _ snapshot.Snapshot, _ string) (api.Generation, error) {
	if r.refuse {
		return api.Generation{}, errors.New("registration sha256 differs")
	}
	r.added = append(r.added, g.ID)
	r.gens = append(r.gens, g)
	return g, nil
}

func TestPullTriesOlderBasesThenWhole(t *testing.T) {
	list := api.GenerationList{Backend: "btrfs", Generations: []api.Generation{gen(2, "b"), gen(3, "c"), gen(4, "d")}}
	good := "15147c8756c0a8568b264937b7ae5d722c9a760739459225f03042882d26d6c7" // sha256("stream-bytes")
	for _, tc := range []struct {
		name   string
		bad    map[uint64]bool
		sum    string
		from   uint64
		asked  string
		broken bool
	}{
		{"newest base works", nil, good, 3, "[/v1/generations/4/stream?backend=btrfs&from=3]", false},
		{"older base after a failed one", map[uint64]bool{3: true}, good, 2,
			"[/v1/generations/4/stream?backend=btrfs&from=3 /v1/generations/4/stream?backend=btrfs&from=2]", false},
		{"whole after every base failed", map[uint64]bool{2: true, 3: true}, good, 0,
			"[/v1/generations/4/stream?backend=btrfs&from=3 /v1/generations/4/stream?backend=btrfs&from=2 /v1/generations/4/stream?backend=btrfs]", false},
		{"a broken stream is not retried from another base", nil, "0000", 0,
			"[/v1/generations/4/stream?backend=btrfs&from=3]", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts, asked := streamingPrimary(t, list, tc.sum)
			tg := &recordingTarget{fakeTarget: fakeTarget{gens: []api.Generation{gen(2, "b"), gen(3, "c")}}}
			be := &failingBackend{bad: tc.bad}
			p := New(Options{Primary: Fixed(api.NewClient(ts.URL, "tok"), ts.URL), Backend: be, Target: tg})
			res, err := p.Sync(context.Background())
			if fmt.Sprint(*asked) != tc.asked {
				t.Errorf("streams asked for %v, want %s", *asked, tc.asked)
			}
			if tc.broken {
				if err == nil || len(tg.added) != 0 || fmt.Sprint(be.destroyed) != "[4]" {
					t.Errorf("broken stream: err %v, made live %v, destroyed %v; want an error, nothing live, 4 destroyed", err, tg.added, be.destroyed)
				}
				return
			}
			if err != nil || len(res.Received) != 1 || res.Received[0].From != tc.from || fmt.Sprint(tg.added) != "[4]" {
				t.Errorf("sync: %+v, %v, made live %v; want 4 from %d", res.Received, err, tg.added, tc.from)
			}
		})
	}
}

// A snapshot here that is not live: this replica's own unfinished receive
// (the record names it) is made live when the target accepts it and
// destroyed when the target refuses it or the primary no longer has it;
// any other such snapshot is kept, and no stream is asked for it.
func TestSettleUnfinishedReceive(t *testing.T) {
	good := "15147c8756c0a8568b264937b7ae5d722c9a760739459225f03042882d26d6c7"
	for _, tc := range []struct {
		name      string
		record    string
		primary   []api.Generation
		refuse    bool
		added     string
		destroyed string
		asked     string
		err       string
	}{
		{"own receive adopted", "3\n", []api.Generation{gen(2, "b"), gen(3, "c")}, false, "[3]", "[]", "[]", ""},
		{"own receive refused is destroyed and received again", "3\n", []api.Generation{gen(2, "b"), gen(3, "c")}, true, "[]", "[3 3]",
			"[/v1/generations/3/stream?backend=btrfs&from=2]", "registration sha256 differs"},
		{"own receive the primary dropped is destroyed", "3\n", []api.Generation{gen(2, "b"), gen(4, "d")}, false, "[4]", "[3]",
			"[/v1/generations/4/stream?backend=btrfs&from=2]", ""},
		{"unknown snapshot kept, no stream", "", []api.Generation{gen(2, "b"), gen(3, "c")}, false, "[]", "[]", "[]", "not this replica's own unfinished receive"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if tc.record != "" {
				if err := os.WriteFile(filepath.Join(dir, "replica-receiving"), []byte(tc.record), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			ts, asked := streamingPrimary(t, api.GenerationList{Backend: "btrfs", Generations: tc.primary}, good)
			tg := &recordingTarget{fakeTarget: fakeTarget{gens: []api.Generation{gen(2, "b")}}, refuse: tc.refuse}
			be := &failingBackend{here: []snapshot.Snapshot{{ID: 2, Name: "strata-2"}, {ID: 3, Name: "strata-3"}}}
			be2 := &settleBackend{failingBackend: be}
			p := New(Options{Primary: Fixed(api.NewClient(ts.URL, "tok"), ts.URL), Backend: be2, Target: tg, StateDir: dir})
			_, err := p.Sync(context.Background())
			if fmt.Sprint(tg.added) != tc.added && !(tc.added == "[]" && len(tg.added) == 0) {
				t.Errorf("made live %v, want %s", tg.added, tc.added)
			}
			if got := fmt.Sprint(be.destroyed); got != tc.destroyed && !(tc.destroyed == "[]" && len(be.destroyed) == 0) {
				t.Errorf("destroyed %v, want %s", be.destroyed, tc.destroyed)
			}
			if got := fmt.Sprint(*asked); got != tc.asked && !(tc.asked == "[]" && len(*asked) == 0) {
				t.Errorf("streams asked for %v, want %s", *asked, tc.asked)
			}
			if tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
				t.Errorf("sync: %v, want %q", err, tc.err)
			}
		})
	}
}

// settleBackend drops a destroyed snapshot from List.
type settleBackend struct{ *failingBackend }

func (s *settleBackend) Destroy(ctx context.Context, id uint64) error {
	s.failingBackend.Destroy(ctx, id)
	s.here = slices.DeleteFunc(s.here, func(sn snapshot.Snapshot) bool { return sn.ID == id })
	return nil
}

// A stream that takes longer than the watchdog's limit but keeps sending
// keeps the sync's step healthy: the puller reports progress as bytes
// arrive.
func TestSlowStreamIsProgress(t *testing.T) {
	chunk := []byte(strings.Repeat("x", 1000))
	h := sha256.New()
	for i := 0; i < 20; i++ {
		h.Write(chunk)
	}
	sum := hex.EncodeToString(h.Sum(nil))
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/generations" {
			json.NewEncoder(w).Encode(api.GenerationList{Backend: "btrfs", Generations: []api.Generation{gen(1, "a")}})
			return
		}
		if r.URL.Path == "/v1/token" {
			w.WriteHeader(http.StatusNoContent)
			return
		}
		w.Header().Set("Trailer", api.TrailerStreamBytes+", "+api.TrailerStreamSHA256)
		for i := 0; i < 20; i++ { // 1 s in all, a chunk every 50 ms
			w.Write(chunk)
			w.(http.Flusher).Flush()
			time.Sleep(50 * time.Millisecond)
		}
		w.Header().Set(api.TrailerStreamBytes, strconv.Itoa(20*len(chunk)))
		w.Header().Set(api.TrailerStreamSHA256, sum)
	}))
	defer ts.Close()
	step := lifecycle.NewStep("replica sync", 300*time.Millisecond)
	tg := &recordingTarget{}
	p := New(Options{Primary: Fixed(api.NewClient(ts.URL, "tok"), ts.URL), Backend: &failingBackend{}, Target: tg, Progress: step.Progress})
	done := make(chan error, 1)
	go func() {
		step.Begin()
		defer step.End()
		_, err := p.Sync(context.Background())
		done <- err
	}()
	var wedged error
	for running := true; running; {
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("sync: %v", err)
			}
			running = false
		case <-time.After(20 * time.Millisecond):
			if err := step.Check(time.Now()); err != nil && wedged == nil {
				wedged = err
			}
		}
	}
	if wedged != nil {
		t.Errorf("a stream that kept sending for 1 s counted as wedged (limit 300 ms): %v", wedged)
	}
	if fmt.Sprint(tg.added) != "[1]" {
		t.Errorf("made live %v, want [1]", tg.added)
	}
}

// preparingTarget records the deltas PrepareReceived was given.
type preparingTarget struct {
	recordingTarget
	prepared []uint64
}

func (p *preparingTarget) PrepareReceived(_ context.Context, g api.Generation, _ api.Delta) {
	p.prepared = append(p.prepared, g.ID)
}

// TestStreamEndedDeltaLate: an incremental receive whose stream has ended
// waits for the primary's registration delta at most deltaWait, then goes
// on without it (the received snapshot's DB gives the registration), and
// nothing is prepared from a delta that comes later.
func TestStreamEndedDeltaLate(t *testing.T) {
	defer func(w time.Duration) { deltaWait = w }(deltaWait)
	deltaWait = 300 * time.Millisecond
	good := "15147c8756c0a8568b264937b7ae5d722c9a760739459225f03042882d26d6c7" // sha256("stream-bytes")
	list := api.GenerationList{Backend: "btrfs", Generations: []api.Generation{gen(1, "a"), gen(2, "b")}}
	deltaAsked := make(chan struct{}, 1)
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/v1/generations":
			json.NewEncoder(w).Encode(list)
		case strings.HasSuffix(r.URL.Path, "/delta"):
			deltaAsked <- struct{}{}
			select { // a primary slow to answer: as long as the client waits
			case <-r.Context().Done():
			case <-time.After(time.Minute):
			}
			json.NewEncoder(w).Encode(api.Delta{From: 1, To: 2, Removed: []string{}})
		default:
			w.Header().Set("Trailer", api.TrailerStreamBytes+", "+api.TrailerStreamSHA256)
			w.Write([]byte("stream-bytes"))
			w.Header().Set(api.TrailerStreamBytes, "12")
			w.Header().Set(api.TrailerStreamSHA256, good)
		}
	}))
	defer ts.Close()
	tg := &preparingTarget{recordingTarget: recordingTarget{fakeTarget: fakeTarget{gens: []api.Generation{gen(1, "a")}}}}
	p := New(Options{Primary: Fixed(api.NewClient(ts.URL, "tok"), ts.URL), Backend: &failingBackend{}, Target: tg})
	start := time.Now()
	res, err := p.Sync(context.Background())
	took := time.Since(start)
	if err != nil || len(res.Received) != 1 || res.Received[0].From != 1 || res.Received[0].DeltaBytes != 0 {
		t.Fatalf("sync: %v %+v, want generation 2 from 1 without a delta", err, res.Received)
	}
	select {
	case <-deltaAsked:
	default:
		t.Fatal("the delta was never asked for")
	}
	if took > 10*deltaWait {
		t.Errorf("the sync took %s with the delta not answering; the wait after the stream is %s", took, deltaWait)
	}
	if fmt.Sprint(tg.added) != "[2]" || len(tg.prepared) != 0 {
		t.Errorf("made live %v, prepared %v; want [2] and nothing prepared", tg.added, tg.prepared)
	}
}

// A wrong replica.token_file shows at the next sync, not only when the
// primary next publishes (a new user's replica was silent about it while
// the primary had nothing new): the sync asks GET /v1/token and a 401 is
// a refusal naming the key. A primary older than the call (404) is left to
// the stream requests.
func TestSyncChecksToken(t *testing.T) {
	for _, tc := range []struct {
		code int
		want string
	}{
		{http.StatusUnauthorized, "check replica.token_file"},
		{http.StatusNotFound, ""},
		{http.StatusNoContent, ""},
	} {
		asked := 0
		ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			switch r.URL.Path {
			case "/v1/generations":
				json.NewEncoder(w).Encode(api.GenerationList{Backend: "btrfs"})
			case "/v1/token":
				asked++
				if r.Header.Get("Authorization") != "Bearer tok" {
					t.Errorf("token check sent %q", r.Header.Get("Authorization"))
				}
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(tc.code)
				if tc.code == http.StatusUnauthorized {
					w.Write([]byte(`{"error":"mutating call refused: the bearer token sent is not this daemon's API token"}`))
				}
			default:
				t.Errorf("unexpected call %s", r.URL)
			}
		}))
		p := New(Options{Primary: Fixed(api.NewClient(ts.URL, "tok"), ts.URL), Backend: &failingBackend{}, Target: &recordingTarget{}})
		_, err := p.Sync(context.Background())
		ts.Close()
		if asked != 1 {
			t.Errorf("%d: token asked %d times in a sync, want 1", tc.code, asked)
		}
		if tc.want == "" && err != nil {
			t.Errorf("%d: sync: %v, want no error", tc.code, err)
		}
		if tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "not this daemon's API token")) {
			t.Errorf("%d: sync: %v, want an error with %q and the primary's reason", tc.code, err, tc.want)
		}
	}
}
