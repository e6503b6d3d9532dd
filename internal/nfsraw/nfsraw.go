// Package nfsraw is a small NFSv3 and MOUNTv3 client over one TCP
// connection, for strata's tests and benchmarks: it sends exactly the calls
// it is asked for (any handle, any name, any procedure), one at a time, and
// hands back the raw status, so a test sees what the server said and a
// benchmark spends almost nothing on its side of the wire (no reflection,
// one reused receive buffer).
//
// It is not a general client: no retransmission, no portmapper, no
// fragmented replies.
package nfsraw

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"time"

	"github.com/strata-nix/strata/internal/xdr"
)

// ONC RPC program numbers.
const (
	ProgNFS   = 100003
	ProgMount = 100005
)

// NFSv3 procedures (RFC 1813).
const (
	ProcGetattr     = 1
	ProcLookup      = 3
	ProcReadlink    = 5
	ProcRead        = 6
	ProcReaddir     = 16
	ProcReaddirplus = 17
	ProcCommit      = 21
)

// NFSv3 status codes the tests look for.
const (
	NFS3OK          = 0
	NFS3ErrNoEnt    = 2
	NFS3ErrAcces    = 13
	NFS3ErrNotDir   = 20
	NFS3ErrIsDir    = 21
	NFS3ErrInval    = 22
	NFS3ErrROFS     = 30
	NFS3ErrStale    = 70
	NFS3ErrSrvFault = 10006
)

// Client is one connection. It is not safe for concurrent use.
type Client struct {
	c       net.Conn
	r       *bufio.Reader
	xid     uint32
	timeout time.Duration
	cred    []byte
	out     []byte // send buffer
	body    []byte // receive buffer: replies are views into it
}

// Dial connects to addr ("host:port"), whose port serves both MOUNT and NFS
// (as strata's export does).
func Dial(addr string) (*Client, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	return New(c), nil
}

// New uses c. Calls time out after 30 s (SetTimeout changes it).
func New(c net.Conn) *Client {
	auth := (&Enc{}).U32(0).Str("strata-test").U32(0).U32(0).U32(0).B // AUTH_UNIX, root
	return &Client{c: c, r: bufio.NewReaderSize(c, 64<<10), xid: 0x5157, timeout: 30 * time.Second,
		cred: (&Enc{}).U32(1).Opaque(auth).B}
}

// SetTimeout sets how long one call may take; 0 means no limit.
func (c *Client) SetTimeout(d time.Duration) { c.timeout = d }

// Close closes the connection.
func (c *Client) Close() error { return c.c.Close() }

// Enc appends XDR.
type Enc struct{ B []byte }

// U32 appends each v.
func (e *Enc) U32(vs ...uint32) *Enc {
	for _, v := range vs {
		e.B = binary.BigEndian.AppendUint32(e.B, v)
	}
	return e
}

// Raw appends p as it is.
func (e *Enc) Raw(p []byte) *Enc { e.B = append(e.B, p...); return e }
func (e *Enc) U64(v uint64) *Enc { e.B = binary.BigEndian.AppendUint64(e.B, v); return e }

// Opaque appends variable-length opaque data (length, bytes, padding).
func (e *Enc) Opaque(v []byte) *Enc {
	e.U32(uint32(len(v)))
	e.B = append(e.B, v...)
	for len(e.B)%4 != 0 {
		e.B = append(e.B, 0)
	}
	return e
}

func (e *Enc) Str(s string) *Enc { return e.Opaque([]byte(s)) }

// NoSattr appends an sattr3 that sets nothing.
func (e *Enc) NoSattr() *Enc { return e.U32(0).U32(0).U32(0).U32(0).U32(0).U32(0) }

// Dec reads XDR with strata's one bounded decoder (internal/xdr): a short
// buffer sets Err and yields zeros. B is what is left to read.
type Dec struct{ xdr.Decoder }

// OpaqueView returns variable-length opaque data without copying: valid
// until the client's next call.
func (d *Dec) OpaqueView() []byte { return d.Decoder.Opaque(math.MaxInt32, "opaque") }

// Opaque returns a copy of variable-length opaque data.
func (d *Dec) Opaque() []byte { return append([]byte(nil), d.OpaqueView()...) }

// Fattr is the part of fattr3 the tests compare.
type Fattr struct {
	Type, Mode, Nlink, UID, GID uint32
	Size, Fileid                uint64
	Mtime, Mnsec                uint32
}

func (d *Dec) Fattr() Fattr {
	var a Fattr
	a.Type, a.Mode, a.Nlink, a.UID, a.GID = d.U32(), d.U32(), d.U32(), d.U32(), d.U32()
	a.Size = d.U64()
	d.U64() // used
	d.U64() // rdev
	d.U64() // fsid
	a.Fileid = d.U64()
	d.U64() // atime
	a.Mtime, a.Mnsec = d.U32(), d.U32()
	d.U64() // ctime
	return a
}

// PostOpAttr reads post_op_attr: the attributes and whether they were sent.
func (d *Dec) PostOpAttr() (Fattr, bool) {
	if d.U32() == 0 {
		return Fattr{}, false
	}
	return d.Fattr(), true
}

// CallRecord frames one ONC RPC version-3 call of prog (record marker
// included) with credential cred (flavor and body, as encoded by Enc) and an
// AUTH_NULL verifier, appended to b.
func CallRecord(b []byte, xid, prog, proc uint32, cred, args []byte) []byte {
	start := len(b)
	b = append(b, 0, 0, 0, 0)
	b = binary.BigEndian.AppendUint32(b, xid)
	for _, v := range [...]uint32{0, 2, prog, 3, proc} { // CALL, RPC 2, program, version 3
		b = binary.BigEndian.AppendUint32(b, v)
	}
	b = append(b, cred...)
	b = append(b, 0, 0, 0, 0, 0, 0, 0, 0) // AUTH_NULL verifier
	b = append(b, args...)
	binary.BigEndian.PutUint32(b[start:], uint32(len(b)-start-4)|1<<31)
	return b
}

// Cred is the client's credential (AUTH_UNIX, root), for CallRecord.
func (c *Client) Cred() []byte { return c.cred }

// Write sends raw bytes (framed calls, or anything a test wants to send).
func (c *Client) Write(b []byte) (int, error) { return c.c.Write(b) }

// ReadReply reads one reply record and returns its xid and a decoder
// positioned after accept_stat SUCCESS; the decoder's views are valid until
// the next call or reply.
func (c *Client) ReadReply() (uint32, *Dec, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(c.r, hdr[:]); err != nil {
		return 0, nil, err
	}
	m := binary.BigEndian.Uint32(hdr[:])
	if m&(1<<31) == 0 {
		return 0, nil, errors.New("fragmented reply")
	}
	n := int(m & 0x7fffffff)
	if cap(c.body) < n {
		c.body = make([]byte, n)
	}
	body := c.body[:n]
	if _, err := io.ReadFull(c.r, body); err != nil {
		return 0, nil, err
	}
	d := &Dec{xdr.Decoder{B: body}}
	xid := d.U32()
	if d.U32() != 1 {
		return xid, nil, errors.New("not a reply")
	}
	if st := d.U32(); st != 0 {
		return xid, nil, fmt.Errorf("rpc denied (%d)", st)
	}
	d.U32()
	d.OpaqueView() // verifier
	if as := d.U32(); as != 0 {
		return xid, nil, fmt.Errorf("rpc accept_stat %d", as)
	}
	return xid, d, d.Err
}

// Call sends one version-3 call of prog and returns a decoder positioned
// after accept_stat SUCCESS; the decoder's views are valid until the next
// call.
func (c *Client) Call(prog, proc uint32, args []byte) (*Dec, error) {
	c.xid++
	c.out = CallRecord(c.out[:0], c.xid, prog, proc, c.cred, args)
	if c.timeout > 0 {
		c.c.SetDeadline(time.Now().Add(c.timeout))
	}
	if _, err := c.c.Write(c.out); err != nil {
		return nil, err
	}
	xid, d, err := c.ReadReply()
	if err != nil {
		return nil, err
	}
	if xid != c.xid {
		return nil, fmt.Errorf("reply xid %d, want %d", xid, c.xid)
	}
	return d, nil
}

// NFS calls NFSv3 procedure proc and returns its status.
func (c *Client) NFS(proc uint32, args *Enc) (uint32, *Dec, error) {
	d, err := c.Call(ProgNFS, proc, args.B)
	if err != nil {
		return 0, nil, err
	}
	return d.U32(), d, d.Err
}

// Mount asks MOUNT for path's root handle; a nonzero status is the
// server's mountstat3.
func (c *Client) Mount(path string) (uint32, []byte, error) {
	d, err := c.Call(ProgMount, 1, (&Enc{}).Str(path).B)
	if err != nil {
		return 0, nil, err
	}
	if st := d.U32(); st != 0 {
		return st, nil, nil
	}
	return 0, d.Opaque(), d.Err
}

// Lookup looks name up in directory dir.
func (c *Client) Lookup(dir []byte, name string) (uint32, []byte, Fattr, error) {
	st, d, err := c.NFS(ProcLookup, (&Enc{}).Opaque(dir).Str(name))
	if err != nil || st != NFS3OK {
		return st, nil, Fattr{}, err
	}
	fh := d.Opaque()
	a, _ := d.PostOpAttr()
	return st, fh, a, d.Err
}

// Getattr reads fh's attributes.
func (c *Client) Getattr(fh []byte) (uint32, Fattr, error) {
	st, d, err := c.NFS(ProcGetattr, (&Enc{}).Opaque(fh))
	if err != nil || st != NFS3OK {
		return st, Fattr{}, err
	}
	return st, d.Fattr(), d.Err
}

// ReadView reads count bytes at off; data is valid until the next call.
func (c *Client) ReadView(fh []byte, off uint64, count uint32) (st uint32, data []byte, eof bool, err error) {
	st, d, err := c.NFS(ProcRead, (&Enc{}).Opaque(fh).U64(off).U32(count))
	if err != nil || st != NFS3OK {
		return st, nil, false, err
	}
	d.PostOpAttr()
	d.U32()
	eof = d.U32() != 0
	return st, d.OpaqueView(), eof, d.Err
}

// Read is ReadView with a copy of the data.
func (c *Client) Read(fh []byte, off uint64, count uint32) (uint32, []byte, bool, error) {
	st, b, eof, err := c.ReadView(fh, off, count)
	return st, append([]byte(nil), b...), eof, err
}

// ReadAll reads a file to its end in 1 MiB calls.
func (c *Client) ReadAll(fh []byte) (uint32, []byte, error) {
	var out []byte
	for {
		st, b, eof, err := c.ReadView(fh, uint64(len(out)), 1<<20)
		if err != nil || st != NFS3OK {
			return st, nil, err
		}
		out = append(out, b...)
		if eof || len(b) == 0 {
			return st, out, nil
		}
	}
}

// Readlink reads a symlink's target.
func (c *Client) Readlink(fh []byte) (uint32, string, error) {
	st, d, err := c.NFS(ProcReadlink, (&Enc{}).Opaque(fh))
	if err != nil || st != NFS3OK {
		return st, "", err
	}
	d.PostOpAttr()
	return st, string(d.OpaqueView()), d.Err
}

// Dirent is one READDIR or READDIRPLUS entry (FH and Attr: PLUS only).
type Dirent struct {
	Name   string
	Cookie uint64
	Fileid uint64
	FH     []byte
	Attr   Fattr
}

// Readdirplus reads one page.
func (c *Client) Readdirplus(fh []byte, cookie, verf uint64, maxcount uint32) (st uint32, ents []Dirent, newVerf uint64, eof bool, err error) {
	st, d, err := c.NFS(ProcReaddirplus, (&Enc{}).Opaque(fh).U64(cookie).U64(verf).U32(maxcount).U32(maxcount))
	if err != nil || st != NFS3OK {
		return st, nil, 0, false, err
	}
	d.PostOpAttr()
	newVerf = d.U64()
	for d.U32() != 0 && d.Err == nil {
		var e Dirent
		e.Fileid = d.U64()
		e.Name = string(d.OpaqueView())
		e.Cookie = d.U64()
		e.Attr, _ = d.PostOpAttr()
		if d.U32() != 0 {
			e.FH = d.Opaque()
		}
		ents = append(ents, e)
	}
	eof = d.U32() != 0
	return st, ents, newVerf, eof, d.Err
}

// Readdir reads one page of names.
func (c *Client) Readdir(fh []byte, cookie, verf uint64, count uint32) (uint32, []Dirent, uint64, bool, error) {
	st, d, err := c.NFS(ProcReaddir, (&Enc{}).Opaque(fh).U64(cookie).U64(verf).U32(count))
	if err != nil || st != NFS3OK {
		return st, nil, 0, false, err
	}
	d.PostOpAttr()
	verf = d.U64()
	var ents []Dirent
	for d.U32() != 0 && d.Err == nil {
		var e Dirent
		e.Fileid = d.U64()
		e.Name = string(d.OpaqueView())
		e.Cookie = d.U64()
		ents = append(ents, e)
	}
	eof := d.U32() != 0
	return st, ents, verf, eof, d.Err
}

// ListAll reads a whole directory with READDIRPLUS pages from (cookie, verf).
func (c *Client) ListAll(fh []byte, cookie, verf uint64, maxcount uint32) ([]Dirent, error) {
	var all []Dirent
	for {
		st, ents, v, eof, err := c.Readdirplus(fh, cookie, verf, maxcount)
		if err != nil {
			return nil, err
		}
		if st != NFS3OK {
			return nil, fmt.Errorf("readdirplus: status %d", st)
		}
		all = append(all, ents...)
		if eof {
			return all, nil
		}
		if len(ents) == 0 {
			return nil, errors.New("readdirplus: empty page without eof")
		}
		cookie, verf = ents[len(ents)-1].Cookie, v
	}
}
