//go:build integration

package nfs

import (
	"bytes"
	"testing"

	"github.com/strata-nix/strata/internal/nfsraw"
)

// TestGetACL: NFSACL v3 GETACL, as the Linux client sends it when a
// non-owner opens a file through an overlay on the mount, is answered on
// both paths (fast path on and off) with the object's attributes, the mask
// asked for and no ACL entries; a forged handle gets NFS3ERR_STALE; NULL is
// answered; SETACL gets NFS3ERR_ROFS (never PROG_UNAVAIL, which turns
// ACLs off for the whole mount in the client).
func TestGetACL(t *testing.T) {
	fx := newFixture(t, nil)
	for _, noFast := range []bool{false, true} {
		_, addr, _ := fx.serveWith(t, noFast)
		rc := raw(t, addr)
		root := mountRaw(t, rc, "/gen/1")
		for _, c := range []struct {
			path string
			mask uint32
		}{{"pkg-a/data.txt", 0x3}, {"pkg-a", 0xf}, {"pkg-a", 0xc}, {"", 0x3}} {
			fh := root
			if c.path != "" {
				fh = lookupPath(t, rc, root, c.path)
			}
			_, want, err := rc.Getattr(fh)
			if err != nil {
				t.Fatal(err)
			}
			d, err := rc.Call(progNFSACL, nfsaclProcGetacl, (&nfsraw.Enc{}).Opaque(fh).U32(c.mask).B)
			if err != nil {
				t.Fatalf("GETACL %q: %v", c.path, err)
			}
			st := d.U32()
			attr, ok := d.PostOpAttr()
			mask := d.U32()
			var counts [4]uint32
			for i := range counts {
				counts[i] = d.U32()
			}
			if d.Err != nil || st != 0 || !ok || attr != want || mask != c.mask || counts != [4]uint32{} || d.Left() != 0 {
				t.Errorf("GETACL %q mask %#x (fast path off %v): status %d attrs %v (%+v, GETATTR %+v) mask %#x counts %v, %d bytes left, err %v",
					c.path, c.mask, noFast, st, ok, attr, want, mask, counts, d.Left(), d.Err)
			}
		}
		forged := bytes.Clone(lookupPath(t, rc, root, "pkg-a/data.txt"))
		forged[len(forged)-1] ^= 1
		d, err := rc.Call(progNFSACL, nfsaclProcGetacl, (&nfsraw.Enc{}).Opaque(forged).U32(3).B)
		if err != nil || d.U32() != nfs3ErrStale {
			t.Errorf("GETACL of a forged handle: err %v, want NFS3ERR_STALE", err)
		}
		if d, err := rc.Call(progNFSACL, nfsaclProcNull, nil); err != nil || d.Left() != 0 {
			t.Errorf("NFSACL NULL: err %v", err)
		}
		d, err = rc.Call(progNFSACL, nfsaclProcSetacl, (&nfsraw.Enc{}).Opaque(root).U32(0).B)
		if err != nil || d.U32() != nfs3ErrROFS {
			t.Errorf("SETACL: err %v, want NFS3ERR_ROFS", err)
		}
	}
}
