package guard

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/willscott/go-nfs-client/nfs/rpc"
	"github.com/willscott/go-nfs-client/nfs/xdr"

	"github.com/strata-nix/strata/internal/nfsraw"
)

// xb builds XDR by hand, so tests can also build what no encoder would.
type xb = nfsraw.Enc

// header builds a call header with the given credential.
func header(prog, vers, proc, credFlavor uint32, cred []byte) *xb {
	x := &xb{}
	x.U32(0x1234, msgCall, rpcVersion, prog, vers, proc, credFlavor)
	x.Opaque(cred)
	x.U32(AuthNone, 0)
	return x
}

func unixCred(name string, gids int) []byte {
	x := &xb{}
	x.U32(7).Opaque([]byte(name)).U32(1000, 100, uint32(gids))
	for i := 0; i < gids; i++ {
		x.U32(uint32(i))
	}
	return x.B
}

var fh32 = bytes.Repeat([]byte{0xab}, 32)

func TestParseCall(t *testing.T) {
	nullNFS := func() *xb { return header(ProgNFS, 3, nfsNull, AuthNone, nil) }
	cases := []struct {
		name    string
		rec     []byte
		problem Problem // ProblemNone: accepted
		known   bool
	}{
		{"nfs null", nullNFS().B, ProblemNone, true},
		{"nfs getattr auth_unix", header(ProgNFS, 3, nfsGetattr, AuthUnix, unixCred("builder-1", 3)).Opaque(fh32).B, ProblemNone, true},
		{"nfs lookup", header(ProgNFS, 3, nfsLookup, AuthNone, nil).Opaque(fh32).Opaque([]byte("hello.txt")).B, ProblemNone, true},
		{"nfs read", header(ProgNFS, 3, nfsRead, AuthNone, nil).Opaque(fh32).U64(0).U32(1 << 20).B, ProblemNone, true},
		{"nfs readdirplus", header(ProgNFS, 3, nfsReaddirplus, AuthNone, nil).Opaque(fh32).U64(0).U64(0).U32(8192, 65536).B, ProblemNone, true},
		{"nfs write (answered ROFS by go-nfs)", header(ProgNFS, 3, nfsWrite, AuthNone, nil).Opaque(fh32).U64(0).U32(5, 2).Opaque([]byte("hello")).B, ProblemNone, true},
		{"nfs setattr with guard", header(ProgNFS, 3, nfsSetattr, AuthNone, nil).Opaque(fh32).U32(1, 0o644, 0, 0, 1).U64(0).U32(2, 1, 2, 0, 1, 5, 6).B, ProblemNone, true},
		{"nfs create exclusive", header(ProgNFS, 3, nfsCreate, AuthNone, nil).Opaque(fh32).Opaque([]byte("new")).U32(2).U64(99).B, ProblemNone, true},
		{"nfs symlink", header(ProgNFS, 3, nfsSymlink, AuthNone, nil).Opaque(fh32).Opaque([]byte("l")).U32(0, 0, 0, 0, 0, 0).Opaque([]byte("/nix/store/x")).B, ProblemNone, true},
		{"nfs rename", header(ProgNFS, 3, nfsRename, AuthNone, nil).Opaque(fh32).Opaque([]byte("a")).Opaque(fh32).Opaque([]byte("b")).B, ProblemNone, true},
		{"mount mnt", header(ProgMount, 3, mountMnt, AuthUnix, unixCred("h", 0)).Opaque([]byte("/gen/42")).B, ProblemNone, true},
		{"nfsacl probe passes to go-nfs", header(ProgNFSACL, 3, 1, AuthUnix, unixCred("h", 1)).Raw([]byte("whatever args")).B, ProblemNone, false},
		{"unknown program with garbage args", header(400000, 1, 9, AuthNone, nil).U32(0xffffffff, 0x7ffffff0).B, ProblemNone, false},
		{"bytes after complete args", nullNFS().U32(1, 2, 3).B, ProblemNone, true},

		{"truncated header", nullNFS().B[:36], ProblemSize, false},
		{"empty", nil, ProblemSize, false},
		{"msg_type reply", (&xb{}).U32(1, 1, 0, 0, 0, 0, 0, 0, 0, 0).B, ProblemMsgType, false},
		{"rpcvers 3", (&xb{}).U32(1, 0, 3, ProgNFS, 3, 0, 0, 0, 0, 0).B, ProblemRPCVers, false},
		{"nfs v4", header(ProgNFS, 4, 1, AuthNone, nil).Opaque(nil).B, ProblemVersion, false},
		{"nfs v2", header(ProgNFS, 2, 1, AuthNone, nil).B, ProblemVersion, false},
		{"mount v1", header(ProgMount, 1, 1, AuthNone, nil).Opaque([]byte("/")).B, ProblemVersion, false},
		{"cred length 0x7ffffff0", (&xb{}).U32(1, 0, 2, ProgNFS, 3, 0, AuthUnix, 0x7ffffff0, 0, 0, 0, 0).B, ProblemCred, false},
		{"cred 401 bytes", header(ProgNFS, 3, 0, 99, make([]byte, 401)).B, ProblemCred, false},
		{"cred 400 bytes unknown flavor", header(ProgNFS, 3, 0, 99, make([]byte, 400)).B, ProblemNone, true},
		{"cred longer than record", (&xb{}).U32(1, 0, 2, ProgNFS, 3, 0, 0, 200, 0, 0, 0, 0).B, ProblemCred, false},
		{"verf 401 bytes", (&xb{}).U32(1, 0, 2, ProgNFS, 3, 0, 0, 0, 0, 401).Raw(make([]byte, 404)).B, ProblemVerf, false},
		{"verf length huge", (&xb{}).U32(1, 0, 2, ProgNFS, 3, 0, 0, 0, 0, 0xfffffff0).B, ProblemVerf, false},
		{"auth_unix machine name 256", header(ProgNFS, 3, 0, AuthUnix, unixCred(strings.Repeat("m", 256), 0)).B, ProblemCred, false},
		{"auth_unix 17 gids", header(ProgNFS, 3, 0, AuthUnix, unixCred("h", 17)).B, ProblemCred, false},
		{"auth_unix gid count beyond body", header(ProgNFS, 3, 0, AuthUnix, (&xb{}).U32(7).Opaque([]byte("h")).U32(0, 0, 5, 1).B).B, ProblemCred, false},
		{"auth_unix truncated", header(ProgNFS, 3, 0, AuthUnix, []byte{0, 0, 0, 1, 0, 0}).B, ProblemCred, false},
		{"auth_unix name length huge", header(ProgNFS, 3, 0, AuthUnix, (&xb{}).U32(7, 0xffffff00).B).B, ProblemCred, false},
		{"getattr handle length huge", header(ProgNFS, 3, nfsGetattr, AuthNone, nil).U32(0x7ffffff0).B, ProblemArgs, false},
		{"getattr handle 65 bytes", header(ProgNFS, 3, nfsGetattr, AuthNone, nil).Opaque(make([]byte, 65)).B, ProblemArgs, false},
		{"getattr handle past end", header(ProgNFS, 3, nfsGetattr, AuthNone, nil).U32(64).Raw(make([]byte, 8)).B, ProblemArgs, false},
		{"getattr no handle", header(ProgNFS, 3, nfsGetattr, AuthNone, nil).B, ProblemArgs, false},
		{"lookup name 0x7ffffff0", header(ProgNFS, 3, nfsLookup, AuthNone, nil).Opaque(fh32).U32(0x7ffffff0).B, ProblemArgs, false},
		{"lookup name 256", header(ProgNFS, 3, nfsLookup, AuthNone, nil).Opaque(fh32).Opaque(make([]byte, 256)).B, ProblemArgs, false},
		{"read truncated after handle", header(ProgNFS, 3, nfsRead, AuthNone, nil).Opaque(fh32).U32(0).B, ProblemArgs, false},
		{"write data length beyond record", header(ProgNFS, 3, nfsWrite, AuthNone, nil).Opaque(fh32).U64(0).U32(5, 2).U32(1 << 30).B, ProblemArgs, false},
		{"symlink target huge", header(ProgNFS, 3, nfsSymlink, AuthNone, nil).Opaque(fh32).Opaque([]byte("l")).U32(0, 0, 0, 0, 0, 0).U32(0xfffffff0).B, ProblemArgs, false},
		{"sattr bool 7", header(ProgNFS, 3, nfsMkdir, AuthNone, nil).Opaque(fh32).Opaque([]byte("d")).U32(7, 0, 0, 0, 0, 0).B, ProblemArgs, false},
		{"create bad mode", header(ProgNFS, 3, nfsCreate, AuthNone, nil).Opaque(fh32).Opaque([]byte("n")).U32(9).B, ProblemArgs, false},
		{"mount dirpath huge", header(ProgMount, 3, mountMnt, AuthNone, nil).U32(0x7ffffff0).B, ProblemArgs, false},
		{"mount dirpath 1025", header(ProgMount, 3, mountMnt, AuthNone, nil).Opaque(make([]byte, 1025)).B, ProblemArgs, false},
		{"garbage after valid header", header(ProgNFS, 3, nfsReaddirplus, AuthNone, nil).Raw([]byte("\xde\xad\xbe\xef garbage garbage")).B, ProblemArgs, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseCall(tc.rec)
			if tc.problem == ProblemNone {
				if err != nil {
					t.Fatalf("refused a valid call: %v", err)
				}
				if c.Known != tc.known {
					t.Errorf("Known = %v, want %v", c.Known, tc.known)
				}
				return
			}
			var re *RecordError
			if !errors.As(err, &re) {
				t.Fatalf("accepted (err %v), want problem %v", err, tc.problem)
			}
			if re.Problem != tc.problem {
				t.Errorf("problem %v (%v), want %v", re.Problem, err, tc.problem)
			}
		})
	}
}

func TestParseCallUnixCred(t *testing.T) {
	// A credential as go-nfs-client encodes it.
	a := rpc.NewAuthUnix("builder-7", 1000, 100).Auth()
	rec := header(ProgNFS, 3, nfsNull, a.Flavor, a.Body).B
	c, err := ParseCall(rec)
	if err != nil {
		t.Fatal(err)
	}
	if c.Unix == nil || c.Unix.MachineName != "builder-7" || c.Unix.UID != 1000 || c.Unix.GID != 100 || len(c.Unix.Gids) != 1 {
		t.Fatalf("parsed credential %+v", c.Unix)
	}
	if c.XID != 0x1234 || c.Prog != ProgNFS || c.Vers != 3 {
		t.Fatalf("parsed header %+v", c)
	}
}

func TestCheckMarker(t *testing.T) {
	cases := []struct {
		name    string
		marker  uint32
		n       int
		problem Problem
	}{
		{"last fragment of 100", lastFragment | 100, 100, ProblemNone},
		{"exactly the cap", lastFragment | 1000, 1000, ProblemNone},
		{"without last bit", 100, 0, ProblemFragment},
		{"huge", lastFragment | 0x7fffffff, 0, ProblemSize},
		{"one over the cap", lastFragment | 1001, 0, ProblemSize},
		{"shorter than a call", lastFragment | 39, 0, ProblemSize},
		{"zero", lastFragment, 0, ProblemSize},
	}
	for _, tc := range cases {
		n, err := CheckMarker(tc.marker, 1000)
		var re *RecordError
		switch {
		case tc.problem == ProblemNone && (err != nil || n != tc.n):
			t.Errorf("%s: got %d, %v; want %d", tc.name, n, err, tc.n)
		case tc.problem != ProblemNone && (!errors.As(err, &re) || re.Problem != tc.problem):
			t.Errorf("%s: got %v, want problem %v", tc.name, err, tc.problem)
		}
	}
}

// FuzzRecord feeds arbitrary streams to the record check. It must never
// panic, and whatever it accepts must be decodable by the very decoders
// go-nfs uses without running out of bytes: declared lengths fit the record.
func FuzzRecord(f *testing.F) {
	seeds := [][]byte{
		header(ProgNFS, 3, nfsGetattr, AuthUnix, unixCred("h", 2)).Opaque(fh32).B,
		header(ProgNFS, 3, nfsLookup, AuthNone, nil).Opaque(fh32).Opaque([]byte("x")).B,
		header(ProgNFS, 3, nfsSymlink, AuthNone, nil).Opaque(fh32).Opaque([]byte("l")).U32(1, 5, 0, 0, 0, 2, 1, 1).Opaque([]byte("t")).B,
		header(ProgMount, 3, mountMnt, AuthNone, nil).Opaque([]byte("/gen/1")).B,
		header(ProgNFS, 3, nfsSetattr, AuthNone, nil).Opaque(fh32).U32(0, 0, 0, 1).U64(5).U32(0, 0, 1, 1, 1).B,
		(&xb{}).U32(1, 0, 2, ProgNFS, 3, 0, AuthUnix, 0x7ffffff0, 0, 0, 0, 0).B,
	}
	for _, s := range seeds {
		f.Add(binary.BigEndian.AppendUint32(nil, lastFragment|uint32(len(s))), s)
	}
	f.Fuzz(func(t *testing.T, marker []byte, body []byte) {
		if len(marker) < 4 {
			return
		}
		n, err := CheckMarker(binary.BigEndian.Uint32(marker), 1<<16)
		if err != nil || n > len(body) {
			return
		}
		rec := body[:n]
		c, err := ParseCall(rec)
		if err != nil {
			return
		}
		// Decode the way go-nfs does; nothing may run short.
		r := bytes.NewReader(rec)
		var h struct {
			XID, Type uint32
			rpc.Header
		}
		if err := xdr.Read(r, &h); err != nil {
			t.Fatalf("accepted a record whose header go-nfs cannot decode: %v", err)
		}
		if len(h.Cred.Body) > MaxAuthBody || len(h.Verf.Body) > MaxAuthBody {
			t.Fatalf("accepted auth bodies of %d and %d bytes", len(h.Cred.Body), len(h.Verf.Body))
		}
		if c.Known {
			if err := decodeArgsLikeGoNFS(r, c.Prog, c.Proc); err != nil {
				t.Fatalf("accepted prog %d proc %d whose arguments go-nfs cannot decode: %v", c.Prog, c.Proc, err)
			}
		}
	})
}

// decodeArgsLikeGoNFS decodes arguments with go-nfs's own decoders
// (go-nfs-client xdr.ReadOpaque and xdr.Read of go-nfs's argument structs),
// in the order go-nfs v0.0.4's handlers use.
func decodeArgsLikeGoNFS(r io.Reader, prog, proc uint32) error {
	type dirOp struct{ Handle, Filename []byte }
	raw := func() error { _, err := xdr.ReadOpaque(r); return err }
	read := func(v any) error { return xdr.Read(r, v) }
	u32 := func() (uint32, error) { return xdr.ReadUint32(r) }
	sattr := func() error {
		for _, size := range []int{4, 4, 4, 8} {
			set, err := u32()
			if err != nil {
				return err
			}
			if set != 0 {
				if _, err := io.ReadFull(r, make([]byte, size)); err != nil {
					return err
				}
			}
		}
		for range 2 {
			how, err := u32()
			if err != nil {
				return err
			}
			if how == 2 {
				var t struct{ S, N uint32 }
				if err := read(&t); err != nil {
					return err
				}
			}
		}
		return nil
	}
	chain := func(steps ...func() error) error {
		for _, s := range steps {
			if err := s(); err != nil {
				return err
			}
		}
		return nil
	}
	dirop := func() error { var d dirOp; return read(&d) }
	if prog == ProgMount {
		if proc == mountMnt || proc == mountUmnt {
			return raw()
		}
		return nil
	}
	switch proc {
	case nfsGetattr, nfsReadlink, nfsFsstat, nfsFsinfo, nfsPathconf, nfsCommit:
		return raw()
	case nfsSetattr:
		return chain(raw, sattr, func() error {
			g, err := u32()
			if err == nil && g != 0 {
				var t struct{ S, N uint32 }
				err = read(&t)
			}
			return err
		})
	case nfsLookup, nfsRemove, nfsRmdir:
		return dirop()
	case nfsAccess:
		return chain(raw, func() error { _, err := u32(); return err })
	case nfsRead:
		var a struct {
			Handle []byte
			Offset uint64
			Count  uint32
		}
		return read(&a)
	case nfsWrite:
		var a struct {
			Handle []byte
			Offset uint64
			Count  uint32
			How    uint32
			Data   []byte
		}
		return read(&a)
	case nfsCreate:
		return chain(dirop, func() error {
			how, err := u32()
			if err != nil {
				return err
			}
			if how < 2 {
				return sattr()
			}
			var v [8]byte
			return read(&v)
		})
	case nfsMkdir:
		return chain(dirop, sattr)
	case nfsSymlink, nfsLink:
		return chain(dirop, sattr, raw)
	case nfsMknod:
		return chain(dirop, func() error { _, err := u32(); return err })
	case nfsRename:
		return chain(dirop, dirop)
	case nfsReaddir:
		var a struct {
			Handle              []byte
			Cookie, CookieVerif uint64
			Count               uint32
		}
		return read(&a)
	case nfsReaddirplus:
		var a struct {
			Handle              []byte
			Cookie, CookieVerif uint64
			DirCount, MaxCount  uint32
		}
		return read(&a)
	}
	return nil
}
