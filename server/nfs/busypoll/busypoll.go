// Package busypoll makes a TCP server answer back-to-back requests sooner:
// a connection's Read, finding no data, retries the socket for a short
// window before it parks on Go's network poller — but only while the
// process has CPU to spare.
//
// Why: NFS over TCP is request/response. A client sends its next call a few
// microseconds after it reads a reply, but a reader that parks on the poller
// pays for parking, for epoll and for waking a sleeping thread on every
// call; on loopback or a fast network that is as much as serving the call.
// A reader still spinning when the call arrives answers it at once. This is
// the user-space form of the kernel's SO_BUSY_POLL, which does not apply to
// TCP on loopback or on most virtual NICs.
//
// When it spins: a spinning reader holds one of the process's Ps (Go's
// right to run code) and burns CPU, which is only free when the server is
// not busy. So a Read spins only when fewer than GOMAXPROCS-1 other
// connections are busy (have a request in hand) and fewer than GOMAXPROCS-1
// others are spinning: one P always stays free for the rest of the process.
// With GOMAXPROCS 1 it never spins. Between tries it yields the CPU
// (sched_yield), and it stops at once when a yield ran another thread (the
// CPU is wanted), when another connection becomes busy, or after Window;
// after a spin that found nothing it skips spinning for a few Reads
// (backing off exponentially). An idle connection therefore parks and holds
// no thread. Deadlines and Close behave as on the wrapped *net.TCPConn,
// because waiting is still the poller's.
package busypoll

import (
	"errors"
	"io"
	"net"
	"runtime"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// DefaultWindow is how long a Read spins at most before it parks. An NFS
// client with more calls to make sends the next one within tens of
// microseconds of reading a reply; a longer window only burns CPU on
// connections that have gone quiet.
const DefaultWindow = 50 * time.Microsecond

// yieldedAway: a sched_yield that takes longer than this ran another
// thread, so the CPU is wanted and the reader stops spinning.
const yieldedAway = 5 * time.Microsecond

// maxBackoff caps the backoff after spins that found nothing at 2^6-1
// Reads that park without spinning.
const maxBackoff = 6

// Listener wraps a TCP listener; its connections busy-poll on Read.
type Listener struct {
	net.Listener
	window   time.Duration
	yielded  time.Duration // yieldedAway; tests raise it
	limit    int32         // GOMAXPROCS-1: busy or spinning connections that leave a P free
	busy     atomic.Int32  // connections holding a request (between a Read that returned data and their next Read)
	spinners atomic.Int32

	waits [nOutcomes]atomic.Uint64
}

// Outcome is how a Read got its data.
type Outcome int

const (
	Ready  Outcome = iota // the first read(2) returned (data, end of file or an error)
	Caught                // a read(2) while spinning returned
	Parked                // it slept on the poller first
	nOutcomes
)

func (o Outcome) String() string {
	switch o {
	case Ready:
		return "ready"
	case Caught:
		return "caught"
	case Parked:
		return "parked"
	}
	return "outcome(" + strconv.Itoa(int(o)) + ")"
}

// Waits returns how many Reads ended with outcome o.
func (l *Listener) Waits(o Outcome) uint64 { return l.waits[o].Load() }

var waitsDesc = prometheus.NewDesc("strata_nfs_busypoll_reads_total",
	"Reads of NFS connections by how they got their data: ready (at once), caught (by spinning), parked (after sleeping on the poller).",
	[]string{"outcome"}, nil)

// Describe and Collect make the Listener a prometheus.Collector of
// strata_nfs_busypoll_reads_total{outcome}.
func (l *Listener) Describe(ch chan<- *prometheus.Desc) { ch <- waitsDesc }

func (l *Listener) Collect(ch chan<- prometheus.Metric) {
	for o := range nOutcomes {
		ch <- prometheus.MustNewConstMetric(waitsDesc, prometheus.CounterValue, float64(l.Waits(o)), o.String())
	}
}

// Listen wraps l. window is the longest one Read spins (0: DefaultWindow;
// negative: never spin, Read is the wrapped connection's). Connections that
// are not *net.TCPConn are returned as they are.
func Listen(l net.Listener, window time.Duration) *Listener {
	if window == 0 {
		window = DefaultWindow
	}
	return &Listener{Listener: l, window: window, yielded: yieldedAway, limit: int32(runtime.GOMAXPROCS(0) - 1)}
}

// Accept returns the next connection, busy-polling when it is TCP.
func (l *Listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil || l.window < 0 || l.limit < 1 {
		return c, err
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return c, nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return c, nil
	}
	return &Conn{TCPConn: tc, rc: rc, l: l}, nil
}

// Conn is a TCP connection whose Read busy-polls.
type Conn struct {
	*net.TCPConn
	rc   syscall.RawConn
	l    *Listener
	busy atomic.Bool // counted in l.busy

	// reader's state (Read is not called concurrently)
	fails int // spins in a row that found no data
	skip  int // Reads left that park without spinning
}

// Read reads like net.Conn.Read; see the package doc for how it waits.
func (c *Conn) Read(p []byte) (int, error) {
	c.idle()
	if len(p) == 0 {
		return 0, nil
	}
	var n int
	var rerr error
	outcome := Ready
	err := c.rc.Read(func(fd uintptr) bool {
		n, rerr = readRetry(int(fd), p)
		if rerr != unix.EAGAIN {
			return true
		}
		if outcome != Ready {
			return false // woken without data: park again
		}
		outcome = Parked
		if c.spin(int(fd), p, &n, &rerr) {
			outcome = Caught
			return true
		}
		return false
	})
	c.l.waits[outcome].Add(1)
	if err == nil {
		err = rerr
	}
	switch {
	case err != nil:
		return 0, &net.OpError{Op: "read", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
	case n == 0:
		return 0, io.EOF
	}
	if c.busy.CompareAndSwap(false, true) {
		c.l.busy.Add(1)
	}
	return n, nil
}

// spin retries read(2) on fd while spinning is allowed; true when it read
// (or failed), false to park.
func (c *Conn) spin(fd int, p []byte, n *int, rerr *error) bool {
	l := c.l
	if c.skip > 0 {
		c.skip--
		return false
	}
	if l.busy.Load() >= l.limit {
		return false
	}
	if l.spinners.Add(1) > l.limit {
		l.spinners.Add(-1)
		return false
	}
	defer l.spinners.Add(-1)
	start := time.Now()
	for {
		t := time.Now()
		unix.RawSyscall(unix.SYS_SCHED_YIELD, 0, 0, 0)
		if *n, *rerr = readRetry(fd, p); *rerr != unix.EAGAIN {
			c.fails = 0
			return true
		}
		now := time.Now()
		if l.busy.Load() >= l.limit || now.Sub(t) > l.yielded {
			return false // the CPU is wanted: no backoff, the connection did nothing wrong
		}
		if now.Sub(start) > l.window {
			c.fails = min(c.fails+1, maxBackoff)
			c.skip = 1<<c.fails - 1
			return false
		}
	}
}

// idle marks the connection as no longer holding a request.
func (c *Conn) idle() {
	if c.busy.CompareAndSwap(true, false) {
		c.l.busy.Add(-1)
	}
}

// Close closes the connection.
func (c *Conn) Close() error {
	c.idle()
	return c.TCPConn.Close()
}

// readRetry is read(2), retried on EINTR.
func readRetry(fd int, p []byte) (int, error) {
	for {
		n, err := unix.Read(fd, p)
		if !errors.Is(err, unix.EINTR) {
			return n, err
		}
	}
}
