package guard

import (
	"fmt"

	"github.com/strata-nix/strata/internal/xdr"
)

// ONC RPC and NFS constants used by the record check (RFC 5531, RFC 1813).
const (
	ProgNFS    = 100003 // NFS; only version 3 is served
	ProgMount  = 100005 // MOUNT; only version 3 is served
	ProgNFSACL = 100227 // NFSACL: Linux asks it for POSIX ACLs unless mounted with noacl

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
	d := xdr.NewDecoder(b)
	if len(b) < MinCall {
		return c, bad(ProblemSize, "record of %d bytes is shorter than a call header (%d)", len(b), MinCall)
	}
	c.XID = d.U32()
	if mt := d.U32(); mt != msgCall {
		return c, bad(ProblemMsgType, "msg_type %d is not CALL", mt)
	}
	if v := d.U32(); v != rpcVersion {
		return c, bad(ProblemRPCVers, "rpcvers %d is not 2", v)
	}
	c.Prog, c.Vers, c.Proc = d.U32(), d.U32(), d.U32()
	if (c.Prog == ProgNFS || c.Prog == ProgMount) && c.Vers != 3 {
		return c, bad(ProblemVersion, "program %d version %d is not served (only 3)", c.Prog, c.Vers)
	}

	var cred []byte
	var err *RecordError
	c.CredFlavor, cred, err = auth(d, ProblemCred, "credential")
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
	c.VerfFlavor, _, err = auth(d, ProblemVerf, "verifier")
	if err != nil {
		return c, err
	}
	c.ArgsOff = d.Off

	switch c.Prog {
	case ProgNFS:
		c.Known = true
		if err := checkNFSArgs(d, c.Proc); err != nil {
			return c, err
		}
	case ProgMount:
		c.Known = true
		if err := checkMountArgs(d, c.Proc); err != nil {
			return c, err
		}
	}
	return c, nil
}

// auth reads an opaque_auth: flavor and a body of at most MaxAuthBody bytes.
func auth(d *xdr.Decoder, p Problem, what string) (uint32, []byte, *RecordError) {
	flavor := d.U32()
	body := d.Opaque(MaxAuthBody, what+" body")
	if d.Err != nil {
		return 0, nil, bad(p, "%s", d.Err)
	}
	return flavor, body, nil
}

func parseUnix(b []byte) (*UnixCred, error) {
	d := xdr.NewDecoder(b)
	u := &UnixCred{Stamp: d.U32()}
	name := d.Opaque(MaxMachineName, "AUTH_UNIX machine name")
	u.UID, u.GID = d.U32(), d.U32()
	ng := d.U32()
	if d.Err != nil {
		return nil, bad(ProblemCred, "AUTH_UNIX body of %d bytes: %s", len(b), d.Err)
	}
	u.MachineName = string(name)
	if ng > MaxGids {
		return nil, bad(ProblemCred, "AUTH_UNIX has %d groups, more than %d", ng, MaxGids)
	}
	if int(ng)*4 != d.Left() {
		return nil, bad(ProblemCred, "AUTH_UNIX with %d groups has %d bytes left for them", ng, d.Left())
	}
	u.Gids = make([]uint32, ng)
	for i := range u.Gids {
		u.Gids[i] = d.U32()
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
func checkNFSArgs(d *xdr.Decoder, proc uint32) *RecordError {
	rawFH := func() { d.OpaqueNoPad(maxFileHandle, "file handle") }
	fh := func() { d.Opaque(maxFileHandle, "file handle") }
	dirop := func() { fh(); d.Opaque(maxName, "file name") }
	switch proc {
	case nfsNull:
	case nfsGetattr, nfsReadlink, nfsFsstat, nfsFsinfo, nfsPathconf:
		rawFH()
	case nfsCommit:
		rawFH()
		d.Skip(12, "commit offset and count")
	case nfsSetattr:
		rawFH()
		sattr(d)
		if guard := d.U32(); guard != 0 {
			d.Skip(8, "setattr guard ctime")
		}
	case nfsLookup, nfsRemove, nfsRmdir:
		dirop()
	case nfsAccess:
		rawFH()
		d.U32()
	case nfsRead:
		fh()
		d.Skip(12, "read offset and count")
	case nfsWrite:
		fh()
		d.Skip(16, "write offset, count and stable")
		d.Opaque(d.Left(), "write data")
	case nfsCreate:
		dirop()
		switch how := d.U32(); how {
		case 0, 1: // UNCHECKED, GUARDED
			sattr(d)
		case 2: // EXCLUSIVE
			d.Skip(8, "create verifier")
		default:
			d.Fail(fmt.Errorf("create mode %d", how))
		}
	case nfsMkdir:
		dirop()
		sattr(d)
	case nfsSymlink:
		dirop()
		sattr(d)
		d.OpaqueNoPad(maxPath, "symlink target")
	case nfsLink:
		// go-nfs decodes LINK like SYMLINK (diropargs, sattr, opaque), not
		// as RFC 1813's (file, diropargs); follow what it reads.
		dirop()
		sattr(d)
		d.OpaqueNoPad(maxPath, "link target")
	case nfsMknod:
		dirop()
		d.U32() // type; go-nfs refuses read-only exports before reading more
	case nfsRename:
		dirop()
		dirop()
	case nfsReaddir:
		fh()
		d.Skip(20, "readdir cookie, verifier and count")
	case nfsReaddirplus:
		fh()
		d.Skip(24, "readdirplus cookie, verifier and counts")
	}
	if d.Err != nil {
		return bad(ProblemArgs, "%s", d.Err)
	}
	return nil
}

// sattr walks an sattr3 as go-nfs's ReadSetFileAttributes reads it; XDR
// booleans must be 0 or 1 and time_how 0, 1 or 2.
func sattr(d *xdr.Decoder) {
	for _, f := range []struct {
		what string
		size int
	}{{"mode", 4}, {"uid", 4}, {"gid", 4}, {"size", 8}} {
		switch set := d.U32(); set {
		case 0:
		case 1:
			d.Skip(f.size, "sattr3 "+f.what)
		default:
			d.Fail(fmt.Errorf("sattr3 set_%s is %d, not a boolean", f.what, set))
		}
	}
	for _, what := range []string{"atime", "mtime"} {
		switch how := d.U32(); how {
		case 0, 1:
		case 2:
			d.Skip(8, "sattr3 "+what)
		default:
			d.Fail(fmt.Errorf("sattr3 %s how is %d", what, how))
		}
	}
}

// MOUNTv3 procedures go-nfs serves.
const (
	mountNull = 0
	mountMnt  = 1
	mountUmnt = 3
)

func checkMountArgs(d *xdr.Decoder, proc uint32) *RecordError {
	switch proc {
	case mountMnt, mountUmnt:
		d.OpaqueNoPad(maxDirPath, "mount dirpath")
	}
	if d.Err != nil {
		return bad(ProblemArgs, "%s", d.Err)
	}
	return nil
}
