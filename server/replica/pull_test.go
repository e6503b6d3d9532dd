package replica

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"

	"github.com/strata-nix/strata/api"
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
func (f *failingBackend) Destroy(_ context.Context, id uint64) error {
	f.destroyed = append(f.destroyed, id)
	return nil
}

type recordingTarget struct {
	fakeTarget
	added []uint64
}

func (r *recordingTarget) AddReceived(_ context.Context, g api.Generation, _ snapshot.Snapshot, _ string) (api.Generation, error) {
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
