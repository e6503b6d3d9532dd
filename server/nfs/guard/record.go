package guard

import (
	"encoding/binary"
	"fmt"
)

// ONC RPC and NFS constants used by the record check (RFC 5531, RFC 1813).
const (
	ProgNFS    = 100003 // NFS; only version 3 is served
	ProgMount  = 100005 // MOUNT; only version 3 is served
	ProgNFSACL = 100227 // NFSACL, probed by Linux unless mounted with noacl

	rpcVersion = 2
	msgCall    = 0

	// MaxAuthBody is the largest credential or verifier body RFC 5531
	// allows (opaque_auth body<400>).
	MaxAuthBody = 400
	// MaxMachineName bounds the AUTH_UNIX machine name (RFC 5531 §C).
	MaxMachineName = 255
	// MaxGids bounds the AUTH_UNIX supplementary groups (RFC 5531 §C).
	MaxGids = 16

	maxFileHandle = 64   // NFS3_FHSIZE
	maxName       = 255  // longest file name a client may send
	maxPath       = 4096 // longest symlink target
	maxDirPath    = 1024 // MNTPATHLEN

	// MinCall is the size of the smallest possible call: xid, msg_type,
	// rpcvers, prog, vers, proc and two empty opaque_auth.
	MinCall = 40

	lastFragment = 1 << 31
)

// Auth flavors (RFC 5531 §8.2).
const (
	AuthNone = 0
	AuthUnix = 1
)

// Problem names what was wrong with a refused record. It is the label of
// the bad-records metric.
type Problem int

const (
	ProblemNone     Problem = iota
	ProblemFragment         // record split into fragments (go-nfs cannot reassemble them)
	ProblemSize             // record shorter than any call or larger than the cap
	ProblemShort            // a field runs past the end of the record
	ProblemMsgType          // not a CALL
	ProblemRPCVers          // rpcvers is not 2
	ProblemVersion          // NFS or MOUNT at a version other than 3
	ProblemCred             // credential too long or malformed
	ProblemVerf             // verifier too long
	ProblemArgs             // procedure arguments malformed or out of bounds
)

var problemNames = [...]string{"none", "fragment", "size", "short", "msgtype", "rpcvers", "version", "cred", "verf", "args"}

func (p Problem) String() string {
	if p >= 0 && int(p) < len(problemNames) {
		return problemNames[p]
	}
	return fmt.Sprintf("problem(%d)", int(p))
}

// RecordError is why a record was refused.
type RecordError struct {
	Problem Problem
	Detail  string
}

func (e *RecordError) Error() string {
	return "rpc record: " + e.Problem.String() + ": " + e.Detail
}

func bad(p Problem, format string, args ...any) *RecordError {
	return &RecordError{Problem: p, Detail: fmt.Sprintf(format, args...)}
}

// CheckMarker checks a record marking header (RFC 5531 §11): the record must
// be a single, last fragment of MinCall..max bytes. It returns the record
// length.
func CheckMarker(marker uint32, max int) (int, error) {
	if marker&lastFragment == 0 {
		return 0, bad(ProblemFragment, "fragment of %d bytes without the last-fragment bit", marker&^lastFragment)
	}
	n := int(marker &^ lastFragment)
	if n < MinCall {
		return 0, bad(ProblemSize, "record of %d bytes is shorter than a call header (%d)", n, MinCall)
	}
	if n > max {
		return 0, bad(ProblemSize, "record of %d bytes exceeds the cap of %d", n, max)
	}
	return n, nil
}

// Call is the checked header of one ONC RPC call.
type Call struct {
	XID, Prog, Vers, Proc  uint32
	CredFlavor, VerfFlavor uint32
	// Unix is the parsed credential when CredFlavor is AuthUnix.
	Unix *UnixCred
	// Known is true when the call is to NFS v3 or MOUNT v3 (its arguments
	// were checked too); false for other programs, whose calls go-nfs
	// answers with an error without reading their arguments.
	Known bool
	// ArgsOff is the offset in the record body where the procedure's
	// arguments start (after the verifier).
	ArgsOff int
}

// UnixCred is an AUTH_UNIX (AUTH_SYS) credential body.
type UnixCred struct {
	Stamp       uint32
	MachineName string
	UID, GID    uint32
	Gids        []uint32
}

// ParseCall checks one complete record body (without its marker) the way a
// careful server decodes it, and accepts it only if go-nfs v0.0.4 can then
// decode it without allocating more than the record holds:
//
//   - msg_type CALL, rpcvers 2;
//   - credential and verifier bodies at most MaxAuthBody bytes and inside the
//     record; an AUTH_UNIX credential parsed with its own bounds (machine name
//     at most MaxMachineName bytes, at most MaxGids groups, nothing left over);
//   - NFS and MOUNT must be version 3 (go-nfs dispatches on program and
//     procedure only, so a v2 or v4 call would be decoded as v3);
//   - for every NFSv3 and MOUNTv3 procedure go-nfs serves, each variable-length
//     argument it reads (file handles, names, paths, write data) is within
//     protocol bounds and inside the record, walked in the order and with the
//     padding rules go-nfs itself uses, and every fixed-size field it reads
//     is present.
//
// Calls to other programs (such as NFSACL) pass with Known=false when their
// header is well formed: go-nfs drains them and answers PROC_UNAVAIL. Bytes
// after the arguments are allowed: go-nfs discards them.
func ParseCall(b []byte) (Call, error) {
	var c Call
	d := decoder{b: b}
	if len(b) < MinCall {
		return c, bad(ProblemSize, "record of %d bytes is shorter than a call header (%d)", len(b), MinCall)
	}
	c.XID = d.u32()
	if mt := d.u32(); mt != msgCall {
		return c, bad(ProblemMsgType, "msg_type %d is not CALL", mt)
	}
	if v := d.u32(); v != rpcVersion {
		return c, bad(ProblemRPCVers, "rpcvers %d is not 2", v)
	}
	c.Prog, c.Vers, c.Proc = d.u32(), d.u32(), d.u32()
	if (c.Prog == ProgNFS || c.Prog == ProgMount) && c.Vers != 3 {
		return c, bad(ProblemVersion, "program %d version %d is not served (only 3)", c.Prog, c.Vers)
	}

	var cred []byte
	var err *RecordError
	c.CredFlavor, cred, err = d.auth(ProblemCred, "credential")
	if err != nil {
		return c, err
	}
	if c.CredFlavor == AuthUnix {
		u, err := parseUnix(cred)
		if err != nil {
			return c, err
		}
		c.Unix = u
	}
	c.VerfFlavor, _, err = d.auth(ProblemVerf, "verifier")
	if err != nil {
		return c, err
	}
	c.ArgsOff = d.off

	switch c.Prog {
	case ProgNFS:
		c.Known = true
		if err := checkNFSArgs(&d, c.Proc); err != nil {
			return c, err
		}
	case ProgMount:
		c.Known = true
		if err := checkMountArgs(&d, c.Proc); err != nil {
			return c, err
		}
	}
	return c, nil
}

// decoder walks a record body. Every read is bounds-checked; a failed read
// sets err and makes later reads return zero.
type decoder struct {
	b   []byte
	off int
	err *RecordError
}

func (d *decoder) left() int { return len(d.b) - d.off }

func (d *decoder) need(n int, what string) bool {
	if d.err != nil {
		return false
	}
	if n < 0 || n > d.left() {
		d.err = bad(ProblemShort, "%s needs %d bytes at offset %d, record has %d", what, n, d.off, len(d.b))
		return false
	}
	return true
}

func (d *decoder) u32() uint32 {
	if !d.need(4, "uint32") {
		return 0
	}
	v := binary.BigEndian.Uint32(d.b[d.off:])
	d.off += 4
	return v
}

func (d *decoder) skip(n int, what string) {
	if d.need(n, what) {
		d.off += n
	}
}

// opaque reads a variable-length opaque of at most max bytes. pad says
// whether the XDR padding to 4 bytes is consumed after it: go-nfs's
// xdr.ReadOpaque does not, its struct decoding does.
func (d *decoder) opaque(max int, pad bool, what string) []byte {
	n := d.u32()
	if d.err != nil {
		return nil
	}
	if n > uint32(max) {
		d.err = bad(ProblemArgs, "%s of %d bytes exceeds %d", what, n, max)
		return nil
	}
	l := int(n)
	if pad {
		l = (l + 3) &^ 3
	}
	if !d.need(l, what) {
		d.err.Problem = ProblemArgs
		return nil
	}
	v := d.b[d.off : d.off+int(n)]
	d.off += l
	return v
}

// auth reads an opaque_auth: flavor and a body of at most MaxAuthBody bytes.
func (d *decoder) auth(p Problem, what string) (uint32, []byte, *RecordError) {
	flavor := d.u32()
	n := d.u32()
	if d.err != nil {
		d.err.Problem = p
		return 0, nil, d.err
	}
	if n > MaxAuthBody {
		return 0, nil, bad(p, "%s body of %d bytes exceeds %d", what, n, MaxAuthBody)
	}
	l := (int(n) + 3) &^ 3
	if l > d.left() {
		return 0, nil, bad(p, "%s body of %d bytes runs past the record end", what, n)
	}
	body := d.b[d.off : d.off+int(n)]
	d.off += l
	return flavor, body, nil
}

func parseUnix(b []byte) (*UnixCred, error) {
	d := decoder{b: b}
	u := &UnixCred{Stamp: d.u32()}
	n := d.u32()
	if d.err != nil {
		return nil, bad(ProblemCred, "AUTH_UNIX body of %d bytes is truncated", len(b))
	}
	if n > MaxMachineName {
		return nil, bad(ProblemCred, "AUTH_UNIX machine name of %d bytes exceeds %d", n, MaxMachineName)
	}
	l := (int(n) + 3) &^ 3
	if l > d.left() {
		return nil, bad(ProblemCred, "AUTH_UNIX machine name of %d bytes runs past the credential", n)
	}
	u.MachineName = string(d.b[d.off : d.off+int(n)])
	d.off += l
	u.UID, u.GID = d.u32(), d.u32()
	ng := d.u32()
	if d.err != nil {
		return nil, bad(ProblemCred, "AUTH_UNIX body of %d bytes is truncated", len(b))
	}
	if ng > MaxGids {
		return nil, bad(ProblemCred, "AUTH_UNIX has %d groups, more than %d", ng, MaxGids)
	}
	if int(ng)*4 != d.left() {
		return nil, bad(ProblemCred, "AUTH_UNIX with %d groups has %d bytes left for them", ng, d.left())
	}
	u.Gids = make([]uint32, ng)
	for i := range u.Gids {
		u.Gids[i] = d.u32()
	}
	return u, nil
}

// NFSv3 procedures (RFC 1813).
const (
	nfsNull = iota
	nfsGetattr
	nfsSetattr
	nfsLookup
	nfsAccess
	nfsReadlink
	nfsRead
	nfsWrite
	nfsCreate
	nfsMkdir
	nfsSymlink
	nfsMknod
	nfsRemove
	nfsRmdir
	nfsRename
	nfsLink
	nfsReaddir
	nfsReaddirplus
	nfsFsstat
	nfsFsinfo
	nfsPathconf
	nfsCommit
)

// checkNFSArgs walks the arguments of an NFSv3 call exactly as go-nfs
// v0.0.4 reads them (handler files nfs_on*.go): "raw" handles via
// xdr.ReadOpaque (no padding consumed), struct fields via xdr.Unmarshal
// (padded). Procedures go-nfs does not serve need no check: go-nfs answers
// them without reading their arguments.
func checkNFSArgs(d *decoder, proc uint32) *RecordError {
	rawFH := func() { d.opaque(maxFileHandle, false, "file handle") }
	fh := func() { d.opaque(maxFileHandle, true, "file handle") }
	dirop := func() { fh(); d.opaque(maxName, true, "file name") }
	switch proc {
	case nfsNull:
	case nfsGetattr, nfsReadlink, nfsFsstat, nfsFsinfo, nfsPathconf:
		rawFH()
	case nfsCommit:
		rawFH()
		d.skip(12, "commit offset and count")
	case nfsSetattr:
		rawFH()
		d.sattr()
		if guard := d.u32(); guard != 0 {
			d.skip(8, "setattr guard ctime")
		}
	case nfsLookup, nfsRemove, nfsRmdir:
		dirop()
	case nfsAccess:
		rawFH()
		d.u32()
	case nfsRead:
		fh()
		d.skip(12, "read offset and count")
	case nfsWrite:
		fh()
		d.skip(16, "write offset, count and stable")
		d.opaque(len(d.b), true, "write data")
	case nfsCreate:
		dirop()
		switch how := d.u32(); how {
		case 0, 1: // UNCHECKED, GUARDED
			d.sattr()
		case 2: // EXCLUSIVE
			d.skip(8, "create verifier")
		default:
			if d.err == nil {
				d.err = bad(ProblemArgs, "create mode %d", how)
			}
		}
	case nfsMkdir:
		dirop()
		d.sattr()
	case nfsSymlink:
		dirop()
		d.sattr()
		d.opaque(maxPath, false, "symlink target")
	case nfsLink:
		// go-nfs decodes LINK like SYMLINK (diropargs, sattr, opaque), not
		// as RFC 1813's (file, diropargs); follow what it reads.
		dirop()
		d.sattr()
		d.opaque(maxPath, false, "link target")
	case nfsMknod:
		dirop()
		d.u32() // type; go-nfs refuses read-only exports before reading more
	case nfsRename:
		dirop()
		dirop()
	case nfsReaddir:
		fh()
		d.skip(20, "readdir cookie, verifier and count")
	case nfsReaddirplus:
		fh()
		d.skip(24, "readdirplus cookie, verifier and counts")
	}
	if d.err != nil {
		d.err.Problem = ProblemArgs
		return d.err
	}
	return nil
}

// sattr walks an sattr3 as go-nfs's ReadSetFileAttributes reads it; XDR
// booleans must be 0 or 1 and time_how 0, 1 or 2.
func (d *decoder) sattr() {
	for _, f := range []struct {
		what string
		size int
	}{{"mode", 4}, {"uid", 4}, {"gid", 4}, {"size", 8}} {
		switch set := d.u32(); set {
		case 0:
		case 1:
			d.skip(f.size, "sattr3 "+f.what)
		default:
			if d.err == nil {
				d.err = bad(ProblemArgs, "sattr3 set_%s is %d, not a boolean", f.what, set)
			}
		}
	}
	for _, what := range []string{"atime", "mtime"} {
		switch how := d.u32(); how {
		case 0, 1:
		case 2:
			d.skip(8, "sattr3 "+what)
		default:
			if d.err == nil {
				d.err = bad(ProblemArgs, "sattr3 %s how is %d", what, how)
			}
		}
	}
}

// MOUNTv3 procedures go-nfs serves.
const (
	mountNull = 0
	mountMnt  = 1
	mountUmnt = 3
)

func checkMountArgs(d *decoder, proc uint32) *RecordError {
	switch proc {
	case mountMnt, mountUmnt:
		d.opaque(maxDirPath, false, "mount dirpath")
	}
	if d.err != nil {
		d.err.Problem = ProblemArgs
		return d.err
	}
	return nil
}
