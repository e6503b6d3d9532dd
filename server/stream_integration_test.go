//go:build integration

package server

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/apiserve"
	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/snapshot/btrfs"
)

// The stream endpoint: token required even for this GET, refusals before
// any byte (unknown N, M not live, other backend), a whole and an
// incremental stream that a replica backend receives, byte counts in the
// trailer and the metrics, and retention keeping a generation while it is
// being sent.
func TestStreamEndpoint(t *testing.T) {
	c := newCentral(t)
	c.store.Fill(t)
	// 16 MB in the store: a stream of it outgrows the socket buffers, so a
	// client that does not read holds its sender.
	c.store.AddText(t, "big", strings.Repeat("0123456789abcdef", 1<<20))
	reg := prometheus.NewRegistry()
	b, err := btrfs.New(c.cfg.StoreRoot, c.cfg.SnapshotDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	c.cfg.Keep = 1
	s, err := New(context.Background(), Options{Config: c.cfg, Backend: b, Registry: reg})
	if err != nil {
		t.Fatal(err)
	}
	g1 := publish(t, s)
	ts := httptest.NewServer(s.Handler(apiserve.NewToken("sekrit"), reg, func() any { return nil }))
	defer ts.Close()
	ctx := context.Background()

	repl, err := btrfs.NewReplica(filepath.Join(testenv.LoopBtrfs(t, "1G"), "gens"), nil)
	if err != nil {
		t.Fatal(err)
	}
	// No token, wrong token: 401, nothing sent.
	for _, tok := range []string{"", "wrong"} {
		_, err := api.NewClient(ts.URL, tok).Stream(ctx, api.StreamRequest{ID: g1})
		var se *api.StatusError
		if !errors.As(err, &se) || se.Code != http.StatusUnauthorized {
			t.Errorf("stream with token %q: %v, want 401", tok, err)
		}
	}
	cl := api.NewClient(ts.URL, "sekrit")
	for _, tc := range []struct {
		req  api.StreamRequest
		code int
		msg  string
	}{
		{api.StreamRequest{ID: 7}, 404, "generation 7"},
		{api.StreamRequest{ID: g1, From: g1}, 400, "below"},
		{api.StreamRequest{ID: g1, Backend: "zfs"}, 409, "mixed backends"},
	} {
		_, err := cl.Stream(ctx, tc.req)
		var se *api.StatusError
		if !errors.As(err, &se) || se.Code != tc.code || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("stream %+v: %v, want %d mentioning %q", tc.req, err, tc.code, tc.msg)
		}
	}

	recv := func(id, from uint64) int64 {
		t.Helper()
		st, err := cl.Stream(ctx, api.StreamRequest{ID: id, From: from, Backend: "btrfs"})
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		if st.Backend != "btrfs" {
			t.Errorf("stream backend header %q", st.Backend)
		}
		if _, err := repl.Receive(ctx, st, id, from); err != nil {
			t.Fatalf("receive %d from %d: %v", id, from, err)
		}
		if _, err := io.Copy(io.Discard, st); err != nil {
			t.Fatalf("stream %d trailer check: %v", id, err)
		}
		return st.Bytes()
	}
	full := recv(g1, 0)

	// Hold generation 1 in a stream that has not been read yet (its
	// sender blocks on the full socket): a publish with keep=1 must not
	// destroy it.
	c.store.AddText(t, "second", "2\n")
	st, err := cl.Stream(ctx, api.StreamRequest{ID: g1})
	if err != nil {
		t.Fatal(err)
	}
	g2 := publish(t, s)
	if _, ok := s.Generation(g1); !ok {
		t.Fatalf("retention destroyed generation %d while it was being streamed", g1)
	}
	io.Copy(io.Discard, st)
	st.Close()
	incr := recv(g2, g1)
	t.Logf("stream bytes: whole %d, incremental %d", full, incr)
	if incr >= full {
		t.Errorf("incremental stream %d bytes, whole %d", incr, full)
	}
	var m dto.Metric
	s.streamMetrics.bytes.WithLabelValues("incremental").Write(&m)
	if got := m.GetCounter().GetValue(); got != float64(incr) {
		t.Errorf("strata_stream_sent_bytes_total{kind=incremental} = %v, want %d", got, incr)
	}
	// Once the stream is done, retention applies again (next publish).
	c.store.AddText(t, "third", "3\n")
	publish(t, s)
	if _, ok := s.Generation(g1); ok {
		t.Errorf("generation %d still live after its stream ended and keep=1", g1)
	}
	// M no longer live: refused, ask for a whole stream.
	_, err = cl.Stream(ctx, api.StreamRequest{ID: g2 + 1, From: g1})
	if err == nil || !strings.Contains(err.Error(), "whole stream") {
		t.Errorf("stream from a generation that is gone: %v", err)
	}
	l, _ := repl.List(ctx)
	if len(l) != 2 || l[0].ID != g1 || l[1].ID != g2 {
		t.Errorf("replica has %+v", l)
	}
}

// A stream never waits for a publish: while a publish holds the publish
// lock (paused after its snapshot), a whole stream of the live generation
// is sent in full, trailers checked, and only then is the publish let go.
func TestStreamDuringPublish(t *testing.T) {
	c := newCentral(t)
	c.store.Fill(t)
	b, err := btrfs.New(c.cfg.StoreRoot, c.cfg.SnapshotDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(context.Background(), Options{Config: c.cfg, Backend: b})
	if err != nil {
		t.Fatal(err)
	}
	g1 := publish(t, s)
	ts := httptest.NewServer(s.Handler(apiserve.NewToken("sekrit"), nil, func() any { return nil }))
	defer ts.Close()

	c.store.AddText(t, "second", "2\n")
	s.pause = "snapshot"
	pctx, stop := context.WithCancel(context.Background())
	defer stop()
	published := make(chan error, 1)
	go func() {
		_, err := s.Publish(pctx)
		published <- err
	}()
	for s.mu.TryLock() { // until the publish holds the lock
		s.mu.Unlock()
		runtime.Gosched()
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	st, err := api.NewClient(ts.URL, "sekrit").Stream(ctx, api.StreamRequest{ID: g1})
	if err != nil {
		t.Fatalf("stream during a publish: %v", err)
	}
	n, err := io.Copy(io.Discard, st)
	st.Close()
	if err != nil || n == 0 {
		t.Fatalf("stream during a publish: %d bytes, %v", n, err)
	}
	select {
	case err := <-published:
		t.Fatalf("the publish ended (%v) before the stream was let go: nothing was measured during it", err)
	default:
	}
	stop()
	if err := <-published; err == nil {
		t.Errorf("the publish cancelled while it held the lock published")
	}
	t.Logf("streamed %d bytes of generation %d while a publish held the lock", n, g1)
}
