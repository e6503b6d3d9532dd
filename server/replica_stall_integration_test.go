//go:build integration

package server

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/server/replica"
	"github.com/strata-nix/strata/snapshot/btrfs"
)

// A primary that stays connected but stops sending in the middle of a
// stream: the replica's real `btrfs receive` is aborted after
// replica.stall_timeout instead of waiting for ever, nothing half-received
// stays, and the next sync receives the generation.
func TestReplicaStreamStall(t *testing.T) {
	prim := newPrimary(t, 3)
	prim.c.store.Fill(t)
	publish(t, prim.srv.Server)

	// The "primary" the replica talks to: the real one, except that the
	// first stream stops after 64 KiB and the connection stays open.
	target, _ := url.Parse(prim.api.URL)
	proxy := httputil.NewSingleHostReverseProxy(target)
	var stalls atomic.Int32
	stop := make(chan struct{})
	defer close(stop)
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasSuffix(r.URL.Path, "/stream") || stalls.Add(1) > 1 {
			proxy.ServeHTTP(w, r)
			return
		}
		req, _ := http.NewRequestWithContext(r.Context(), r.Method, prim.api.URL+r.URL.RequestURI(), nil)
		req.Header = r.Header.Clone()
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Errorf("stream from the primary: %v", err)
			return
		}
		defer resp.Body.Close()
		w.Header().Set(api.HeaderBackend, resp.Header.Get(api.HeaderBackend))
		w.WriteHeader(resp.StatusCode)
		io.CopyN(w, resp.Body, 64<<10)
		w.(http.Flusher).Flush()
		select { // connected, sending nothing
		case <-r.Context().Done():
		case <-stop:
		}
	}))
	defer ts.Close()

	re := newReplicaEnv(t, ts.URL)
	rs, _ := re.start(t, "primary-token")
	b, err := btrfs.NewReplica(re.snapDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	p := replica.New(replica.Options{Primary: replica.Fixed(api.NewClient(ts.URL, "primary-token"), ts.URL),
		Backend: b, Target: rs.Server, StateDir: re.cfg.StateDir, Registry: prometheus.NewRegistry(), Stall: time.Second})

	done := make(chan error, 1)
	go func() { _, err := p.Sync(context.Background()); done <- err }()
	select {
	case err := <-done:
		if !errors.Is(err, api.ErrStreamStalled) {
			t.Fatalf("sync from a stalled primary: %v, want %v", err, api.ErrStreamStalled)
		}
		t.Logf("sync from a stalled primary: %v", err)
	case <-time.After(2 * time.Minute):
		t.Fatal("the sync still waits for a primary that stopped sending")
	}
	if ents, _ := os.ReadDir(re.snapDir); len(ents) != 0 {
		t.Fatalf("a stalled receive left %d entries in the snapshot dir", len(ents))
	}
	if len(rs.Generations()) != 0 {
		t.Fatalf("a stalled receive went live: %v", ids(rs.Generations()))
	}
	res := syncOnce(t, p)
	if len(res.Received) != 1 || res.Received[0].ID != 1 {
		t.Fatalf("the sync after the stall received %+v, want generation 1", res.Received)
	}
	if a, b := regSHA(t, prim.srv.Server, 1), regSHA(t, rs.Server, 1); a != b {
		t.Errorf("registration sha256 %s on the replica, %s on the primary", b, a)
	}
}
