package nfs

import (
	"encoding/binary"

	"github.com/strata-nix/strata/internal/xdr"
	"github.com/strata-nix/strata/server/nfs/guard"
)

// NFSACL (program 100227, version 3) is the side protocol through which
// Linux's NFSv3 client reads POSIX ACLs. A generation holds none, but the
// export must still answer GETACL: an NFSv3 superblock always carries
// SB_POSIXACL, so when a user who does not own a file (a Nix build user, any
// non-root user) opens it through an overlay whose lower is this mount, the
// VFS permission check on the overlay inode asks overlayfs for the ACL, and
// overlayfs asks the NFS client for the lower's. Unanswered (go-nfs's
// PROG_UNAVAIL, or a mount with noacl) the client reports EOPNOTSUPP, which the
// permission check passes on: open, lookup and readdir fail with "Operation
// not supported" for everyone but the files' owner (root). Reads on the NFS
// mount itself are unaffected (its own permission check is the ACCESS
// call).
//
// GETACL is answered with the object's attributes and no ACL: zero entries
// for the access and the default ACL, with the mask the client asked for.
// The client caches "no ACL" for the inode and checks the mode bits from
// then on. A handle that is not a live generation's gets NFS3ERR_STALE.
// SETACL gets NFS3ERR_ROFS (EROFS), as every write does. NULL is answered.
// Nothing here may answer PROG_UNAVAIL (what go-nfs says to a program it
// does not serve): on that reply the client stops asking for ACLs on every
// inode of the mount and EOPNOTSUPP is back.
const (
	progNFSACL       = guard.ProgNFSACL
	nfsaclProcNull   = 0
	nfsaclProcGetacl = 1
	nfsaclProcSetacl = 2

	// The GETACL mask bits: NFS_ACL, NFS_ACLCNT, NFS_DFACL, NFS_DFACLCNT.
	nfsaclMaskAll = 0xf

	nfs3ErrROFS  = 30
	nfs3ErrStale = 70
)

// nfsacl answers an NFSACL v3 NULL, GETACL or SETACL call; false means
// go-nfs answers it (a GETACL whose arguments do not decode, another
// procedure). An error means the reply could not be written.
func (c *conn) nfsacl(rec []byte, call guard.Call) (bool, error) {
	if call.Prog != progNFSACL || call.Vers != 3 {
		return false, nil
	}
	var reply *[]byte
	switch call.Proc {
	case nfsaclProcNull:
		reply = getReply(4 + 4*6)
		*reply = appendReplyHeader(*reply, 4*6, call.XID)
	case nfsaclProcGetacl:
		reply = c.getacl(call.XID, xdr.NewDecoder(rec[call.ArgsOff:]))
	case nfsaclProcSetacl:
		reply = statusOnly(call.XID, nfs3ErrROFS)
		c.m.errors.WithLabelValues(procName(progNFSACL, call.Proc), "NFS3ERR_ROFS").Inc()
	}
	if reply == nil {
		return false, nil
	}
	c.m.requests.WithLabelValues(procName(progNFSACL, call.Proc)).Inc()
	err := c.writeRecord(*reply)
	putReply(reply)
	return true, err
}

// getacl: GETACL3args is a file handle and a mask; GETACL3resok is status,
// post_op_attr, mask, then the access and the default ACL, each as an
// entry count followed by the entries as an XDR array (count again, then
// type, id and permissions per entry).
func (c *conn) getacl(xid uint32, r *xdr.Decoder) *[]byte {
	h := r.Opaque(maxHandle, "file handle")
	mask := r.U32()
	if r.Err != nil {
		return nil
	}
	var obj attrEntry
	g, err := c.e.genOf(h)
	if err == nil {
		obj, err = g.resolve(ref{handle: h})
	}
	if err != nil {
		c.m.errors.WithLabelValues(procName(progNFSACL, nfsaclProcGetacl), "NFS3ERR_STALE").Inc()
		return statusOnly(xid, nfs3ErrStale)
	}
	n := 4*6 + 4 + 4 + fattrLen + 4 + 2*8
	b := getReply(4 + n)
	*b = appendReplyHeader(*b, n, xid)
	*b = binary.BigEndian.AppendUint32(*b, 0) // NFS3_OK
	*b = binary.BigEndian.AppendUint32(*b, 1)
	*b = appendFattr(*b, obj.info)
	*b = binary.BigEndian.AppendUint32(*b, mask&nfsaclMaskAll)
	for range 2 { // access ACL, default ACL: no entries
		*b = binary.BigEndian.AppendUint32(*b, 0)
		*b = binary.BigEndian.AppendUint32(*b, 0)
	}
	return b
}

// statusOnly is a failed GETACL3res or SETACL3res: the status and no
// attributes (post_op_attr FALSE).
func statusOnly(xid, status uint32) *[]byte {
	n := 4*6 + 4 + 4
	b := getReply(4 + n)
	*b = appendReplyHeader(*b, n, xid)
	*b = binary.BigEndian.AppendUint32(*b, status)
	*b = binary.BigEndian.AppendUint32(*b, 0)
	return b
}
