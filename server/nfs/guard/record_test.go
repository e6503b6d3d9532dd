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
)

// xb builds XDR by hand, so tests can also build what no encoder would.
type xb struct{ b []byte }

func (x *xb) u32(vs ...uint32) *xb {
	for _, v := range vs {
		x.b = binary.BigEndian.AppendUint32(x.b, v)
	}
	return x
}

func (x *xb) u64(v uint64) *xb { x.b = binary.BigEndian.AppendUint64(x.b, v); return x }

// opaque appends a length-prefixed, padded opaque.
func (x *xb) opaque(p []byte) *xb {
	x.u32(uint32(len(p)))
	x.b = append(x.b, p...)
	for len(x.b)%4 != 0 {
		x.b = append(x.b, 0)
	}
	return x
}

func (x *xb) raw(p []byte) *xb { x.b = append(x.b, p...); return x }

// header builds a call header with the given credential.
func header(prog, vers, proc, credFlavor uint32, cred []byte) *xb {
	x := &xb{}
	x.u32(0x1234, msgCall, rpcVersion, prog, vers, proc, credFlavor)
	x.opaque(cred)
	x.u32(AuthNone, 0)
	return x
}

func unixCred(name string, gids int) []byte {
	x := &xb{}
	x.u32(7).opaque([]byte(name)).u32(1000, 100, uint32(gids))
	for i := 0; i < gids; i++ {
		x.u32(uint32(i))
	}
	return x.b
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
		{"nfs null", nullNFS().b, ProblemNone, true},
		{"nfs getattr auth_unix", header(ProgNFS, 3, nfsGetattr, AuthUnix, unixCred("builder-1", 3)).opaque(fh32).b, ProblemNone, true},
		{"nfs lookup", header(ProgNFS, 3, nfsLookup, AuthNone, nil).opaque(fh32).opaque([]byte("hello.txt")).b, ProblemNone, true},
		{"nfs read", header(ProgNFS, 3, nfsRead, AuthNone, nil).opaque(fh32).u64(0).u32(1 << 20).b, ProblemNone, true},
		{"nfs readdirplus", header(ProgNFS, 3, nfsReaddirplus, AuthNone, nil).opaque(fh32).u64(0).u64(0).u32(8192, 65536).b, ProblemNone, true},
		{"nfs write (answered ROFS by go-nfs)", header(ProgNFS, 3, nfsWrite, AuthNone, nil).opaque(fh32).u64(0).u32(5, 2).opaque([]byte("hello")).b, ProblemNone, true},
		{"nfs setattr with guard", header(ProgNFS, 3, nfsSetattr, AuthNone, nil).opaque(fh32).u32(1, 0o644, 0, 0, 1).u64(0).u32(2, 1, 2, 0, 1, 5, 6).b, ProblemNone, true},
		{"nfs create exclusive", header(ProgNFS, 3, nfsCreate, AuthNone, nil).opaque(fh32).opaque([]byte("new")).u32(2).u64(99).b, ProblemNone, true},
		{"nfs symlink", header(ProgNFS, 3, nfsSymlink, AuthNone, nil).opaque(fh32).opaque([]byte("l")).u32(0, 0, 0, 0, 0, 0).opaque([]byte("/nix/store/x")).b, ProblemNone, true},
		{"nfs rename", header(ProgNFS, 3, nfsRename, AuthNone, nil).opaque(fh32).opaque([]byte("a")).opaque(fh32).opaque([]byte("b")).b, ProblemNone, true},
		{"mount mnt", header(ProgMount, 3, mountMnt, AuthUnix, unixCred("h", 0)).opaque([]byte("/gen/42")).b, ProblemNone, true},
		{"nfsacl probe passes to go-nfs", header(ProgNFSACL, 3, 1, AuthUnix, unixCred("h", 1)).raw([]byte("whatever args")).b, ProblemNone, false},
		{"unknown program with garbage args", header(400000, 1, 9, AuthNone, nil).u32(0xffffffff, 0x7ffffff0).b, ProblemNone, false},
		{"bytes after complete args", nullNFS().u32(1, 2, 3).b, ProblemNone, true},

		{"truncated header", nullNFS().b[:36], ProblemSize, false},
		{"empty", nil, ProblemSize, false},
		{"msg_type reply", (&xb{}).u32(1, 1, 0, 0, 0, 0, 0, 0, 0, 0).b, ProblemMsgType, false},
		{"rpcvers 3", (&xb{}).u32(1, 0, 3, ProgNFS, 3, 0, 0, 0, 0, 0).b, ProblemRPCVers, false},
		{"nfs v4", header(ProgNFS, 4, 1, AuthNone, nil).opaque(nil).b, ProblemVersion, false},
		{"nfs v2", header(ProgNFS, 2, 1, AuthNone, nil).b, ProblemVersion, false},
		{"mount v1", header(ProgMount, 1, 1, AuthNone, nil).opaque([]byte("/")).b, ProblemVersion, false},
		{"cred length 0x7ffffff0", (&xb{}).u32(1, 0, 2, ProgNFS, 3, 0, AuthUnix, 0x7ffffff0, 0, 0, 0, 0).b, ProblemCred, false},
		{"cred 401 bytes", header(ProgNFS, 3, 0, 99, make([]byte, 401)).b, ProblemCred, false},
		{"cred 400 bytes unknown flavor", header(ProgNFS, 3, 0, 99, make([]byte, 400)).b, ProblemNone, true},
		{"cred longer than record", (&xb{}).u32(1, 0, 2, ProgNFS, 3, 0, 0, 200, 0, 0, 0, 0).b, ProblemCred, false},
		{"verf 401 bytes", (&xb{}).u32(1, 0, 2, ProgNFS, 3, 0, 0, 0, 0, 401).raw(make([]byte, 404)).b, ProblemVerf, false},
		{"verf length huge", (&xb{}).u32(1, 0, 2, ProgNFS, 3, 0, 0, 0, 0, 0xfffffff0).b, ProblemVerf, false},
		{"auth_unix machine name 256", header(ProgNFS, 3, 0, AuthUnix, unixCred(strings.Repeat("m", 256), 0)).b, ProblemCred, false},
		{"auth_unix 17 gids", header(ProgNFS, 3, 0, AuthUnix, unixCred("h", 17)).b, ProblemCred, false},
		{"auth_unix gid count beyond body", header(ProgNFS, 3, 0, AuthUnix, (&xb{}).u32(7).opaque([]byte("h")).u32(0, 0, 5, 1).b).b, ProblemCred, false},
		{"auth_unix truncated", header(ProgNFS, 3, 0, AuthUnix, []byte{0, 0, 0, 1, 0, 0}).b, ProblemCred, false},
		{"auth_unix name length huge", header(ProgNFS, 3, 0, AuthUnix, (&xb{}).u32(7, 0xffffff00).b).b, ProblemCred, false},
		{"getattr handle length huge", header(ProgNFS, 3, nfsGetattr, AuthNone, nil).u32(0x7ffffff0).b, ProblemArgs, false},
		{"getattr handle 65 bytes", header(ProgNFS, 3, nfsGetattr, AuthNone, nil).opaque(make([]byte, 65)).b, ProblemArgs, false},
		{"getattr handle past end", header(ProgNFS, 3, nfsGetattr, AuthNone, nil).u32(64).raw(make([]byte, 8)).b, ProblemArgs, false},
		{"getattr no handle", header(ProgNFS, 3, nfsGetattr, AuthNone, nil).b, ProblemArgs, false},
		{"lookup name 0x7ffffff0", header(ProgNFS, 3, nfsLookup, AuthNone, nil).opaque(fh32).u32(0x7ffffff0).b, ProblemArgs, false},
		{"lookup name 256", header(ProgNFS, 3, nfsLookup, AuthNone, nil).opaque(fh32).opaque(make([]byte, 256)).b, ProblemArgs, false},
		{"read truncated after handle", header(ProgNFS, 3, nfsRead, AuthNone, nil).opaque(fh32).u32(0).b, ProblemArgs, false},
		{"write data length beyond record", header(ProgNFS, 3, nfsWrite, AuthNone, nil).opaque(fh32).u64(0).u32(5, 2).u32(1 << 30).b, ProblemArgs, false},
		{"symlink target huge", header(ProgNFS, 3, nfsSymlink, AuthNone, nil).opaque(fh32).opaque([]byte("l")).u32(0, 0, 0, 0, 0, 0).u32(0xfffffff0).b, ProblemArgs, false},
		{"sattr bool 7", header(ProgNFS, 3, nfsMkdir, AuthNone, nil).opaque(fh32).opaque([]byte("d")).u32(7, 0, 0, 0, 0, 0).b, ProblemArgs, false},
		{"create bad mode", header(ProgNFS, 3, nfsCreate, AuthNone, nil).opaque(fh32).opaque([]byte("n")).u32(9).b, ProblemArgs, false},
		{"mount dirpath huge", header(ProgMount, 3, mountMnt, AuthNone, nil).u32(0x7ffffff0).b, ProblemArgs, false},
		{"mount dirpath 1025", header(ProgMount, 3, mountMnt, AuthNone, nil).opaque(make([]byte, 1025)).b, ProblemArgs, false},
		{"garbage after valid header", header(ProgNFS, 3, nfsReaddirplus, AuthNone, nil).raw([]byte("\xde\xad\xbe\xef garbage garbage")).b, ProblemArgs, false},
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
	rec := header(ProgNFS, 3, nfsNull, a.Flavor, a.Body).b
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
		header(ProgNFS, 3, nfsGetattr, AuthUnix, unixCred("h", 2)).opaque(fh32).b,
		header(ProgNFS, 3, nfsLookup, AuthNone, nil).opaque(fh32).opaque([]byte("x")).b,
		header(ProgNFS, 3, nfsSymlink, AuthNone, nil).opaque(fh32).opaque([]byte("l")).u32(1, 5, 0, 0, 0, 2, 1, 1).opaque([]byte("t")).b,
		header(ProgMount, 3, mountMnt, AuthNone, nil).opaque([]byte("/gen/1")).b,
		header(ProgNFS, 3, nfsSetattr, AuthNone, nil).opaque(fh32).u32(0, 0, 0, 1).u64(5).u32(0, 0, 1, 1, 1).b,
		(&xb{}).u32(1, 0, 2, ProgNFS, 3, 0, AuthUnix, 0x7ffffff0, 0, 0, 0, 0).b,
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
