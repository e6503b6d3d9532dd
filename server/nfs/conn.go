package nfs

import (
	"encoding/binary"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/strata-nix/strata/server/nfs/guard"
)

// conn is the one owner of an accepted connection, from Accept to Close.
// go-nfs serves it as a net.Conn, but every byte passes through here:
//
//   - It reads each RPC record once, through the guard (guard.Conn's
//     ReadRecord: deadlines, size cap, the bounded record check), answers
//     the hot calls itself (READ, LOOKUP, GETATTR, READDIRPLUS and COMMIT of
//     NFSv3: see fastpath.go) when they succeed, and NFSACL's NULL and
//     GETACL (nfsacl.go), and hands every other
//     record to go-nfs byte for byte, so its answers and errors are go-nfs's
//     own.
//   - It writes go-nfs's replies and its own as whole records, never
//     interleaved (RPC over TCP lets replies come back in any order).
//   - It closes the socket on the first read or write error, on every path
//     (fast path, chunked READ replies, go-nfs's reply writer), and at shutdown. After
//     that, Read returns the error (go-nfs's reader goroutine then ends) and
//     Write accepts and drops go-nfs's replies: go-nfs never sees a write
//     error, because its writer goroutine stops on one and leaves the
//     reader blocked handing it the next reply, for good.
//   - It counts requests and error replies for the metrics.
type conn struct {
	gc *guard.Conn
	e  *Export
	m  *metrics

	// read side, used only by go-nfs's reader goroutine
	pass []byte // bytes of the current record for go-nfs not yet read

	wmu  sync.Mutex
	wbuf []byte // go-nfs reply bytes that are not yet a whole record

	pmu     sync.Mutex
	pending map[uint32]call // xid -> call passed to go-nfs, for reply metrics

	closed   atomic.Bool
	readErr  error // set by the reader goroutine when it failed
	closeOne sync.Once
	onClose  func()
}

var _ net.Conn = (*conn)(nil)

func newConn(c *guard.Conn, e *Export, onClose func()) *conn {
	s := &conn{gc: c, e: e, m: e.metrics, pending: make(map[uint32]call), onClose: onClose}
	s.m.conns.Inc()
	return s
}

// Read gives go-nfs the records the fast path did not answer. After an
// error the connection is closed and every later Read returns that error.
func (c *conn) Read(b []byte) (int, error) {
	for {
		if len(c.pass) > 0 {
			n := copy(b, c.pass)
			c.pass = c.pass[n:]
			return n, nil
		}
		if c.readErr != nil {
			return 0, c.readErr
		}
		if c.closed.Load() {
			c.readErr = net.ErrClosed
			return 0, c.readErr
		}
		rec, call, err := c.gc.ReadRecord()
		if err != nil {
			return 0, c.failRead(err)
		}
		handled, err := c.nfsacl(rec[4:], call)
		if !handled && err == nil {
			handled, err = c.fast(rec[4:], call)
		}
		if err != nil {
			return 0, c.failRead(err) // the reply could not be written
		}
		if !handled {
			clampReadCount(rec[4:], call)
			c.onCall(call)
			c.pass = rec
		}
	}
}

// failRead closes the connection and remembers why. go-nfs closes the
// connection itself after io.EOF and only then; any other error leaves it
// to us.
func (c *conn) failRead(err error) error {
	c.readErr = err
	c.Close()
	return err
}

// Write takes go-nfs's reply stream and writes it in whole records. It
// never fails: after a write error, or once the connection is closed, the
// bytes are dropped (see conn).
func (c *conn) Write(b []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.closed.Load() {
		return len(b), nil
	}
	if len(c.wbuf) == 0 && wholeRecords(b) == len(b) {
		if _, err := c.gc.Write(b); err != nil {
			c.Close()
			return len(b), nil
		}
		c.replies(b)
		return len(b), nil
	}
	c.wbuf = append(c.wbuf, b...)
	k := wholeRecords(c.wbuf)
	if k == 0 {
		return len(b), nil
	}
	if _, err := c.gc.Write(c.wbuf[:k]); err != nil {
		c.Close()
		return len(b), nil
	}
	c.replies(c.wbuf[:k])
	c.wbuf = c.wbuf[:copy(c.wbuf, c.wbuf[k:])]
	if cap(c.wbuf) > 64<<10 && len(c.wbuf) == 0 {
		c.wbuf = nil // let a large buffer go
	}
	return len(b), nil
}

// errConnClosed is the fast path's error for a reply to a closed connection.
var errConnClosed = errors.New("nfs connection closed")

// writeRecord writes one reply of the fast path (marker included). An error
// closes the connection.
func (c *conn) writeRecord(r []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.closed.Load() {
		return errConnClosed
	}
	if _, err := c.gc.Write(r); err != nil {
		c.Close()
		return err
	}
	return nil
}

// wholeRecords returns the length of the longest prefix of b made of
// complete records.
func wholeRecords(b []byte) int {
	off := 0
	for off+4 <= len(b) {
		n := int(binary.BigEndian.Uint32(b[off:]) & 0x7fffffff)
		if off+4+n > len(b) {
			break
		}
		off += 4 + n
	}
	return off
}

// replies reports each complete record in b to the metrics.
func (c *conn) replies(b []byte) {
	for len(b) >= 4 {
		n := int(binary.BigEndian.Uint32(b) & 0x7fffffff)
		c.onReply(b[4 : 4+min(n, 64)])
		b = b[4+n:]
	}
}

// Close closes the socket once, releases the guard's slots and drops the
// connection from the export. It is safe from any goroutine.
func (c *conn) Close() error {
	c.closed.Store(true)
	err := net.ErrClosed
	c.closeOne.Do(func() {
		err = c.gc.Close()
		c.m.conns.Dec()
		if c.onClose != nil {
			c.onClose()
		}
	})
	return err
}

func (c *conn) LocalAddr() net.Addr  { return c.gc.LocalAddr() }
func (c *conn) RemoteAddr() net.Addr { return c.gc.RemoteAddr() }

// Deadlines are the guard's; go-nfs sets none.
func (c *conn) SetDeadline(t time.Time) error      { return c.gc.SetDeadline(t) }
func (c *conn) SetReadDeadline(t time.Time) error  { return c.gc.SetReadDeadline(t) }
func (c *conn) SetWriteDeadline(t time.Time) error { return c.gc.SetWriteDeadline(t) }
