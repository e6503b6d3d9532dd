package nfs

import (
	"bufio"
	"encoding/binary"
	"io"
	"net"
	"sync"
)

// conn is the connection go-nfs serves. It sits between go-nfs and the
// accepted connection (in production the guard's, which has already checked
// every record) and does three things:
//
//   - It reads whole RPC records and answers the hot calls itself (READ,
//     LOOKUP, GETATTR of NFSv3: see fastpath.go) when they succeed. go-nfs
//     spends most of its time on those calls outside strata's code:
//     reflection-based XDR, three to four full-size buffer allocations and
//     copies per READ, and a hand-off to a writer goroutine per reply. Every
//     other call, and every hot call that would not succeed (a bad handle,
//     a missing name, a symlink or directory to READ...), is passed to
//     go-nfs byte for byte, so its answers and errors are go-nfs's own.
//   - It writes go-nfs's replies and its own as whole records, never
//     interleaved (RPC over TCP lets replies come back in any order).
//   - It counts requests and error replies for the metrics.
type conn struct {
	net.Conn
	e  *Export
	m  *metrics
	br *bufio.Reader

	// read side, used only by go-nfs's reader goroutine
	pass     []byte // bytes of the current record for go-nfs not yet read
	passLeft int    // bytes of a streamed (large) record still in br
	rec      []byte // receive buffer for small records
	marker   [4]byte

	wmu  sync.Mutex
	wbuf []byte // go-nfs reply bytes that are not yet a whole record

	pmu     sync.Mutex
	pending map[uint32]call // xid -> call passed to go-nfs, for reply metrics

	closeOne sync.Once
	onClose  func()
}

// maxFastRecord is the largest call record read whole and considered for
// the fast path; larger ones stream to go-nfs. A LOOKUP with the largest
// credential and verifier (400 bytes each), handle and name fits.
const maxFastRecord = 2048

func newConn(c net.Conn, e *Export, onClose func()) *conn {
	s := &conn{
		Conn: c, e: e, m: e.metrics, br: bufio.NewReaderSize(c, 16<<10),
		rec: make([]byte, 0, maxFastRecord+4), pending: make(map[uint32]call), onClose: onClose,
	}
	s.m.conns.Inc()
	return s
}

// Read gives go-nfs the records the fast path did not answer.
func (c *conn) Read(b []byte) (int, error) {
	for {
		if len(c.pass) > 0 {
			n := copy(b, c.pass)
			c.pass = c.pass[n:]
			return n, nil
		}
		if c.passLeft > 0 {
			n, err := c.br.Read(b[:min(len(b), c.passLeft)])
			c.passLeft -= n
			return n, err
		}
		if err := c.next(); err != nil {
			return 0, err
		}
	}
}

// next reads one record: answers it, or queues it for go-nfs.
func (c *conn) next() error {
	if _, err := io.ReadFull(c.br, c.marker[:]); err != nil {
		return err // io.EOF between records is a clean close for go-nfs
	}
	m := binary.BigEndian.Uint32(c.marker[:])
	n := int(m & 0x7fffffff)
	if m&(1<<31) == 0 || n > maxFastRecord {
		// A fragment (go-nfs refuses those) or a large record: stream it.
		if p, _ := c.br.Peek(min(n, 24)); len(p) > 0 {
			c.onCall(p)
		}
		c.pass, c.passLeft = c.marker[:], n
		return nil
	}
	rec := c.rec[:4+n]
	copy(rec, c.marker[:])
	if _, err := io.ReadFull(c.br, rec[4:]); err != nil {
		// go-nfs gets the partial record and the error, as it would have.
		return err
	}
	handled, err := c.fast(rec[4:])
	if err != nil {
		return err // the reply could not be written: the connection is gone
	}
	if !handled {
		c.onCall(rec[4:])
		c.pass = rec
	}
	return nil
}

// Write takes go-nfs's reply stream and writes it in whole records.
func (c *conn) Write(b []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if len(c.wbuf) == 0 && wholeRecords(b) == len(b) {
		if _, err := c.Conn.Write(b); err != nil {
			return 0, err
		}
		c.replies(b)
		return len(b), nil
	}
	c.wbuf = append(c.wbuf, b...)
	k := wholeRecords(c.wbuf)
	if k == 0 {
		return len(b), nil
	}
	if _, err := c.Conn.Write(c.wbuf[:k]); err != nil {
		return 0, err
	}
	c.replies(c.wbuf[:k])
	c.wbuf = c.wbuf[:copy(c.wbuf, c.wbuf[k:])]
	if cap(c.wbuf) > 64<<10 && len(c.wbuf) == 0 {
		c.wbuf = nil // let a large buffer go
	}
	return len(b), nil
}

// writeRecord writes one reply of the fast path (marker included).
func (c *conn) writeRecord(r []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_, err := c.Conn.Write(r)
	return err
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

func (c *conn) Close() error {
	c.closeOne.Do(func() {
		c.m.conns.Dec()
		if c.onClose != nil {
			c.onClose()
		}
	})
	return c.Conn.Close()
}
