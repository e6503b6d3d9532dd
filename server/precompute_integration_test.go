//go:build integration

package server

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/apiserve"
	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/snapshot/btrfs"
)

// A primary precomputes each new generation's incremental stream from its
// parent once a replica has asked it for a stream (never before), serves
// that file for GET /v1/generations/N/stream?from=M (the same bytes a
// send gives; a replica receives it), and removes it when retention
// destroys N or M, when the publish fails, and at a start.
func TestPrecomputedStream(t *testing.T) {
	c := newCentral(t)
	c.store.Fill(t)
	b, err := btrfs.New(c.cfg.StoreRoot, c.cfg.SnapshotDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	c.cfg.Keep = 2
	var logs testenv.Buffer
	s, err := New(context.Background(), Options{Config: c.cfg, Backend: b, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s.Handler(apiserve.NewToken("sekrit"), nil, func() any { return nil }))
	defer ts.Close()
	ctx := context.Background()
	cl := api.NewClient(ts.URL, "sekrit")
	streams := filepath.Join(c.cfg.StateDir, "streams")
	files := func() []string {
		t.Helper()
		ents, _ := os.ReadDir(streams)
		var out []string
		for _, e := range ents {
			out = append(out, e.Name())
		}
		return out
	}
	ready := func(id, from uint64) {
		t.Helper()
		deadline := time.Now().Add(time.Minute)
		for {
			_, end, ok := s.Precomputed(id, from)
			if !ok {
				t.Fatalf("generation %d: no stream from %d precomputed (files %v)\n%s", id, from, files(), logs.String())
			}
			if !end.IsZero() {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("precompute of %d from %d did not end", id, from)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	g1 := publish(t, s)
	c.store.AddText(t, "second", "2\n")
	g2 := publish(t, s)
	if _, _, ok := s.Precomputed(g2, g1); ok || len(files()) != 0 {
		t.Fatalf("precomputed a stream before any replica asked for one: %v", files())
	}

	repl, err := btrfs.NewReplica(filepath.Join(testenv.LoopBtrfs(t, "1G"), "gens"), nil)
	if err != nil {
		t.Fatal(err)
	}
	recv := func(id, from uint64) []byte {
		t.Helper()
		st, err := cl.Stream(ctx, api.StreamRequest{ID: id, From: from, Backend: "btrfs"})
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		var got bytes.Buffer
		if _, err := repl.Receive(ctx, io.TeeReader(st, &got), id, from); err != nil {
			t.Fatalf("receive %d from %d: %v", id, from, err)
		}
		if _, err := io.Copy(&got, st); err != nil {
			t.Fatalf("stream %d trailer check: %v", id, err)
		}
		return got.Bytes()
	}
	recv(g2, 0) // a replica asked: from now on the primary precomputes

	c.store.AddText(t, "third", "3\n")
	g3 := publish(t, s)
	ready(g3, g2)
	pre, err := os.ReadFile(filepath.Join(streams, "3-from-2"))
	if err != nil {
		t.Fatalf("precomputed stream file: %v (files %v)", err, files())
	}
	var live bytes.Buffer
	if err := b.Send(ctx, &live, g3, g2); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(pre, live.Bytes()) {
		t.Fatalf("precomputed stream (%d bytes) differs from btrfs send -p (%d bytes)", len(pre), live.Len())
	}
	got := recv(g3, g2)
	if !bytes.Equal(got, pre) {
		t.Errorf("stream served (%d bytes) is not the precomputed one (%d bytes)", len(got), len(pre))
	}
	if !strings.Contains(logs.String(), "generation=3 from=2 kind=incremental source=precomputed") {
		t.Errorf("the stream of 3 from 2 was not served from the precomputed file:\n%s", logs.String())
	}
	if l, _ := repl.List(ctx); len(l) != 2 || l[1].ID != g3 {
		t.Errorf("replica has %+v", l)
	}

	// Retention (keep 2) destroys generation 2: the stream from it goes.
	c.store.AddText(t, "fourth", "4\n")
	g4 := publish(t, s)
	ready(g4, g3)
	if _, _, ok := s.Precomputed(g3, g2); ok {
		t.Errorf("stream of %d from %d kept after retention destroyed %d", g3, g2, g2)
	}
	if got := strings.Join(files(), " "); got != "4-from-3 asked" {
		t.Errorf("streams dir after retention: %q, want %q", got, "4-from-3 asked")
	}

	// A publish that fails after its snapshot: its stream goes with it.
	c.store.AddText(t, "fifth", "5\n")
	s.pause = "registration"
	pctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { _, err := s.Publish(pctx); done <- err }()
	deadline := time.Now().Add(time.Minute)
	for !strings.Contains(logs.String(), "publish paused") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if _, _, ok := s.Precomputed(g4+1, g4); !ok {
		t.Errorf("no stream of %d from %d being precomputed during its publish", g4+1, g4)
	}
	cancel()
	if err := <-done; err == nil {
		t.Fatal("cancelled publish succeeded")
	}
	s.pause = ""
	if _, _, ok := s.Precomputed(g4+1, g4); ok {
		t.Errorf("stream of the failed publish %d kept", g4+1)
	}
	if got := strings.Join(files(), " "); got != "4-from-3 asked" {
		t.Errorf("streams dir after a failed publish: %q, want %q", got, "4-from-3 asked")
	}

	// A start removes every precomputed stream (a crash may have cut one
	// short) and keeps the record that replicas ask.
	s.Shutdown()
	s2, err := New(ctx, Options{Config: c.cfg, Backend: b})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Shutdown()
	if got := strings.Join(files(), " "); got != "asked" {
		t.Errorf("streams dir after a start: %q, want %q", got, "asked")
	}
	c.store.AddText(t, "sixth", "6\n")
	g6 := publish(t, s2)
	if _, _, ok := s2.Precomputed(g6, g4); !ok {
		t.Errorf("after a start, generation %d's stream from %d not precomputed (a replica asked before the start)", g6, g4)
	}
}
