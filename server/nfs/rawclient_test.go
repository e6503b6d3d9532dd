//go:build integration

package nfs

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// rawClient speaks ONC RPC over TCP directly, so tests can send any handle,
// any name and every procedure, and see the exact NFS status.
type rawClient struct {
	c   net.Conn
	r   *bufio.Reader
	xid uint32
}

func dialRaw(addr string) (*rawClient, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	return &rawClient{c: c, r: bufio.NewReader(c), xid: 0x5157}, nil
}

func (rc *rawClient) Close() { rc.c.Close() }

type enc struct{ b []byte }

func (e *enc) u32(v uint32) *enc { e.b = binary.BigEndian.AppendUint32(e.b, v); return e }
func (e *enc) u64(v uint64) *enc { e.b = binary.BigEndian.AppendUint64(e.b, v); return e }
func (e *enc) opaque(v []byte) *enc {
	e.u32(uint32(len(v)))
	e.b = append(e.b, v...)
	for len(e.b)%4 != 0 {
		e.b = append(e.b, 0)
	}
	return e
}
func (e *enc) str(s string) *enc { return e.opaque([]byte(s)) }

// sattr3 with nothing set.
func (e *enc) noSattr() *enc { return e.u32(0).u32(0).u32(0).u32(0).u32(0).u32(0) }

type dec struct {
	b   []byte
	err error
}

func (d *dec) u32() uint32 {
	if len(d.b) < 4 {
		d.err = io.ErrUnexpectedEOF
		return 0
	}
	v := binary.BigEndian.Uint32(d.b)
	d.b = d.b[4:]
	return v
}
func (d *dec) u64() uint64 { return uint64(d.u32())<<32 | uint64(d.u32()) }
func (d *dec) opaque() []byte {
	n := int(d.u32())
	p := (n + 3) &^ 3
	if d.err != nil || n > len(d.b) || p > len(d.b) {
		d.err = io.ErrUnexpectedEOF
		return nil
	}
	v := append([]byte(nil), d.b[:n]...)
	d.b = d.b[p:]
	return v
}

type fattr struct {
	typ, mode, nlink, uid, gid uint32
	size, fileid               uint64
	mtime, mnsec               uint32
}

func (d *dec) fattr() fattr {
	var a fattr
	a.typ, a.mode, a.nlink, a.uid, a.gid = d.u32(), d.u32(), d.u32(), d.u32(), d.u32()
	a.size = d.u64()
	d.u64() // used
	d.u64() // rdev
	d.u64() // fsid
	a.fileid = d.u64()
	d.u64() // atime
	a.mtime, a.mnsec = d.u32(), d.u32()
	d.u64() // ctime
	return a
}

func (d *dec) postOpAttr() (fattr, bool) {
	if d.u32() == 0 {
		return fattr{}, false
	}
	return d.fattr(), true
}

// call sends one call and returns the reply's results (after accept_stat).
func (rc *rawClient) call(prog, proc uint32, args []byte) (*dec, error) {
	rc.xid++
	auth := (&enc{}).u32(0).str("strata-test").u32(0).u32(0).u32(0).b // AUTH_UNIX root
	msg := (&enc{}).u32(rc.xid).u32(0).u32(2).u32(prog).u32(3).u32(proc).
		u32(1).opaque(auth).u32(0).u32(0).b
	msg = append(msg, args...)
	rec := binary.BigEndian.AppendUint32(nil, uint32(len(msg))|1<<31)
	rc.c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := rc.c.Write(append(rec, msg...)); err != nil {
		return nil, err
	}
	var hdr [4]byte
	if _, err := io.ReadFull(rc.r, hdr[:]); err != nil {
		return nil, err
	}
	body := make([]byte, binary.BigEndian.Uint32(hdr[:])&0x7fffffff)
	if _, err := io.ReadFull(rc.r, body); err != nil {
		return nil, err
	}
	d := &dec{b: body}
	if xid := d.u32(); xid != rc.xid {
		return nil, fmt.Errorf("reply xid %d, want %d", xid, rc.xid)
	}
	if d.u32() != 1 {
		return nil, errors.New("not a reply")
	}
	if st := d.u32(); st != 0 {
		return nil, fmt.Errorf("rpc denied (%d)", st)
	}
	d.u32()
	d.opaque() // verifier
	if as := d.u32(); as != 0 {
		return nil, fmt.Errorf("rpc accept_stat %d", as)
	}
	return d, d.err
}

const (
	nfs3OK          = 0
	nfs3ErrNoEnt    = 2
	nfs3ErrAcces    = 13
	nfs3ErrNotDir   = 20
	nfs3ErrIsDir    = 21
	nfs3ErrInval    = 22
	nfs3ErrROFS     = 30
	nfs3ErrStale    = 70
	nfs3ErrSrvFault = 10006
)

func (rc *rawClient) mount(path string) (uint32, []byte, error) {
	d, err := rc.call(progMount, 1, (&enc{}).str(path).b)
	if err != nil {
		return 0, nil, err
	}
	st := d.u32()
	if st != 0 {
		return st, nil, nil
	}
	return 0, d.opaque(), d.err
}

func (rc *rawClient) nfs(proc uint32, args *enc) (uint32, *dec, error) {
	d, err := rc.call(progNFS, proc, args.b)
	if err != nil {
		return 0, nil, err
	}
	return d.u32(), d, d.err
}

func (rc *rawClient) lookup(dir []byte, name string) (uint32, []byte, fattr, error) {
	st, d, err := rc.nfs(3, (&enc{}).opaque(dir).str(name))
	if err != nil || st != nfs3OK {
		return st, nil, fattr{}, err
	}
	fh := d.opaque()
	a, _ := d.postOpAttr()
	return st, fh, a, d.err
}

func (rc *rawClient) getattr(fh []byte) (uint32, fattr, error) {
	st, d, err := rc.nfs(1, (&enc{}).opaque(fh))
	if err != nil || st != nfs3OK {
		return st, fattr{}, err
	}
	return st, d.fattr(), d.err
}

func (rc *rawClient) read(fh []byte, off uint64, count uint32) (uint32, []byte, bool, error) {
	st, d, err := rc.nfs(6, (&enc{}).opaque(fh).u64(off).u32(count))
	if err != nil || st != nfs3OK {
		return st, nil, false, err
	}
	d.postOpAttr()
	d.u32()
	eof := d.u32() != 0
	return st, d.opaque(), eof, d.err
}

func (rc *rawClient) readAll(fh []byte) (uint32, []byte, error) {
	var out []byte
	for {
		st, b, eof, err := rc.read(fh, uint64(len(out)), 1<<20)
		if err != nil || st != nfs3OK {
			return st, nil, err
		}
		out = append(out, b...)
		if eof || len(b) == 0 {
			return st, out, nil
		}
	}
}

func (rc *rawClient) readlink(fh []byte) (uint32, string, error) {
	st, d, err := rc.nfs(5, (&enc{}).opaque(fh))
	if err != nil || st != nfs3OK {
		return st, "", err
	}
	d.postOpAttr()
	return st, string(d.opaque()), d.err
}

type dirent struct {
	name   string
	cookie uint64
	fileid uint64
	fh     []byte
	attr   fattr
}

// readdirplus reads one page.
func (rc *rawClient) readdirplus(fh []byte, cookie, verf uint64, maxcount uint32) (st uint32, ents []dirent, newVerf uint64, eof bool, err error) {
	st, d, err := rc.nfs(17, (&enc{}).opaque(fh).u64(cookie).u64(verf).u32(maxcount).u32(maxcount))
	if err != nil || st != nfs3OK {
		return st, nil, 0, false, err
	}
	d.postOpAttr()
	newVerf = d.u64()
	for d.u32() != 0 && d.err == nil {
		var e dirent
		e.fileid = d.u64()
		e.name = string(d.opaque())
		e.cookie = d.u64()
		e.attr, _ = d.postOpAttr()
		if d.u32() != 0 {
			e.fh = d.opaque()
		}
		ents = append(ents, e)
	}
	eof = d.u32() != 0
	return st, ents, newVerf, eof, d.err
}

func (rc *rawClient) readdir(fh []byte, cookie, verf uint64, count uint32) (uint32, []dirent, uint64, bool, error) {
	st, d, err := rc.nfs(16, (&enc{}).opaque(fh).u64(cookie).u64(verf).u32(count))
	if err != nil || st != nfs3OK {
		return st, nil, 0, false, err
	}
	d.postOpAttr()
	verf = d.u64()
	var ents []dirent
	for d.u32() != 0 && d.err == nil {
		var e dirent
		e.fileid = d.u64()
		e.name = string(d.opaque())
		e.cookie = d.u64()
		ents = append(ents, e)
	}
	eof := d.u32() != 0
	return st, ents, verf, eof, d.err
}

// listAll reads a whole directory with READDIRPLUS pages from (cookie, verf).
func (rc *rawClient) listAll(fh []byte, cookie, verf uint64, maxcount uint32) ([]dirent, error) {
	var all []dirent
	for {
		st, ents, v, eof, err := rc.readdirplus(fh, cookie, verf, maxcount)
		if err != nil {
			return nil, err
		}
		if st != nfs3OK {
			return nil, fmt.Errorf("readdirplus: status %d", st)
		}
		all = append(all, ents...)
		if eof {
			return all, nil
		}
		if len(ents) == 0 {
			return nil, errors.New("readdirplus: empty page without eof")
		}
		cookie, verf = ents[len(ents)-1].cookie, v
	}
}
