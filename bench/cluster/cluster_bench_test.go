//go:build integration

// Package cluster_test is `make bench-cluster`: how fast a new generation
// reaches builders by gossip (one server member and 10, 50 and 200 builder
// members, each with its own UDP and TCP sockets on loopback, memberlist's
// LAN defaults), and what gossip costs at rest, compared in the same run
// with the polling fallback at its default interval (rotate.check_interval
// 30s): builders that GET /v1/generations every 30 s from a random phase.
//
// STRATA_BENCH_SIZES (default "10,50,200"), STRATA_BENCH_PUBLISHES
// (default 10) and STRATA_BENCH_POLL (default 30s) change the run.
package cluster_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/cluster/clustertest"
)

func env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func quantile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	d = slices.Clone(d)
	slices.Sort(d)
	return d[int(p*float64(len(d)-1)+0.5)]
}

type row struct {
	method             string
	nodes              int
	median, p99, worst time.Duration
	lastMedian         time.Duration // per publish: when the last builder knew
	bytesPerNodeSec    float64
	samples, publishes int
	note               string
}

func BenchmarkCluster(b *testing.B) {
	var sizes []int
	for _, f := range strings.Split(env("STRATA_BENCH_SIZES", "10,50,200"), ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			b.Fatalf("STRATA_BENCH_SIZES: %q", f)
		}
		sizes = append(sizes, n)
	}
	publishes, _ := strconv.Atoi(env("STRATA_BENCH_PUBLISHES", "10"))
	poll, err := time.ParseDuration(env("STRATA_BENCH_POLL", "30s"))
	if err != nil {
		b.Fatal(err)
	}
	fmt.Printf("\nnew generation reaching builders: gossip (memberlist LAN defaults, strata's re-broadcast) vs polling every %s\n", poll)
	fmt.Printf("%-22s %6s %10s %10s %10s %14s %16s  %s\n", "method", "nodes", "median", "p99", "max", "last-of-N med", "bytes/node/s", "samples")
	show := func(r row) {
		fmt.Printf("%-22s %6d %10s %10s %10s %14s %16.1f  %d samples, %d publishes%s\n", r.method, r.nodes,
			r.median.Round(time.Millisecond), r.p99.Round(time.Millisecond), r.worst.Round(time.Millisecond),
			r.lastMedian.Round(time.Millisecond), r.bytesPerNodeSec, r.samples, r.publishes, r.note)
	}
	for range b.N {
		for _, n := range sizes {
			show(gossipRow(b, n, publishes))
			show(pollRow(b, n, poll))
		}
	}
	fmt.Println("median/p99/max: per builder, from publish to the builder knowing; last-of-N med: median over publishes of the slowest builder;")
	fmt.Println("bytes/node/s: gossip at rest (after convergence, 20 s) per member incl. the server; polling: request+answer bytes per poller")
}

func gossipRow(b *testing.B, n, publishes int) row {
	b.Helper()
	s, err := clustertest.Start(n, nil, nil, nil)
	if err != nil {
		b.Fatalf("%d members: %v", n, err)
	}
	defer s.Close()
	time.Sleep(2 * time.Second)
	var all, last []time.Duration
	note := ""
	for g := uint64(1); g <= uint64(publishes); g++ {
		d, _, err := s.Publish(g, 60*time.Second)
		if err != nil && len(d) < n {
			note += fmt.Sprintf(" (publish %d: %d builders missed it within 60 s)", g, n-len(d))
		}
		all = append(all, d...)
		if len(d) == n {
			last = append(last, quantile(d, 1))
		}
		time.Sleep(500 * time.Millisecond)
	}
	// At rest: the state is settled; count what the members send.
	time.Sleep(3 * time.Second)
	before, t0 := s.BytesSent(), time.Now()
	time.Sleep(20 * time.Second)
	rate := float64(s.BytesSent()-before) / time.Since(t0).Seconds() / float64(n+1)
	return row{method: "gossip", nodes: n, median: quantile(all, .5), p99: quantile(all, .99), worst: quantile(all, 1),
		lastMedian: quantile(last, .5), bytesPerNodeSec: rate, samples: len(all), publishes: publishes, note: note}
}

// pollRow: n pollers GET /v1/generations every interval from a random
// phase, as builders without gossip do; one publish; the answer is a
// 10-generation GenerationList as the server sends it.
func pollRow(b *testing.B, n int, interval time.Duration) row {
	b.Helper()
	var newest atomic.Uint64
	newest.Store(1)
	body := func() []byte {
		l := api.GenerationList{NFS: "0.0.0.0:2049"}
		top := newest.Load()
		for id := top; id > 0 && id+10 > top; id-- {
			l.Generations = append([]api.Generation{{ID: id, Snapshot: fmt.Sprintf("strata-%d", id), Created: time.Now().UTC(),
				Paths: 120000, NarBytes: 1 << 36, RegistrationSHA256: strings.Repeat("ab", 32), MountPath: fmt.Sprintf("/gen/%d", id)}}, l.Generations...)
		}
		out, _ := json.Marshal(l)
		return out
	}
	var bytes atomic.Int64
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		bb := body()
		w.Header().Set("Content-Type", "application/json")
		w.Write(bb)
	}), ConnState: nil}
	go srv.Serve(&countListener{Listener: ln, n: &bytes})
	defer srv.Close()
	url := "http://" + ln.Addr().String() + "/v1/generations"

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var publishedAt time.Time
	seen := make([]time.Duration, n)
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: (&countDialer{n: &bytes}).DialContext}}
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			phase := time.Duration(rand.Int64N(int64(interval)))
			select {
			case <-stop:
				return
			case <-time.After(phase):
			}
			t := time.NewTicker(interval)
			defer t.Stop()
			for {
				resp, err := client.Get(url)
				if err == nil {
					var l api.GenerationList
					json.NewDecoder(resp.Body).Decode(&l)
					resp.Body.Close()
					if k := len(l.Generations); k > 0 && l.Generations[k-1].ID >= 2 {
						mu.Lock()
						if seen[i] == 0 && !publishedAt.IsZero() {
							seen[i] = time.Since(publishedAt)
						}
						mu.Unlock()
					}
				}
				select {
				case <-stop:
					return
				case <-t.C:
				}
			}
		}()
	}
	// At rest first: one full interval of polls.
	time.Sleep(interval / 10)
	before, t0 := bytes.Load(), time.Now()
	time.Sleep(interval)
	rate := float64(bytes.Load()-before) / time.Since(t0).Seconds() / float64(n)
	mu.Lock()
	publishedAt = time.Now()
	newest.Store(2)
	mu.Unlock()
	time.Sleep(interval + time.Second)
	close(stop)
	wg.Wait()
	var all []time.Duration
	for _, d := range seen {
		if d > 0 {
			all = append(all, d)
		}
	}
	r := row{method: fmt.Sprintf("polling every %s", interval), nodes: n, median: quantile(all, .5), p99: quantile(all, .99),
		worst: quantile(all, 1), lastMedian: quantile(all, 1), bytesPerNodeSec: rate, samples: len(all), publishes: 1}
	if len(all) < n {
		r.note = fmt.Sprintf(" (%d pollers never saw it)", n-len(all))
	}
	return r
}

type countListener struct {
	net.Listener
	n *atomic.Int64
}

func (l *countListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &countConn{Conn: c, n: l.n}, nil
}

type countDialer struct{ n *atomic.Int64 }

func (d *countDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &countConn{Conn: c, n: d.n}, nil
}

type countConn struct {
	net.Conn
	n *atomic.Int64
}

func (c *countConn) Write(b []byte) (int, error) {
	k, err := c.Conn.Write(b)
	c.n.Add(int64(k))
	return k, err
}
