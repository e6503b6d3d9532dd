package nfs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"sort"
	"sync"
	"sync/atomic"

	gonfs "github.com/willscott/go-nfs"
	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/internal/xdr"
	"github.com/strata-nix/strata/server/nfs/guard"
)

// The fast path answers successful NFSv3 GETATTR, LOOKUP, READ and
// READDIRPLUS calls, and COMMIT (always NFS3ERR_SERVERFAULT on this
// read-only export, as go-nfs answers it),
// without go-nfs (see conn). It uses the same genFS calls go-nfs would make
// (FromHandle, Lstat, ToHandle, Open, ReadAt), so confinement, generation
// and MAC checks are the same code; it builds the same reply bytes go-nfs
// would (the integration tests compare them), with no reflection and, for
// READ, one pooled buffer that the file is read straight into. Whenever a
// call would not succeed, it returns false and go-nfs answers.

const (
	nfsProcGetattr = 1
	nfsProcLookup  = 3
	nfsProcRead    = 6
	nfsProcRdPlus  = 17
	nfsProcFsinfo  = 19
	nfsProcCommit  = 21

	nfs3ErrServerFault = 10006

	// MaxRead is the most bytes one READ returns, on every path: the fast
	// path clamps to it, calls go-nfs answers have their count clamped to
	// it before go-nfs reads them (its own MaxRead is the same, but it
	// claims end of file for a clamped READ), and FSINFO advertises it as
	// rtmax.
	MaxRead = 1 << 24
	// prefRead is FSINFO's rtpref: what clients read in when free to choose.
	prefRead = 1 << 20
	// maxWrite is FSINFO's wtmax: the export is read-only, and the guard
	// refuses records larger than a 1 MiB WRITE.
	maxWrite = 1 << 20
	// fattrLen is the XDR size of fattr3.
	fattrLen = 84
	// replyHeaderLen: marker, xid, REPLY, MSG_ACCEPTED, AUTH_NULL verifier
	// (flavor, length), SUCCESS.
	replyHeaderLen = 4 + 4*6
)

// fast answers the call in rec (one checked record without its marker,
// call its parsed header) if it is a hot call that succeeds. An error means
// the reply could not be written (the connection is closed).
func (c *conn) fast(rec []byte, call guard.Call) (bool, error) {
	if c.e.noFastPath || call.Prog != progNFS || call.Vers != 3 {
		return false, nil
	}
	r := xdr.NewDecoder(rec[call.ArgsOff:])
	xid, proc := call.XID, call.Proc
	var reply *[]byte
	switch proc {
	case nfsProcGetattr:
		reply = c.getattr(xid, r)
	case nfsProcLookup:
		reply = c.lookup(xid, r)
	case nfsProcRead:
		var written bool
		var err error
		if reply, written, err = c.read(xid, r); written {
			c.m.nfsRequests[proc].Inc()
			c.e.fastCalls.Add(1)
			return true, err
		}
	case nfsProcRdPlus:
		reply = c.readdirplus(xid, r)
	case nfsProcFsinfo:
		reply = c.fsinfo(xid, r)
	case nfsProcCommit:
		if reply = c.commit(xid, r); reply != nil {
			c.m.errors.WithLabelValues(procName(progNFS, proc), "NFS3ERR_SERVERFAULT").Inc()
		}
	}
	if reply == nil {
		return false, nil
	}
	c.m.nfsRequests[proc].Inc()
	c.e.fastCalls.Add(1)
	err := c.writeRecord(*reply)
	putReply(reply)
	return true, err
}

// getattr: GETATTR3res is status, fattr3.
func (c *conn) getattr(xid uint32, r *xdr.Decoder) *[]byte {
	h := r.Opaque(maxHandle, "file handle")
	if r.Err != nil {
		return nil
	}
	g, err := c.e.genOf(h)
	if err != nil {
		return nil
	}
	obj, err := g.resolve(ref{handle: h})
	if err != nil {
		return nil
	}
	n := 4*6 + 4 + fattrLen
	b := getReply(4 + n)
	*b = appendReplyHeader(*b, n, xid)
	*b = binary.BigEndian.AppendUint32(*b, 0) // NFS3_OK
	*b = appendFattr(*b, obj.info)
	return b
}

// lookup: LOOKUP3resok is status, handle, post_op_attr object, post_op_attr
// directory. "." and ".." and names that are not plain are go-nfs's.
func (c *conn) lookup(xid uint32, r *xdr.Decoder) *[]byte {
	dh := r.Opaque(maxHandle, "file handle")
	name := r.Opaque(255, "file name")
	if r.Err != nil || !validName(string(name)) {
		return nil
	}
	g, err := c.e.genOf(dh)
	if err != nil {
		return nil
	}
	dir, err := g.resolve(ref{handle: dh})
	if err != nil || !dir.info.IsDir() {
		return nil
	}
	obj, err := g.resolve(ref{handle: dh, name: string(name)})
	if err != nil || len(obj.handle) == 0 {
		return nil
	}
	n := 4*6 + 4 + 4 + pad4(len(obj.handle)) + 2*(4+fattrLen)
	b := getReply(4 + n)
	*b = appendReplyHeader(*b, n, xid)
	*b = binary.BigEndian.AppendUint32(*b, 0) // NFS3_OK
	*b = appendOpaque(*b, obj.handle)
	*b = binary.BigEndian.AppendUint32(*b, 1)
	*b = appendFattr(*b, obj.info)
	*b = binary.BigEndian.AppendUint32(*b, 1)
	*b = appendFattr(*b, dir.info)
	return b
}

// read: READ3resok is status, post_op_attr, count, eof, opaque data. The
// count is clamped to the file's end and to MaxRead; eof is true only when
// offset plus the bytes returned is the file's size. It returns the reply
// to write, or written when readChunked wrote it (with the error that made
// the connection unusable, if any); neither means go-nfs answers.
//
// The data is read into a buffer with pread and written with the reply in
// one write, not sent with sendfile(2): measured (1 MiB READs of
// page-cached files over loopback TCP, one connection, alternating rounds;
// see TESTING.md, bench-nfs), splicing the page cache into the socket cost
// the server more CPU per MB than the two copies (its pipe moves 64 KiB
// per round, and every round pushes a TCP segment of its own), and the
// client more too (it copies out of cold 4 KiB page-cache frags instead of
// the server's freshly written ones): 0.37 against 0.31 ms/MB on the
// server, 0.36 against 0.20 on the client, 1530 against 2006 MB/s.
func (c *conn) read(xid uint32, r *xdr.Decoder) (*[]byte, bool, error) {
	h := r.Opaque(maxHandle, "file handle")
	off, count := r.U64(), r.U32()
	if r.Err != nil {
		return nil, false, nil
	}
	g, err := c.e.genOf(h)
	if err != nil {
		return nil, false, nil
	}
	f, info, err := g.openFile(h, "")
	if err != nil {
		return nil, false, nil
	}
	defer f.Close()
	// eof only when the bytes returned reach the end of the file.
	count = min(count, MaxRead)
	eof := false
	size := info.Size()
	if int64(off) >= size || int64(off) < 0 {
		count, eof = 0, true
	} else if size-int64(off) <= int64(count) {
		count, eof = uint32(size-int64(off)), true
	}
	if count > readChunk {
		written, err := c.readChunked(xid, f, info, off, count, eof)
		return nil, written, err
	}
	b := getReply(4 + readReplyFixed + pad4(int(count)))
	*b = appendReplyHeader(*b, 0, xid)        // length patched below
	*b = binary.BigEndian.AppendUint32(*b, 0) // NFS3_OK
	*b = binary.BigEndian.AppendUint32(*b, 1)
	*b = appendFattr(*b, info)
	hdr := len(*b)
	*b = (*b)[:hdr+12+int(count)]
	got, err := f.ReadAt((*b)[hdr+12:], int64(off))
	if err != nil && !errors.Is(err, io.EOF) {
		putReply(b)
		return nil, false, nil // go-nfs tries again and reports the error
	}
	if errors.Is(err, io.EOF) {
		eof = true
	}
	*b = (*b)[:hdr+12+got]
	binary.BigEndian.PutUint32((*b)[hdr:], uint32(got))
	e := uint32(0)
	if eof {
		e = 1
	}
	binary.BigEndian.PutUint32((*b)[hdr+4:], e)
	binary.BigEndian.PutUint32((*b)[hdr+8:], uint32(got))
	for range pad4(got) - got {
		*b = append(*b, 0)
	}
	binary.BigEndian.PutUint32(*b, uint32(len(*b)-4)|1<<31)
	return b, false, nil
}

// readReplyFixed is the size of a successful READ reply without its data:
// RPC header, status, post_op_attr, count, eof and the data's length.
const readReplyFixed = 4*6 + 4 + 4 + fattrLen + 4 + 4 + 4

// readChunk is the most data a READ reply carries in one buffer (FSINFO's
// rtpref, the Linux client's largest rsize); a larger READ is read and
// written readChunk bytes at a time, so a connection never holds more.
const readChunk = prefRead

// errReadCut marks a READ reply that broke off after its header was
// written: the record stream is unusable and the connection must close.
var errReadCut = errors.New("READ reply cut short")

// zeros pads XDR opaque data to a multiple of 4 bytes.
var zeros [3]byte

// readChunked writes a READ reply of more than readChunk bytes of data:
// the header and the first readChunk bytes, then the rest readChunk bytes
// at a time, under the write lock (a record is never interleaved with
// another reply). The first chunk is read before anything is written: if
// that fails or comes back short, written is false and go-nfs answers. A
// later failure (an I/O error, or a file shorter than its size said) cuts
// the record, so the connection is closed (the client retries on a new
// one) and the error returned.
func (c *conn) readChunked(xid uint32, f *roFile, info *info, off uint64, count uint32, eof bool) (written bool, err error) {
	b := getReply(4 + readReplyFixed + readChunk + 4)
	defer putReply(b)
	*b = appendReplyHeader(*b, readReplyFixed+pad4(int(count)), xid)
	*b = binary.BigEndian.AppendUint32(*b, 0) // NFS3_OK
	*b = binary.BigEndian.AppendUint32(*b, 1)
	*b = appendFattr(*b, info)
	e := uint32(0)
	if eof {
		e = 1
	}
	*b = binary.BigEndian.AppendUint32(*b, count)
	*b = binary.BigEndian.AppendUint32(*b, e)
	*b = binary.BigEndian.AppendUint32(*b, count)
	hdr := len(*b)
	out := (*b)[:hdr+readChunk]
	if got, err := f.ReadAt(out[hdr:], int64(off)); err != nil || got < readChunk {
		return false, nil
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.closed.Load() {
		return true, errConnClosed
	}
	pos, left, n := int64(off), int(count), readChunk // n: data bytes in out
	for {
		if _, err := c.gc.Write(out); err != nil {
			c.Close()
			return true, fmt.Errorf("%w: %w", errReadCut, err)
		}
		pos, left = pos+int64(n), left-n
		if left == 0 {
			return true, nil
		}
		n = min(left, readChunk)
		out = (*b)[:n]
		got, err := f.ReadAt(out, pos)
		if err == nil && got < n {
			err = io.ErrUnexpectedEOF // the file is shorter than its size said
		}
		if err != nil {
			c.Close()
			return true, fmt.Errorf("%w: %w", errReadCut, err)
		}
		if n == left {
			out = append(out, zeros[:pad4(n)-n]...) // the last chunk carries the padding
		}
	}
}

// fsinfo: FSINFO3resok is status, post_op_attr, rtmax, rtpref, rtmult,
// wtmax, wtpref, wtmult, dtpref, maxfilesize, time_delta, properties. It
// is go-nfs's answer with the sizes this server really serves (go-nfs
// advertises 1 GiB reads, then serves 16 MiB).
func (c *conn) fsinfo(xid uint32, r *xdr.Decoder) *[]byte {
	h := r.Opaque(maxHandle, "file handle")
	if r.Err != nil {
		return nil
	}
	g, err := c.e.genOf(h)
	if err != nil {
		return nil
	}
	obj, oerr := g.resolve(ref{handle: h})
	n := 4*6 + 4 + 4 + 7*4 + 8 + 8 + 4
	if oerr == nil {
		n += fattrLen
	}
	b := getReply(4 + n)
	*b = appendReplyHeader(*b, n, xid)
	*b = binary.BigEndian.AppendUint32(*b, 0) // NFS3_OK
	*b = appendPostOp(*b, obj, oerr)
	for _, v := range [...]uint32{MaxRead, prefRead, 4096, maxWrite, maxWrite, 4096, 8192} {
		*b = binary.BigEndian.AppendUint32(*b, v)
	}
	*b = binary.BigEndian.AppendUint64(*b, 1<<62) // maxfilesize, as go-nfs
	*b = binary.BigEndian.AppendUint32(*b, 0)     // time_delta: 1 ns
	*b = binary.BigEndian.AppendUint32(*b, 1)
	// FSF3_LINK | FSF3_SYMLINK | FSF3_HOMOGENEOUS, as go-nfs sets them for
	// a filesystem with symlinks and without write capability.
	*b = binary.BigEndian.AppendUint32(*b, 0x1|0x2|0x8)
	return b
}

// clampReadCount lowers the count of a READ call in rec (a record body
// without its marker) to MaxRead before go-nfs answers it: go-nfs clamps
// the count itself but then claims end of file.
func clampReadCount(rec []byte, call guard.Call) {
	if call.Prog != progNFS || call.Vers != 3 || call.Proc != nfsProcRead {
		return
	}
	d := xdr.NewDecoder(rec[call.ArgsOff:])
	d.Opaque(maxHandle, "file handle")
	d.U64() // offset
	if d.Err != nil || d.Left() < 4 {
		return // go-nfs answers it GARBAGE_ARGS
	}
	if off := call.ArgsOff + d.Off; binary.BigEndian.Uint32(rec[off:]) > MaxRead {
		binary.BigEndian.PutUint32(rec[off:], MaxRead)
	}
}

// commit: go-nfs answers COMMIT of a valid handle on a filesystem without
// write capability with NFS3ERR_SERVERFAULT and empty wcc_data. Clients
// (go-nfs-client on every Close) send it after reading, so it is hot too.
func (c *conn) commit(xid uint32, r *xdr.Decoder) *[]byte {
	h := r.Opaque(maxHandle, "file handle")
	if r.Err != nil {
		return nil
	}
	if _, err := c.e.genOf(h); err != nil {
		return nil
	}
	n := 4*6 + 4 + 4 + 4
	b := getReply(4 + n)
	*b = appendReplyHeader(*b, n, xid)
	*b = binary.BigEndian.AppendUint32(*b, nfs3ErrServerFault)
	*b = binary.BigEndian.AppendUint32(*b, 0) // no pre-op attributes
	*b = binary.BigEndian.AppendUint32(*b, 0) // no post-op attributes
	return b
}

// readdirplus: READDIRPLUS3resok is status, post_op_attr directory,
// verifier, then entries (fileid, name, cookie, post_op_attr, post_op_fh,
// each preceded by "value follows") and eof. It follows go-nfs's
// onReadDirPlus step by step: the same sizing (100 bytes plus 512 per
// entry against maxcount, name plus 20 against dircount), cookies (index
// plus 2, after "." and ".."), verifier and listing cache; a listing is
// taken from the cache even for cookie 0, which go-nfs re-reads (a
// generation never changes, so the listing is the same). Too small counts,
// bad cookies and unreadable directories are go-nfs's.
func (c *conn) readdirplus(xid uint32, r *xdr.Decoder) *[]byte {
	h := r.Opaque(maxHandle, "file handle")
	cookie, cverf, dirCount, maxCount := r.U64(), r.U64(), r.U32(), r.U32()
	if r.Err != nil || dirCount < 512 || maxCount < 4096 {
		return nil
	}
	e := c.e
	g, err := e.genOf(h)
	if err != nil {
		return nil
	}
	// go-nfs's path of the directory: FromHandle's tokens joined.
	tok := encodeToken(h)
	dirPath := tok + "/../" + tok
	verf := verifier(dirPath)
	if cookie > 0 && cverf > 0 && cverf != verf {
		return nil // NFS3ERR_BAD_COOKIE
	}
	listing := e.dirs.listing(verf, dirPath)
	if listing == nil {
		list, err := g.view.ReadDir(dirPath)
		if err != nil {
			return nil
		}
		sort.Slice(list, func(i, j int) bool { return list[i].Name() < list[j].Name() })
		e.VerifierFor(dirPath, list)
		if listing = e.dirs.listing(verf, dirPath); listing == nil {
			listing = &dirListing{path: dirPath, list: list, handles: make([]atomic.Pointer[[]byte], len(list))} // too large to cache
		}
	}
	contents := listing.list
	dir, derr := g.resolve(ref{handle: h})

	b := getReply(4096)
	*b = appendReplyHeader(*b, 0, xid)        // length patched below
	*b = binary.BigEndian.AppendUint32(*b, 0) // NFS3_OK
	*b = appendPostOp(*b, dir, derr)
	*b = binary.BigEndian.AppendUint64(*b, verf)
	follows := len(*b)
	*b = binary.BigEndian.AppendUint32(*b, 0) // value follows: patched once an entry is written
	n := 0
	next := func() {
		if n == 0 {
			binary.BigEndian.PutUint32((*b)[follows:], 1)
		} else {
			*b = binary.BigEndian.AppendUint32(*b, 1) // previous entry's "next"
		}
		n++
	}
	started := cookie == 0
	if started {
		var dotdot, dot uint64
		if parent, err := g.resolve(ref{handle: h, parent: true}); err == nil {
			dotdot = parent.info.ino
		}
		if derr == nil {
			dot = dir.info.ino
		}
		next()
		*b = binary.BigEndian.AppendUint64(*b, dot)
		*b = appendOpaque(*b, []byte("."))
		*b = binary.BigEndian.AppendUint64(*b, 0)
		*b = appendPostOp(*b, dir, derr)
		*b = binary.BigEndian.AppendUint32(*b, 0) // no handle
		next()
		*b = binary.BigEndian.AppendUint64(*b, dotdot)
		*b = appendOpaque(*b, []byte(".."))
		*b = binary.BigEndian.AppendUint64(*b, 1)
		*b = binary.BigEndian.AppendUint32(*b, 0) // no attributes
		*b = binary.BigEndian.AppendUint32(*b, 0) // no handle
	}
	eof := true
	maxEntities := e.HandleLimit() / 2
	dirBytes, maxBytes := uint32(0), uint32(100)
	for i, ent := range contents {
		ck := uint64(i + 2)
		if !started {
			started = ck == cookie
			continue
		}
		name := ent.Name()
		dirBytes += uint32(len(name) + 20)
		maxBytes += 512
		if dirBytes > dirCount || maxBytes > maxCount || n > maxEntities {
			eof = false
			break
		}
		ch := g.childHandle(h, listing, i)
		in, ok := ent.(*info)
		if !ok {
			putReply(b)
			return nil
		}
		next()
		*b = binary.BigEndian.AppendUint64(*b, in.ino)
		*b = appendOpaque(*b, []byte(name))
		*b = binary.BigEndian.AppendUint64(*b, ck)
		*b = binary.BigEndian.AppendUint32(*b, 1)
		*b = appendFattr(*b, in)
		*b = binary.BigEndian.AppendUint32(*b, 1)
		*b = appendOpaque(*b, ch)
	}
	if n > 0 {
		*b = binary.BigEndian.AppendUint32(*b, 0) // last entry: no next
	}
	e32 := uint32(0)
	if eof {
		e32 = 1
	}
	*b = binary.BigEndian.AppendUint32(*b, e32)
	binary.BigEndian.PutUint32(*b, uint32(len(*b)-4)|1<<31)
	return b
}

// childHandle returns the sealed handle of entry i of the listing of
// directory h (empty when it has none: go-nfs then sends an empty handle),
// made once per cached listing. It primes the attribute cache with the
// entry as LOOKUP would, since a client that lists a directory usually
// looks up its entries next.
func (g *gen) childHandle(h []byte, l *dirListing, i int) []byte {
	in, ok := l.list[i].(*info)
	if !ok || !validName(in.name) {
		return nil
	}
	if p := l.handles[i].Load(); p != nil {
		if ch := *p; len(ch) > 0 {
			g.attrs.add(cacheKey(keyChild, h, in.name), attrEntry{handle: ch, info: in})
			obj := *in
			obj.name = ""
			g.attrs.add(cacheKey(keyObject, ch, ""), attrEntry{handle: ch, info: &obj})
		}
		return *p
	}
	e, err := g.resolve(ref{handle: h, name: in.name})
	if err != nil {
		return nil // not cached: a later call tries again
	}
	ch := e.handle
	if ch == nil {
		ch = []byte{}
	}
	l.handles[i].Store(&ch)
	return ch
}

// appendPostOp appends post_op_attr: the attributes, or "none" when they
// could not be read (go-nfs's tryStat).
func appendPostOp(b []byte, a attrEntry, err error) []byte {
	if err != nil {
		return binary.BigEndian.AppendUint32(b, 0)
	}
	b = binary.BigEndian.AppendUint32(b, 1)
	return appendFattr(b, a.info)
}

var replyPool = sync.Pool{New: func() any { b := make([]byte, 0, 4096); return &b }}

// maxPooledReply bounds the buffers kept for reuse (a 1 MiB READ reply).
const maxPooledReply = 1<<20 + 512

func getReply(n int) *[]byte {
	if n > maxPooledReply {
		b := make([]byte, 0, n)
		return &b
	}
	p := replyPool.Get().(*[]byte)
	if cap(*p) < n {
		*p = make([]byte, 0, max(n, 4096))
	}
	*p = (*p)[:0]
	return p
}

func putReply(p *[]byte) {
	if cap(*p) <= maxPooledReply {
		replyPool.Put(p)
	}
}

// appendReplyHeader appends the record marker (for a record of n bytes after
// it) and the RPC reply header go-nfs writes for an accepted, successful call.
func appendReplyHeader(b []byte, n int, xid uint32) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(n)|1<<31)
	b = binary.BigEndian.AppendUint32(b, xid)
	b = binary.BigEndian.AppendUint32(b, 1)    // REPLY
	b = binary.BigEndian.AppendUint32(b, 0)    // MSG_ACCEPTED
	b = binary.BigEndian.AppendUint32(b, 0)    // verifier AUTH_NULL
	b = binary.BigEndian.AppendUint32(b, 0)    // empty body
	return binary.BigEndian.AppendUint32(b, 0) // SUCCESS
}

// appendFattr appends fattr3 for i exactly as go-nfs encodes
// ToFileAttribute(i): type and mode from Mode(), nlink, uid, gid, size as
// both size and used, rdev split into major and minor, fsid 0, the inode as
// fileid, and the modification time as atime, mtime and ctime.
func appendFattr(b []byte, i *info) []byte {
	m := i.Mode()
	var t gonfs.FileType
	switch {
	case i.IsDir():
		t = gonfs.FileTypeDirectory
	case m&fs.ModeSymlink != 0:
		t = gonfs.FileTypeLink
	case m&fs.ModeCharDevice != 0:
		t = gonfs.FileTypeCharacter
	case m&fs.ModeDevice != 0:
		t = gonfs.FileTypeBlock
	case m&fs.ModeSocket != 0:
		t = gonfs.FileTypeSocket
	case m&fs.ModeNamedPipe != 0:
		t = gonfs.FileTypeFIFO
	default:
		t = gonfs.FileTypeRegular
	}
	for _, v := range [...]uint32{uint32(t), uint32(m), i.nlink, i.uid, i.gid} {
		b = binary.BigEndian.AppendUint32(b, v)
	}
	b = binary.BigEndian.AppendUint64(b, uint64(i.size))
	b = binary.BigEndian.AppendUint64(b, uint64(i.size))
	b = binary.BigEndian.AppendUint32(b, unix.Major(i.rdev))
	b = binary.BigEndian.AppendUint32(b, unix.Minor(i.rdev))
	b = binary.BigEndian.AppendUint64(b, 0) // fsid: go-nfs never sets it
	b = binary.BigEndian.AppendUint64(b, i.ino)
	tm := gonfs.ToNFSTime(i.ModTime())
	for range 3 {
		b = binary.BigEndian.AppendUint32(b, tm.Seconds)
		b = binary.BigEndian.AppendUint32(b, tm.Nseconds)
	}
	return b
}

func appendOpaque(b, v []byte) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
	b = append(b, v...)
	for range pad4(len(v)) - len(v) {
		b = append(b, 0)
	}
	return b
}
