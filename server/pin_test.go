package server

import (
	"context"
	"maps"
	"testing"

	"github.com/strata-nix/strata/snapshot"
)

// labelBackend lists fixed snapshots and keeps the labels SetLabels writes.
type labelBackend struct{ snaps map[uint64]snapshot.Snapshot }

func (labelBackend) Kind() string { return "btrfs" }
func (labelBackend) Create(context.Context, uint64, snapshot.Labels) (snapshot.Snapshot, error) {
	return snapshot.Snapshot{}, snapshot.ErrUnsupported
}
func (b labelBackend) SetLabels(_ context.Context, id uint64, l snapshot.Labels) error {
	s, ok := b.snaps[id]
	if !ok {
		return snapshot.ErrNotFound
	}
	s.Labels = maps.Clone(s.Labels)
	for k, v := range l {
		if v == "" {
			delete(s.Labels, k)
		} else {
			s.Labels[k] = v
		}
	}
	b.snaps[id] = s
	return nil
}
func (b labelBackend) List(context.Context) ([]snapshot.Snapshot, error) {
	var out []snapshot.Snapshot
	for _, s := range b.snaps {
		out = append(out, s)
	}
	return out, nil
}
func (labelBackend) Destroy(context.Context, uint64) error { return snapshot.ErrUnsupported }

// A new-user test: `strata pin 2 --name keepme` then `strata pin 2` left
// generation 2 pinned without its name. A pin without a name keeps the
// name it has; a pin with a name replaces it; an unpin drops both.
func TestPinKeepsName(t *testing.T) {
	f := newFixture(t)
	f.manifest(t, 2, "sum2")
	b := labelBackend{snaps: map[uint64]snapshot.Snapshot{2: snap(2, live("2", labelSHA256, "sum2"))}}
	s, err := New(context.Background(), Options{Config: f.cfg, Backend: b})
	if err != nil {
		t.Fatal(err)
	}
	check := func(step string, pinned bool, name string) {
		t.Helper()
		g, ok := s.Generation(2)
		if !ok {
			t.Fatalf("%s: generation 2 not served", step)
		}
		if g.Pinned != pinned || g.PinName != name {
			t.Errorf("%s: pinned %v name %q, want %v %q", step, g.Pinned, g.PinName, pinned, name)
		}
		// What a restart reads back: pins.json and the snapshot's labels.
		pins, err := s.state.pins()
		if err != nil {
			t.Fatal(err)
		}
		if n, ok := pins[2]; ok != pinned || n != name {
			t.Errorf("%s: pins.json has %q (%v), want %q (%v)", step, n, ok, name, pinned)
		}
		if l := b.snaps[2].Labels; l[labelPinName] != name {
			t.Errorf("%s: snapshot label pin name %q, want %q", step, l[labelPinName], name)
		}
	}
	for _, step := range []struct {
		name, pin string
		unpin     bool
		want      string
		pinned    bool
	}{
		{name: "pin --name keepme", pin: "keepme", want: "keepme", pinned: true},
		{name: "pin again without a name", want: "keepme", pinned: true},
		{name: "pin --name other", pin: "other", want: "other", pinned: true},
		{name: "unpin", unpin: true},
		{name: "pin without a name after unpin", pinned: true},
	} {
		if step.unpin {
			if _, err := s.Unpin(2); err != nil {
				t.Fatalf("%s: %v", step.name, err)
			}
		} else if g, err := s.Pin(2, step.pin); err != nil {
			t.Fatalf("%s: %v", step.name, err)
		} else if g.PinName != step.want {
			t.Errorf("%s: answer has pin name %q, want %q", step.name, g.PinName, step.want)
		}
		check(step.name, step.pinned, step.want)
	}
}
