// Package clustertest runs many real cluster members in one process, each
// with its own UDP and TCP sockets on loopback: one server and N builders
// that behave as builders do on gossip (they report the newest generation
// as mounted as soon as they learn of it). The propagation test and
// bench/cluster use it.
package clustertest

import (
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/strata-nix/strata/cluster"
)

// Swarm is one server member and its builder members.
type Swarm struct {
	Server   *cluster.Node
	Builders []*cluster.Node
	bytes    atomic.Int64

	mu   sync.Mutex
	seen map[uint64][]time.Time // generation -> when each builder learnt it
	want uint64
	cond *sync.Cond

	stop chan struct{}
	wg   sync.WaitGroup
}

// Start starts the server member and n builders that join it, and waits
// until the server sees every builder alive.
func Start(n int, kr func() *cluster.Keyring, tune func(*memberlist.Config), log *slog.Logger) (*Swarm, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Swarm{seen: map[uint64][]time.Time{}, stop: make(chan struct{})}
	s.cond = sync.NewCond(&s.mu)
	mk := func(name string, role cluster.Role, join []string) (*cluster.Node, error) {
		var k *cluster.Keyring
		if kr != nil {
			k = kr()
		}
		return cluster.New(cluster.Config{Name: name, ClusterName: "swarm", Bind: "127.0.0.1:0", Join: join, Keyring: k,
			DeadGrace: time.Hour, Meta: cluster.Meta{Role: role, API: "http://127.0.0.1:1", NFS: "127.0.0.1:2"},
			Tune: func(c *memberlist.Config) {
				if tune != nil {
					tune(c)
				}
				c.Transport = s.countingTransport(c)
			}}, log)
	}
	srv, err := mk("server", cluster.RoleServer, nil)
	if err != nil {
		return nil, err
	}
	s.Server = srv
	errs := make(chan error, n)
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			b, err := mk(fmt.Sprintf("builder-%03d", i), cluster.RoleBuilder, []string{srv.Addr()})
			if err != nil {
				errs <- err
				return
			}
			mu.Lock()
			s.Builders = append(s.Builders, b)
			mu.Unlock()
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		s.Close()
		return nil, err
	}
	for i, b := range s.Builders {
		s.wg.Add(1)
		go s.builder(i, b)
	}
	deadline := time.Now().Add(time.Duration(30+n/2) * time.Second)
	for {
		alive := 0
		for _, m := range srv.Members() {
			if m.Role == cluster.RoleBuilder && m.State == cluster.StateAlive {
				alive++
			}
		}
		if alive == n {
			return s, nil
		}
		if time.Now().After(deadline) {
			s.Close()
			return nil, fmt.Errorf("swarm of %d: only %d builders alive at the server after joining", n, alive)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// builder reacts to gossip as an idle builder does: it notes when it
// learnt of a newer generation and reports it mounted.
func (s *Swarm) builder(i int, b *cluster.Node) {
	defer s.wg.Done()
	var last uint64
	for {
		select {
		case <-s.stop:
			return
		case <-b.Changed():
		}
		g := b.NewestGeneration()
		if g <= last {
			continue
		}
		now := time.Now()
		last = g
		s.mu.Lock()
		if s.seen[g] == nil {
			s.seen[g] = make([]time.Time, len(s.Builders))
		}
		s.seen[g][i] = now
		s.cond.Broadcast()
		s.mu.Unlock()
		b.SetBuilderState("http://127.0.0.1:1", "idle", []uint64{g})
	}
}

// Publish announces generation gen (live: 1..gen) from the server and
// waits until every builder learnt it. It returns each builder's delay and
// how long until the server saw every builder report gen mounted.
func (s *Swarm) Publish(gen uint64, timeout time.Duration) (delays []time.Duration, roundTrip time.Duration, err error) {
	var gens []cluster.Generation
	for g := uint64(1); g <= gen; g++ {
		gens = append(gens, cluster.Generation{ID: g})
	}
	start := time.Now()
	s.Server.SetServerState(gens)
	end := start.Add(timeout)
	timer := time.AfterFunc(timeout, func() { s.mu.Lock(); s.cond.Broadcast(); s.mu.Unlock() })
	defer timer.Stop()
	s.mu.Lock()
	for {
		done := s.seen[gen] != nil && !slices.ContainsFunc(s.seen[gen], func(t time.Time) bool { return t.IsZero() })
		if done || time.Now().After(end) {
			break
		}
		s.cond.Wait()
	}
	times := slices.Clone(s.seen[gen])
	s.mu.Unlock()
	missing := 0
	for _, t := range times {
		if t.IsZero() {
			missing++
			continue
		}
		delays = append(delays, t.Sub(start))
	}
	if len(times) == 0 {
		missing = len(s.Builders)
	}
	if missing > 0 {
		return delays, 0, fmt.Errorf("generation %d: %d of %d builders did not learn it within %s", gen, missing, len(s.Builders), timeout)
	}
	for {
		h, _ := s.Server.Holds()
		if len(h[gen]) == len(s.Builders) {
			return delays, time.Since(start), nil
		}
		if time.Now().After(end) {
			var missing []string
			for _, m := range s.Server.Members() {
				if m.Role == cluster.RoleBuilder && !slices.Contains(h[gen], m.Name) {
					missing = append(missing, fmt.Sprintf("%s (%s, reports %v)", m.Name, m.State, m.Generations))
				}
			}
			return delays, 0, fmt.Errorf("generation %d: server saw %d of %d builders hold it within %s; missing %v", gen, len(h[gen]), len(s.Builders), timeout, missing)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// BytesSent is every byte the members wrote to the network (UDP packets and
// TCP streams) so far.
func (s *Swarm) BytesSent() int64 { return s.bytes.Load() }

// Close stops every member (without leaving).
func (s *Swarm) Close() {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	s.wg.Wait()
	var errs []error
	for _, b := range s.Builders {
		errs = append(errs, b.Close())
	}
	if s.Server != nil {
		errs = append(errs, s.Server.Close())
	}
	_ = errors.Join(errs...)
}

// countingTransport is memberlist's own NetTransport with a byte count.
func (s *Swarm) countingTransport(c *memberlist.Config) memberlist.Transport {
	nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{BindAddrs: []string{c.BindAddr}, BindPort: c.BindPort,
		Logger: log.New(io.Discard, "", 0)})
	if err != nil {
		return nil // memberlist.Create then makes its own and the count misses this member
	}
	if c.BindPort == 0 {
		c.BindPort = nt.GetAutoBindPort()
		c.AdvertisePort = c.BindPort
	}
	ct := &counting{NetTransport: nt, n: &s.bytes, streams: make(chan net.Conn)}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			select {
			case <-s.stop:
				return
			case conn := <-nt.StreamCh():
				select {
				case ct.streams <- &countConn{Conn: conn, n: &s.bytes}:
				case <-s.stop:
					conn.Close()
					return
				}
			}
		}
	}()
	return ct
}

// StreamCh hands memberlist the accepted TCP connections, counted.
func (c *counting) StreamCh() <-chan net.Conn { return c.streams }

type counting struct {
	*memberlist.NetTransport
	n       *atomic.Int64
	streams chan net.Conn
}

func (c *counting) WriteTo(b []byte, addr string) (time.Time, error) {
	c.n.Add(int64(len(b)))
	return c.NetTransport.WriteTo(b, addr)
}

func (c *counting) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	c.n.Add(int64(len(b)))
	return c.NetTransport.WriteToAddress(b, a)
}

func (c *counting) DialTimeout(addr string, t time.Duration) (net.Conn, error) {
	conn, err := c.NetTransport.DialTimeout(addr, t)
	if err != nil {
		return nil, err
	}
	return &countConn{Conn: conn, n: c.n}, nil
}

func (c *counting) DialAddressTimeout(a memberlist.Address, t time.Duration) (net.Conn, error) {
	conn, err := c.NetTransport.DialAddressTimeout(a, t)
	if err != nil {
		return nil, err
	}
	return &countConn{Conn: conn, n: c.n}, nil
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
