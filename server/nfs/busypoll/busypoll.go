// Package busypoll makes a TCP server answer back-to-back requests sooner:
// a connection's Read, finding no data, retries the socket for a short
// window (yielding the CPU between tries) before it parks on Go's network
// poller.
//
// Why: NFS over TCP is request/response. A client sends its next call a few
// microseconds after it reads a reply, but a reader that parks on the poller
// pays for parking, for epoll, and for the wakeup of a sleeping thread on
// each call — on loopback that is as much as the call itself. Spinning
// through that gap answers the next call from a thread that is still
// running. This is the user-space form of the kernel's SO_BUSY_POLL, which
// does not apply to TCP on loopback or on most virtual NICs.
//
// Cost and bounds: a spinning reader calls read(2) and sched_yield(2) in
// turn, so a runnable thread (a client on the same machine, another
// connection's work) takes the CPU at once; at most Options.MaxSpinners
// connections spin at a time (the others park at once), and each spins at
// most Options.Window per Read. An idle connection spins once, then parks:
// it holds no thread. Deadlines and Close behave as on the wrapped
// *net.TCPConn, because waiting is still the poller's.
package busypoll

import (
	"errors"
	"io"
	"net"
	"runtime"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultWindow is how long a Read spins before it parks. A Linux or Go
// NFS client sends its next call within tens of microseconds of reading a
// reply when it has one; a longer window only burns CPU on idle connections.
const DefaultWindow = 50 * time.Microsecond

// yieldedAway: a sched_yield that takes longer than this ran another
// thread, so the CPU is wanted and the reader stops spinning.
const yieldedAway = 5 * time.Microsecond

// Options configure a busy-polling listener. Zero values take defaults.
type Options struct {
	// Window is the longest one Read spins (default DefaultWindow). Negative
	// turns spinning off: Read is the wrapped connection's.
	Window time.Duration
	// MaxSpinners bounds how many connections spin at once (default
	// GOMAXPROCS).
	MaxSpinners int
}

// Listener wraps a TCP listener; its connections busy-poll on Read.
type Listener struct {
	net.Listener
	window   time.Duration
	max      int32
	spinners atomic.Int32
}

// Listen wraps l. Connections that are not *net.TCPConn are returned as they
// are.
func Listen(l net.Listener, o Options) *Listener {
	if o.Window == 0 {
		o.Window = DefaultWindow
	}
	if o.MaxSpinners <= 0 {
		o.MaxSpinners = runtime.GOMAXPROCS(0)
	}
	return &Listener{Listener: l, window: o.Window, max: int32(o.MaxSpinners)}
}

// Accept returns the next connection, busy-polling when it is TCP.
func (l *Listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil || l.window < 0 {
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
	rc syscall.RawConn
	l  *Listener

	// reader's state (Read is not called concurrently)
	fails int // spins in a row that found no data
	skip  int // waits left that park without spinning
}

// maxBackoff caps the backoff after failed spins at 2^6-1 waits.
const maxBackoff = 6

// Read reads like net.Conn.Read; see the package doc for how it waits.
func (c *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	var n int
	var rerr error
	spun := false
	err := c.rc.Read(func(fd uintptr) bool {
		n, rerr = readRetry(int(fd), p)
		if rerr != unix.EAGAIN || spun {
			return rerr != unix.EAGAIN
		}
		// First time without data: spin, unless recent spins on this
		// connection came to nothing or no spinner slot is free.
		spun = true
		if c.skip > 0 {
			c.skip--
			return false
		}
		if c.l.spinners.Add(1) > c.l.max {
			c.l.spinners.Add(-1)
			return false
		}
		defer c.l.spinners.Add(-1)
		start := time.Now()
		for {
			t := time.Now()
			unix.RawSyscall(unix.SYS_SCHED_YIELD, 0, 0, 0)
			if n, rerr = readRetry(int(fd), p); rerr != unix.EAGAIN {
				c.fails = 0
				return true
			}
			now := time.Now()
			if now.Sub(t) > yieldedAway || now.Sub(start) > c.l.window {
				// Back off: skip the next 1, 3, 7 ... 63 waits.
				c.fails = min(c.fails+1, maxBackoff)
				c.skip = 1<<c.fails - 1
				return false
			}
		}
	})
	if err == nil {
		err = rerr
	}
	switch {
	case err != nil:
		return max(n, 0), &net.OpError{Op: "read", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
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
