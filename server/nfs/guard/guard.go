// Package guard is the front guard of strata's NFS listener: a net.Listener
// wrapper that admits only allowed clients, caps concurrent connections,
// closes idle and stalled connections, and checks every ONC RPC record before
// go-nfs reads a byte of it.
//
// Why it exists: go-nfs v0.0.4 decodes XDR lengths without bounds (a 48-byte
// call with a credential length of 0x7ffffff0 makes it allocate gigabytes),
// has no recover in its per-connection goroutines (a panic there kills the
// whole server, and a wrapper cannot recover a goroutine it does not own),
// no deadlines and no connection limit, and leaves a connection open after
// a decode error. The record check below is therefore the protection: a
// record reaches go-nfs only once it is complete, single-fragment, within the
// size cap, a well-formed RPC call, and — for NFSv3 and MOUNTv3 — has every
// variable-length argument go-nfs will read inside its bounds (see ParseCall).
//
// A violating connection is closed and counted by reason; everyone else keeps
// being served.
package guard

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Defaults for the zero fields of Options.
const (
	// DefaultMaxConns is enough for hundreds of builders using nconnect.
	DefaultMaxConns = 4096
	// DefaultIdleTimeout exceeds the Linux client's own 5-minute idle
	// disconnect, so well-behaved clients close first (as with knfsd's 6).
	DefaultIdleTimeout = 6 * time.Minute
	// DefaultRecordTimeout bounds how long one record may take to arrive
	// once its first byte has (slowloris).
	DefaultRecordTimeout = 30 * time.Second
	// DefaultMaxRecord caps one call record. Calls to a read-only export are
	// small (a handle, a name, at most 800 bytes of auth); the cap leaves
	// room for a 1 MiB WRITE, which go-nfs answers with NFS3ERR_ROFS.
	DefaultMaxRecord = 1<<20 + 4<<10
	// DefaultMaxBuffered bounds the bytes all connections together may hold
	// in records being received; a connection that would exceed it is
	// closed as a bad record. Small records (up to smallRecord) are always
	// admitted.
	DefaultMaxBuffered = 64 << 20

	smallRecord = 64 << 10
	logEvery    = time.Minute
	maxLogAddrs = 4096
)

// Options configure a guard. Zero values take the defaults above, except
// Allow: an empty allowlist is an error (the guard fails closed).
type Options struct {
	// Allow lists the client networks admitted (config key nfs.allow). It
	// must not be empty: admit every client explicitly with 0.0.0.0/0 and
	// ::/0. Build it with ParseAllow.
	Allow []netip.Prefix
	// MaxConns is the most concurrent connections; more are closed at accept.
	MaxConns int
	// MaxConnsPerClient is the most concurrent connections from one client
	// address (config key nfs.max_conns_per_client), so one client cannot
	// take every slot; 0 means MaxConns.
	MaxConnsPerClient int
	// IdleTimeout closes a connection that starts no record for this long.
	IdleTimeout time.Duration
	// RecordTimeout closes a connection whose record does not complete
	// within this long of its first byte, or that leaves a reply untaken
	// this long.
	RecordTimeout time.Duration
	// MaxRecord is the largest record accepted, in bytes.
	MaxRecord int
	// MaxBuffered bounds the bytes of partly received records over all
	// connections.
	MaxBuffered int64
}

// ErrEmptyAllow is ParseAllow's error for a list with no entries.
var ErrEmptyAllow = errors.New("nfs.allow is empty, which would refuse every client: list the client networks, or allow every client explicitly with 0.0.0.0/0 and ::/0")

// AllowError is ParseAllow's error for a bad entry.
type AllowError struct {
	Entry string // as written
	Want  string // what an entry must be
}

func (e *AllowError) Error() string {
	return fmt.Sprintf("nfs.allow entry %q: want %s", e.Entry, e.Want)
}

// ParseAllow is the one parser of the nfs.allow config key: CIDR prefixes
// or single addresses, blank entries ignored. IPv4-mapped IPv6 prefixes
// (::ffff:10.0.0.0/104) are normalised to their IPv4 form, since client
// addresses are compared unmapped. An empty list is ErrEmptyAllow; other
// errors are *AllowError naming the first bad entry.
func ParseAllow(entries []string) ([]netip.Prefix, error) {
	out := make([]netip.Prefix, 0, len(entries))
	for _, e := range entries {
		e = strings.TrimSpace(e)
		if e == "" {
			continue
		}
		p, err := netip.ParsePrefix(e)
		if err != nil {
			a, aerr := netip.ParseAddr(e)
			if aerr != nil {
				return nil, &AllowError{Entry: e, Want: "a CIDR such as 10.0.0.0/8"}
			}
			a = a.Unmap()
			p = netip.PrefixFrom(a, a.BitLen())
		}
		if p.Addr().Is4In6() {
			if p.Bits() < 96 {
				return nil, &AllowError{Entry: e, Want: "an IPv4-mapped prefix of at least 96 bits (::ffff:10.0.0.0/104 is 10.0.0.0/8)"}
			}
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		out = append(out, p.Masked())
	}
	if len(out) == 0 {
		return nil, ErrEmptyAllow
	}
	return out, nil
}

func (o Options) withDefaults() (Options, error) {
	if o.MaxConns < 0 || o.MaxConnsPerClient < 0 || o.IdleTimeout < 0 || o.RecordTimeout < 0 || o.MaxRecord < 0 || o.MaxBuffered < 0 {
		return o, errors.New("guard options: negative limit")
	}
	if len(o.Allow) == 0 {
		return o, fmt.Errorf("guard options: %w", ErrEmptyAllow)
	}
	if o.MaxConns == 0 {
		o.MaxConns = DefaultMaxConns
	}
	if o.MaxConnsPerClient == 0 || o.MaxConnsPerClient > o.MaxConns {
		o.MaxConnsPerClient = o.MaxConns
	}
	if o.IdleTimeout == 0 {
		o.IdleTimeout = DefaultIdleTimeout
	}
	if o.RecordTimeout == 0 {
		o.RecordTimeout = DefaultRecordTimeout
	}
	if o.MaxRecord == 0 {
		o.MaxRecord = DefaultMaxRecord
	}
	if o.MaxRecord < MinCall {
		return o, fmt.Errorf("guard options: max record %d is below the smallest call (%d bytes)", o.MaxRecord, MinCall)
	}
	if o.MaxBuffered == 0 {
		o.MaxBuffered = DefaultMaxBuffered
	}
	return o, nil
}

// Reason is why the guard closed a connection; it labels the rejected metric.
type Reason int

const (
	ReasonAllowlist Reason = iota // client address not in Options.Allow
	ReasonCap                     // Options.MaxConns or MaxConnsPerClient reached
	ReasonIdle                    // idle, record or reply timeout
	ReasonRecord                  // a record failed the check
)

func (r Reason) String() string {
	switch r {
	case ReasonAllowlist:
		return "allowlist"
	case ReasonCap:
		return "cap"
	case ReasonIdle:
		return "idle"
	case ReasonRecord:
		return "record"
	}
	return fmt.Sprintf("reason(%d)", int(r))
}

// Listener is the guarded listener. Accept returns only admitted
// connections, as *Conn.
type Listener struct {
	inner net.Listener
	opts  Options
	log   *slog.Logger
	m     *metrics

	allow    atomic.Pointer[[]netip.Prefix]
	active   atomic.Int64
	buffered atomic.Int64

	perMu     sync.Mutex
	perClient map[netip.Addr]int

	logMu   sync.Mutex
	logSeen map[string]*logState

	// acceptBackoff bounds the wait after a temporary accept error
	// (tests lower it).
	acceptBackoff time.Duration
}

type logState struct {
	last       time.Time
	suppressed int
}

// Listen wraps inner. log may be nil (logs are dropped); reg may be nil
// (metrics are kept but not registered). Registering the metrics twice in
// one registry reuses the first set.
func Listen(inner net.Listener, opts Options, log *slog.Logger, reg prometheus.Registerer) (*Listener, error) {
	o, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	l := &Listener{inner: inner, opts: o, log: log, m: m, logSeen: map[string]*logState{},
		perClient: map[netip.Addr]int{}, acceptBackoff: time.Second}
	l.SetAllow(o.Allow)
	return l, nil
}

// SetAllow replaces the allowlist for connections accepted from now on
// (e.g. after a config reload); open connections are not re-checked. An
// empty list refuses every client.
func (l *Listener) SetAllow(allow []netip.Prefix) {
	a := append([]netip.Prefix(nil), allow...)
	l.allow.Store(&a)
}

// Active returns the number of open guarded connections.
func (l *Listener) Active() int { return int(l.active.Load()) }

// Addr returns the inner listener's address.
func (l *Listener) Addr() net.Addr { return l.inner.Addr() }

// Close closes the inner listener; open connections stay open.
func (l *Listener) Close() error { return l.inner.Close() }

// Accept waits for the next admitted connection. Refused connections are
// closed here, counted and logged (once per address per minute); they never
// reach the caller. A temporary accept error (out of file descriptors:
// EMFILE, ENFILE; ENOBUFS, ENOMEM; a connection aborted before it was
// accepted) is counted in strata_nfs_guard_accept_errors_total, logged at
// most once a minute, and retried after a backoff of 5 ms doubling to 1 s:
// the connections already open keep being served, and accepting resumes once
// descriptors are free. Other errors (the listener was closed) are returned.
func (l *Listener) Accept() (net.Conn, error) {
	var delay time.Duration
	var lastLog time.Time
	for {
		c, err := l.inner.Accept()
		if err != nil {
			errno, temporary := temporaryAccept(err)
			if !temporary {
				return nil, err
			}
			l.m.acceptErrors.WithLabelValues(errno).Inc()
			delay = min(max(2*delay, 5*time.Millisecond), l.acceptBackoff)
			if now := time.Now(); now.Sub(lastLog) >= logEvery {
				lastLog = now
				l.log.Warn("nfs accept failed; retrying", "err", err, "retry_in", delay)
			}
			time.Sleep(delay)
			continue
		}
		delay = 0
		addr := remoteAddr(c)
		// Counted before the close, so a client that sees the close sees
		// the count.
		if !l.allowed(addr) {
			l.m.rejected.WithLabelValues(ReasonAllowlist.String()).Inc()
			c.Close()
			l.logRefusal(addr, ReasonAllowlist, "client not in nfs.allow")
			continue
		}
		if n := l.active.Add(1); n > int64(l.opts.MaxConns) {
			l.active.Add(-1)
			l.m.rejected.WithLabelValues(ReasonCap.String()).Inc()
			c.Close()
			l.logRefusal(addr, ReasonCap, fmt.Sprintf("connection cap of %d reached (nfs.max_conns)", l.opts.MaxConns))
			continue
		}
		if !l.takeClientSlot(addr) {
			l.active.Add(-1)
			l.m.rejected.WithLabelValues(ReasonCap.String()).Inc()
			c.Close()
			l.logRefusal(addr, ReasonCap, fmt.Sprintf("per-client cap of %d reached (nfs.max_conns_per_client)", l.opts.MaxConnsPerClient))
			continue
		}
		l.m.accepted.Inc()
		l.m.current.Inc()
		return &Conn{Conn: c, l: l, addr: addr, br: bufio.NewReaderSize(c, 4096)}, nil
	}
}

// temporaryAccept says whether an accept error is worth retrying, and
// names its errno for the metric.
func temporaryAccept(err error) (string, bool) {
	for _, e := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED, syscall.EPROTO, syscall.EPERM} {
		if errors.Is(err, e) {
			return unixErrName(e), true
		}
	}
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return "timeout", true
	}
	return "", false
}

func unixErrName(e syscall.Errno) string {
	switch e {
	case syscall.EMFILE:
		return "emfile"
	case syscall.ENFILE:
		return "enfile"
	case syscall.ENOBUFS:
		return "enobufs"
	case syscall.ENOMEM:
		return "enomem"
	case syscall.ECONNABORTED:
		return "econnaborted"
	case syscall.EPROTO:
		return "eproto"
	case syscall.EPERM:
		return "eperm"
	}
	return "other"
}

func (l *Listener) takeClientSlot(a netip.Addr) bool {
	l.perMu.Lock()
	defer l.perMu.Unlock()
	if l.perClient[a] >= l.opts.MaxConnsPerClient {
		return false
	}
	l.perClient[a]++
	return true
}

func (l *Listener) releaseClientSlot(a netip.Addr) {
	l.perMu.Lock()
	defer l.perMu.Unlock()
	if l.perClient[a]--; l.perClient[a] <= 0 {
		delete(l.perClient, a)
	}
}

func remoteAddr(c net.Conn) netip.Addr {
	if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil {
		return ap.Addr().Unmap()
	}
	return netip.Addr{}
}

func (l *Listener) allowed(a netip.Addr) bool { return Admits(*l.allow.Load(), a) }

// Admits is the allowlist check: whether allow (as ParseAllow makes it)
// admits client address a (IPv4-mapped addresses are compared unmapped).
// An empty list admits no one.
func Admits(allow []netip.Prefix, a netip.Addr) bool {
	a = a.Unmap()
	for _, p := range allow {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// logRefusal logs a refusal at most once per address per logEvery, with
// the number of refusals suppressed since the last line.
func (l *Listener) logRefusal(a netip.Addr, r Reason, msg string) {
	key := a.String()
	now := time.Now()
	l.logMu.Lock()
	s := l.logSeen[key]
	if s != nil && now.Sub(s.last) < logEvery {
		s.suppressed++
		l.logMu.Unlock()
		return
	}
	if s == nil {
		if len(l.logSeen) >= maxLogAddrs {
			for k, v := range l.logSeen {
				if now.Sub(v.last) >= logEvery {
					delete(l.logSeen, k)
				}
			}
			if len(l.logSeen) >= maxLogAddrs {
				l.logMu.Unlock()
				return // flooded from too many addresses: the metric still counts
			}
		}
		s = &logState{}
		l.logSeen[key] = s
	}
	suppressed := s.suppressed
	s.last, s.suppressed = now, 0
	l.logMu.Unlock()
	l.log.Warn("nfs guard closed connection", "client", key, "reason", r.String(), "detail", msg, "suppressed", suppressed)
}

// ErrClosedByGuard is wrapped by ReadRecord's errors for a connection the
// guard refused (bad record, timeout): its owner closes it.
var ErrClosedByGuard = errors.New("connection refused by nfs guard")

// Conn is an admitted connection. Its owner reads checked records with
// ReadRecord, writes replies with Write, and closes
// it on the first error of either; Close releases the connection's slots
// once. Read is an adapter for a server that reads a byte stream (go-nfs
// directly): it hands out checked records and closes the connection itself
// on any error.
type Conn struct {
	net.Conn
	l    *Listener
	addr netip.Addr
	br   *bufio.Reader // batches small records into few read syscalls

	out []byte // Read: checked record (marker included) not yet read
	buf []byte // receive buffer, reused for small records

	idleSet  time.Time    // when the idle deadline was last set
	inRecord bool         // the record deadline is set (not the idle one)
	writeSet atomic.Int64 // when the write deadline was last set (Unix ns)
	once     sync.Once
	dead     error
	selfOwn  atomic.Bool // Read was used: the Conn closes itself on errors
}

// Client returns the client's address (IPv4 unmapped).
func (c *Conn) Client() netip.Addr { return c.addr }

// Read returns bytes of the current checked record; when it is used up it
// receives, checks and buffers the next one. On any error the connection is
// closed and the error returned (io.EOF for a clean close between records).
func (c *Conn) Read(p []byte) (int, error) {
	c.selfOwn.Store(true)
	if len(c.out) == 0 {
		if c.dead != nil {
			return 0, c.dead
		}
		rec, _, err := c.ReadRecord()
		if err != nil {
			c.dead = err
			c.Close()
			return 0, err
		}
		c.out = rec
	}
	n := copy(p, c.out)
	c.out = c.out[n:]
	return n, nil
}

// slack is how stale a lazily renewed deadline of timeout d may get: an
// eighth of d, at most a second.
func slack(d time.Duration) time.Duration { return min(time.Second, d/8) }

// recordDeadline starts the record timeout, once per record.
func (c *Conn) recordDeadline() {
	if !c.inRecord {
		c.Conn.SetReadDeadline(time.Now().Add(c.l.opts.RecordTimeout))
		c.inRecord = true
	}
}

// ReadRecord receives the next record and checks it (CheckMarker,
// ParseCall). It returns the record with its 4-byte marker, valid until the
// next ReadRecord, and its parsed call. io.EOF is a clean close between
// records; any other error (a read error, a timeout, a refused record: those
// are counted and logged here and wrap ErrClosedByGuard) means the
// connection is unusable. ReadRecord never closes the connection: its
// owner does. It must not be called concurrently.
func (c *Conn) ReadRecord() ([]byte, Call, error) {
	l := c.l
	var hdr [4]byte
	// Deadlines cost a timer update each, so they are set only when needed:
	// the idle one is renewed at most every slack while records keep coming
	// (so an idle connection may be closed up to that much early), the
	// record one only when the rest of a record is not already buffered.
	if now := time.Now(); c.inRecord || now.Sub(c.idleSet) > slack(l.opts.IdleTimeout) {
		c.Conn.SetReadDeadline(now.Add(l.opts.IdleTimeout))
		c.idleSet, c.inRecord = now, false
	}
	if _, err := io.ReadFull(c.br, hdr[:1]); err != nil {
		return nil, Call{}, c.readFailed(err, "waiting for a record")
	}
	if c.br.Buffered() < 3 {
		c.recordDeadline()
	}
	if _, err := io.ReadFull(c.br, hdr[1:]); err != nil {
		return nil, Call{}, c.readFailed(err, "record marker")
	}
	marker := uint32(hdr[0])<<24 | uint32(hdr[1])<<16 | uint32(hdr[2])<<8 | uint32(hdr[3])
	n, err := CheckMarker(marker, l.opts.MaxRecord)
	if err != nil {
		return nil, Call{}, c.reject(err)
	}
	if c.br.Buffered() < n {
		c.recordDeadline()
	}
	total := 4 + n
	if total > smallRecord {
		if l.buffered.Add(int64(total)) > l.opts.MaxBuffered {
			l.buffered.Add(-int64(total))
			return nil, Call{}, c.reject(&RecordError{Problem: ProblemSize, Detail: fmt.Sprintf("record of %d bytes: receive buffers of all connections are full", n)})
		}
		defer l.buffered.Add(-int64(total))
	}
	// Grow the buffer as bytes arrive, never by the declared length alone.
	buf := c.buf[:0]
	buf = append(buf, hdr[:]...)
	for len(buf) < total {
		chunk := min(total-len(buf), smallRecord)
		if cap(buf)-len(buf) < chunk {
			nb := make([]byte, len(buf), len(buf)+chunk+len(buf)/2)
			copy(nb, buf)
			buf = nb
		}
		m, err := io.ReadFull(c.br, buf[len(buf):len(buf)+chunk])
		buf = buf[:len(buf)+m]
		if err != nil {
			return nil, Call{}, c.readFailed(err, "record body")
		}
	}
	call, err := ParseCall(buf[4:])
	if err != nil {
		return nil, Call{}, c.reject(err)
	}
	if cap(buf) <= smallRecord+4 {
		c.buf = buf // keep small buffers; let large ones go
	} else {
		c.buf = nil
	}
	return buf, call, nil
}

// readFailed counts a timeout and turns a read error into ReadRecord's:
// io.EOF only for a clean close between records.
func (c *Conn) readFailed(err error, during string) error {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		c.l.m.rejected.WithLabelValues(ReasonIdle.String()).Inc()
		c.l.log.Debug("nfs guard closed connection", "client", c.addr.String(), "reason", ReasonIdle.String(), "during", during)
		return fmt.Errorf("nfs guard %s: timeout %s: %w", c.addr, during, ErrClosedByGuard)
	}
	if during == "waiting for a record" && errors.Is(err, io.EOF) {
		return io.EOF
	}
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

func (c *Conn) reject(err error) error {
	var re *RecordError
	problem := "other"
	if errors.As(err, &re) {
		problem = re.Problem.String()
	}
	c.l.m.rejected.WithLabelValues(ReasonRecord.String()).Inc()
	c.l.m.badRecords.WithLabelValues(problem).Inc()
	c.l.logRefusal(c.addr, ReasonRecord, err.Error())
	return fmt.Errorf("nfs guard %s: %w: %w", c.addr, err, ErrClosedByGuard)
}

// Write sends reply bytes. A client that stops taking its replies stalls
// the server's writer (and, when the reply is written on the reading
// goroutine, the reader too, so no read deadline fires): writes carry a
// deadline of RecordTimeout, renewed lazily like the idle one; a write that
// runs into it is counted as a timeout. Write closes the connection on an
// error only for a reader of Read (ReadRecord's owner closes it itself).
func (c *Conn) Write(b []byte) (int, error) {
	c.writeDeadline()
	n, err := c.Conn.Write(b)
	if err != nil {
		c.writeFailed(err)
	}
	return n, err
}

// writeDeadline renews the write deadline when it is older than the slack.
func (c *Conn) writeDeadline() {
	o := c.l.opts
	now := time.Now()
	if set := c.writeSet.Load(); now.UnixNano()-set > int64(slack(o.RecordTimeout)) {
		c.Conn.SetWriteDeadline(now.Add(o.RecordTimeout))
		c.writeSet.Store(now.UnixNano())
	}
}

// writeFailed counts a client that did not take its replies in time.
func (c *Conn) writeFailed(err error) {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		c.l.m.rejected.WithLabelValues(ReasonIdle.String()).Inc()
		c.l.log.Debug("nfs guard closed connection", "client", c.addr.String(), "reason", ReasonIdle.String(), "during", "writing a reply")
	}
	if c.selfOwn.Load() {
		c.Close()
	}
}

// Close closes the connection once and releases its slots.
func (c *Conn) Close() error {
	err := net.ErrClosed
	c.once.Do(func() {
		err = c.Conn.Close()
		c.l.active.Add(-1)
		c.l.releaseClientSlot(c.addr)
		c.l.m.current.Dec()
	})
	return err
}
