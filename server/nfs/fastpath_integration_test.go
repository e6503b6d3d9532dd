//go:build integration

package nfs

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/internal/nfsraw"
)

// TestFastPathMatchesGoNFS sends the same GETATTR, LOOKUP, READ,
// READDIRPLUS and COMMIT calls
// (good and bad handles, every kind of object, every edge of a READ) to an
// export with the fast path and to one where go-nfs answers everything, and
// requires byte-identical replies.
func TestFastPathMatchesGoNFS(t *testing.T) {
	fx := newFixture(t, func(store string) {
		// every file type, for the attribute encoding
		if err := os.MkdirAll(filepath.Join(store, "special"), 0o755); err != nil {
			t.Fatal(err)
		}
		for _, n := range []struct {
			name string
			mode uint32
			dev  int
		}{{"fifo", unix.S_IFIFO | 0o644, 0}, {"null", unix.S_IFCHR | 0o666, int(unix.Mkdev(1, 3))},
			{"loop", unix.S_IFBLK | 0o660, int(unix.Mkdev(7, 300))}, {"sock", unix.S_IFSOCK | 0o755, 0}} {
			if err := unix.Mknod(filepath.Join(store, "special", n.name), n.mode, n.dev); err != nil {
				t.Fatal(err)
			}
		}
		sticky := filepath.Join(store, "special", "sticky")
		if err := os.Mkdir(sticky, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(sticky, 0o1777|os.ModeSticky); err != nil {
			t.Fatal(err)
		}
	})
	fast, fastAddr, _ := fx.serveWith(t, false)
	slow, slowAddr, _ := fx.serveWith(t, true)
	rf, rs := raw(t, fastAddr), raw(t, slowAddr)

	same := func(what string, proc uint32, args *nfsraw.Enc) {
		t.Helper()
		df, errF := rf.Call(progNFS, proc, args.B)
		ds, errS := rs.Call(progNFS, proc, args.B)
		if errF != nil || errS != nil {
			t.Fatalf("%s: fast path error %v, go-nfs error %v", what, errF, errS)
		}
		if !bytes.Equal(df.B, ds.B) {
			t.Errorf("%s: fast path reply differs from go-nfs's:\nfast  %x\ngo-nfs %x", what, df.B, ds.B)
		}
	}

	paths := []string{"pkg-a", "pkg-a/bin/run", "pkg-a/data.txt", "pkg-a/empty", "pkg-a/suid",
		"pkg-a/owned", "pkg-a/lib", "pkg-a/escape", "pkg-b/lib/libx.so", "pkg-b/weird name @x",
		"pkg-b/hardlink", "@at", "many", "many/f123", "special", "special/fifo", "special/null",
		"special/loop", "special/sock", "special/sticky"}
	for gen := uint64(1); gen <= 2; gen++ {
		root := mountRaw(t, rf, fmt.Sprintf("/gen/%d", gen))
		handles := map[string][]byte{"": root}
		for _, p := range paths {
			handles[p] = lookupPath(t, rf, root, p)
		}
		forged := bytes.Clone(handles["pkg-a/data.txt"])
		forged[len(forged)-1] ^= 1
		handles["forged"] = forged
		handles["short"] = []byte{1, 2, 3, 4}
		for name, h := range handles {
			w := fmt.Sprintf("gen %d %q", gen, name)
			same(w+" GETATTR", 1, (&nfsraw.Enc{}).Opaque(h))
			for _, child := range []string{"bin", "data.txt", "lib", "escape", "f007", ".", "..",
				"missing", "a/b", "", "weird name @x", "libx.so"} {
				same(fmt.Sprintf("%s LOOKUP %q", w, child), 3, (&nfsraw.Enc{}).Opaque(h).Str(child))
			}
			for _, rd := range []struct {
				off   uint64
				count uint32
			}{{0, 0}, {0, 1}, {0, 4096}, {1, 3}, {5, 1 << 20}, {3<<20 + 123 - 70001, 1 << 20}, {3<<20 + 100, 100}, {3<<20 + 123, 10},
				{1 << 40, 10}, {0, 1 << 25}, {1 << 63, 1}} {
				same(fmt.Sprintf("%s READ %d+%d", w, rd.off, rd.count), 6, (&nfsraw.Enc{}).Opaque(h).U64(rd.off).U32(rd.count))
			}
			same(w+" COMMIT", 21, (&nfsraw.Enc{}).Opaque(h).U64(0).U32(0))
			verf := verifier(encodeToken(h) + "/../" + encodeToken(h))
			for _, rd := range []struct {
				cookie, verf       uint64
				dircount, maxcount uint32
			}{{0, 0, 512, 4096}, {0, 0, 8192, 32768}, {0, 0, 1 << 20, 1 << 20}, {0, 12345, 512, 4096},
				{2, verf, 512, 4096}, {5, verf, 4096, 8192}, {17, 0, 512, 4096}, {150, verf, 512, 4096},
				{301, verf, 512, 4096}, {302, verf, 512, 4096}, {1000, verf, 512, 4096},
				{5, verf ^ 2, 512, 4096}, {0, 0, 511, 4096}, {0, 0, 512, 4095}, {3, verf, 100000, 4096}} {
				same(fmt.Sprintf("%s READDIRPLUS cookie %d verf %x counts %d/%d", w, rd.cookie, rd.verf, rd.dircount, rd.maxcount),
					17, (&nfsraw.Enc{}).Opaque(h).U64(rd.cookie).U64(rd.verf).U32(rd.dircount).U32(rd.maxcount))
			}
		}
	}
	if n := fast.fastCalls.Load(); n == 0 {
		t.Error("the fast path answered no call")
	}
	if n := slow.fastCalls.Load(); n != 0 {
		t.Errorf("the export without fast path answered %d calls itself", n)
	}
}

// TestFastPathRepliesInterleaveWhole pipelines many calls, some answered by
// the fast path and some by go-nfs (READDIRPLUS), on one connection: every
// reply must come back whole and matched to its call.
func TestFastPathRepliesInterleaveWhole(t *testing.T) {
	fx := newFixture(t, nil)
	_, addr, _ := fx.serve(t)
	rc := raw(t, addr)
	root := mountRaw(t, rc, "/gen/1")
	many := lookupPath(t, rc, root, "many")
	big := lookupPath(t, rc, root, "pkg-b/lib/libx.so")

	const n = 200
	var calls []byte
	kinds := map[uint32]uint32{} // xid -> proc
	for i := range n {
		xid := uint32(1000 + i)
		var proc uint32
		var args *nfsraw.Enc
		switch i % 3 {
		case 0:
			proc, args = 6, (&nfsraw.Enc{}).Opaque(big).U64(uint64(i%150)<<14).U32(64<<10)
		case 1:
			proc, args = 17, (&nfsraw.Enc{}).Opaque(many).U64(0).U64(0).U32(4096).U32(32768)
		default:
			proc, args = 3, (&nfsraw.Enc{}).Opaque(many).Str(fmt.Sprintf("f%03d", i%300))
		}
		kinds[xid] = proc
		calls = nfsraw.CallRecord(calls, xid, progNFS, proc, rc.Cred(), args.B)
	}
	go rc.Write(calls)
	seen := map[uint32]bool{}
	for range n {
		xid, d, err := rc.ReadReply()
		if err != nil {
			t.Fatalf("after %d replies: %v", len(seen), err)
		}
		proc, ok := kinds[xid]
		if !ok || seen[xid] {
			t.Fatalf("reply with unknown or repeated xid %d", xid)
		}
		seen[xid] = true
		if st := d.U32(); st != nfsraw.NFS3OK || d.Err != nil {
			t.Fatalf("xid %d proc %d: status %d err %v", xid, proc, st, d.Err)
		}
		if proc == 6 {
			d.PostOpAttr()
			count := d.U32()
			d.U32()
			if data := d.Opaque(); uint32(len(data)) != count || count != 64<<10 || d.Err != nil {
				t.Fatalf("xid %d READ: count %d, %d data bytes, err %v", xid, count, len(data), d.Err)
			}
		}
	}
}
