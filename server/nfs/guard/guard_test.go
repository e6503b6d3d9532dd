package guard

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	gonfs "github.com/willscott/go-nfs"
	nfsc "github.com/willscott/go-nfs-client/nfs"
	"github.com/willscott/go-nfs-client/nfs/rpc"
	"github.com/willscott/go-nfs/helpers"
	"github.com/willscott/go-nfs/helpers/memfs"

	"github.com/strata-nix/strata/internal/nfsdial"
	"github.com/strata-nix/strata/internal/nfsraw"
)

// served is a go-nfs server on an in-memory tree behind a guard on a real
// loopback TCP listener.
type served struct {
	l   *Listener
	reg *prometheus.Registry
}

func serve(t *testing.T, opts Options) *served {
	t.Helper()
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	if opts.Allow == nil {
		opts.Allow = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
	}
	l, err := Listen(inner, opts, nil, reg)
	if err != nil {
		t.Fatal(err)
	}
	mem := memfs.New()
	f, err := mem.Create("/hello.txt")
	if err != nil {
		t.Fatal(err)
	}
	f.Write([]byte("hello through the guard\n"))
	f.Close()
	if f, err = mem.Create("/big"); err != nil {
		t.Fatal(err)
	}
	f.Write(make([]byte, 1<<20))
	f.Close()
	h := helpers.NewCachingHandler(helpers.NewNullAuthHandler(mem), 1024)
	go gonfs.Serve(l, h)
	t.Cleanup(func() { l.Close() })
	return &served{l: l, reg: reg}
}

// metric returns the value of a counter or gauge (with one label value, or
// none) from the registry.
func (s *served) metric(t *testing.T, name, label string) float64 {
	t.Helper()
	mfs, err := s.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if label != "" && (len(m.GetLabel()) == 0 || m.GetLabel()[0].GetValue() != label) {
				continue
			}
			if m.GetCounter() != nil {
				return m.GetCounter().GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	return 0
}

// readHello mounts "/" with go-nfs-client and reads hello.txt.
func readHello(t *testing.T, addr string) error {
	t.Helper()
	c, err := nfsdial.Dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	m := nfsc.Mount{Client: c}
	target, err := m.Mount("/", rpc.NewAuthUnix("guard-test", 0, 0).Auth())
	if err != nil {
		return err
	}
	f, err := target.Open("/hello.txt")
	if err != nil {
		return err
	}
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil {
		return err
	}
	if string(b) != "hello through the guard\n" {
		return errors.New("read wrong content: " + string(b))
	}
	return nil
}

// closedByServer reports whether the server closes c within a second
// (reads end with EOF or a reset rather than a timeout).
func closedByServer(c net.Conn) bool {
	c.SetReadDeadline(time.Now().Add(time.Second))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return false
	}
	return true
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

func TestRealClientThroughGuard(t *testing.T) {
	s := serve(t, Options{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}})
	if err := readHello(t, s.l.Addr().String()); err != nil {
		t.Fatalf("legitimate client failed: %v", err)
	}
	if got := s.metric(t, "strata_nfs_guard_connections_accepted_total", ""); got != 1 {
		t.Errorf("accepted = %v, want 1", got)
	}
	if got := s.metric(t, "strata_nfs_guard_connections_rejected_total", "record"); got != 0 {
		t.Errorf("rejected{record} = %v, want 0", got)
	}
	waitFor(t, "connection count back to 0", func() bool { return s.l.Active() == 0 })
}

func TestBadRecordsCloseOnlyTheirConnection(t *testing.T) {
	s := serve(t, Options{})
	addr := s.l.Addr().String()
	bad := map[string][]byte{
		"cred 0x7ffffff0": frame((&xb{}).U32(1, 0, 2, ProgNFS, 3, 0, AuthUnix, 0x7ffffff0, 0, 0, 0, 0).B),
		"no last bit":     binary.BigEndian.AppendUint32(nil, 60),
		"huge record":     binary.BigEndian.AppendUint32(nil, lastFragment|0x7fffffff),
		"reply":           frame((&xb{}).U32(1, 1, 0, 0, 0, 0, 0, 0, 0, 0).B),
		"lookup name 2G":  frame(header(ProgNFS, 3, nfsLookup, AuthNone, nil).Opaque(fh32).U32(0x7ffffff0).B),
	}
	// A legitimate connection stays open across all of it.
	good, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer good.Close()
	for name, rec := range bad {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.Write(rec)
		if !closedByServer(c) {
			t.Errorf("%s: connection not closed", name)
		}
		c.Close()
	}
	if got := s.metric(t, "strata_nfs_guard_connections_rejected_total", "record"); got != float64(len(bad)) {
		t.Errorf("rejected{record} = %v, want %d", got, len(bad))
	}
	if got := s.metric(t, "strata_nfs_guard_bad_records_total", "cred"); got != 1 {
		t.Errorf("bad_records{cred} = %v, want 1", got)
	}
	// NFS NULL on the connection that stayed open gets a reply.
	good.Write(frame(header(ProgNFS, 3, nfsNull, AuthNone, nil).B))
	good.SetReadDeadline(time.Now().Add(2 * time.Second))
	var hdr [8]byte
	if _, err := io.ReadFull(good, hdr[:]); err != nil {
		t.Fatalf("legitimate connection got no reply: %v", err)
	}
	if xid := binary.BigEndian.Uint32(hdr[4:]); xid != 0x1234 {
		t.Errorf("reply xid %#x", xid)
	}
	if err := readHello(t, addr); err != nil {
		t.Fatalf("legitimate client failed after attacks: %v", err)
	}
}

func frame(rec []byte) []byte {
	return append(binary.BigEndian.AppendUint32(nil, lastFragment|uint32(len(rec))), rec...)
}

func TestAllowlist(t *testing.T) {
	s := serve(t, Options{Allow: []netip.Prefix{netip.MustParsePrefix("10.213.0.0/30")}})
	addr := s.l.Addr().String()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	if !closedByServer(c) {
		t.Fatal("client outside nfs.allow was not closed")
	}
	c.Close()
	if got := s.metric(t, "strata_nfs_guard_connections_rejected_total", "allowlist"); got != 1 {
		t.Errorf("rejected{allowlist} = %v, want 1", got)
	}
	s.l.SetAllow([]netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")})
	if err := readHello(t, addr); err != nil {
		t.Fatalf("allowed client failed: %v", err)
	}
}

// fillCap dials two connections, waits until both are admitted, and
// checks that a third (over, in failures) is closed by the server and
// counted as rejected{cap}. It returns the two.
func fillCap(t *testing.T, s *served, over string) []net.Conn {
	t.Helper()
	addr := s.l.Addr().String()
	var held []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		held = append(held, c)
	}
	waitFor(t, "two admitted connections", func() bool { return s.l.Active() == 2 })
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	if !closedByServer(c) {
		t.Fatalf("%s was not closed", over)
	}
	c.Close()
	if got := s.metric(t, "strata_nfs_guard_connections_rejected_total", "cap"); got != 1 {
		t.Errorf("rejected{cap} = %v, want 1", got)
	}
	return held
}

// freeSlot closes one of the connections fillCap held and checks that a new
// client is served.
func freeSlot(t *testing.T, s *served, held []net.Conn) {
	t.Helper()
	held[0].Close()
	waitFor(t, "slot freed", func() bool { return s.l.Active() == 1 })
	if err := readHello(t, s.l.Addr().String()); err != nil {
		t.Fatalf("client after a slot freed: %v", err)
	}
}

func TestConnectionCap(t *testing.T) {
	s := serve(t, Options{MaxConns: 2})
	held := fillCap(t, s, "connection over the cap")
	if got := s.metric(t, "strata_nfs_guard_connections", ""); got != 2 {
		t.Errorf("current connections = %v, want 2", got)
	}
	freeSlot(t, s, held)
}

func TestIdleAndSlowRecordTimeouts(t *testing.T) {
	s := serve(t, Options{IdleTimeout: 200 * time.Millisecond, RecordTimeout: 200 * time.Millisecond})
	addr := s.l.Addr().String()

	idle, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	slow, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	rec := frame(header(ProgNFS, 3, nfsNull, AuthNone, nil).B)
	slow.Write(rec[:10]) // slowloris: never finishes the record

	start := time.Now()
	if !closedByServer(idle) || !closedByServer(slow) {
		t.Fatal("idle or stalled connection not closed")
	}
	if d := time.Since(start); d < 150*time.Millisecond {
		t.Errorf("closed after %v, before the timeout", d)
	}
	if got := s.metric(t, "strata_nfs_guard_connections_rejected_total", "idle"); got != 2 {
		t.Errorf("rejected{idle} = %v, want 2", got)
	}
	// A client that keeps talking is not idle.
	if err := readHello(t, addr); err != nil {
		t.Fatal(err)
	}
}

// A connection that keeps sending calls is never idle, however long it
// lives past the idle timeout (the guard renews that deadline lazily).
func TestBusyConnectionOutlivesIdleTimeout(t *testing.T) {
	s := serve(t, Options{IdleTimeout: 500 * time.Millisecond})
	c, err := net.Dial("tcp", s.l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rec := frame(header(ProgNFS, 3, nfsNull, AuthNone, nil).B)
	reply := make([]byte, 28) // marker, xid, REPLY, accepted, AUTH_NULL, SUCCESS
	for start := time.Now(); time.Since(start) < 2*time.Second; time.Sleep(50 * time.Millisecond) {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(rec); err != nil {
			t.Fatalf("after %v: write: %v", time.Since(start), err)
		}
		if _, err := io.ReadFull(c, reply); err != nil {
			t.Fatalf("after %v: no reply to NULL on a busy connection: %v", time.Since(start), err)
		}
	}
	if got := s.metric(t, "strata_nfs_guard_connections_rejected_total", "idle"); got != 0 {
		t.Errorf("rejected{idle} = %v, want 0", got)
	}
}

// A client that sends calls but never reads the replies stalls the
// server's writes; the write deadline closes it (counted as idle).
func TestClientThatTakesNoRepliesIsClosed(t *testing.T) {
	s := serve(t, Options{RecordTimeout: 300 * time.Millisecond})
	rc, err := nfsraw.Dial(s.l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	st, root, err := rc.Mount("/")
	if err != nil || st != 0 {
		t.Fatalf("MOUNT /: %d %v", st, err)
	}
	st, big, _, err := rc.Lookup(root, "big")
	if err != nil || st != nfsraw.NFS3OK {
		t.Fatalf("LOOKUP big: %d %v", st, err)
	}
	// 64 READs of 1 MiB, far more than the socket buffers hold; no reply
	// is ever read.
	var calls []byte
	for i := range 64 {
		calls = nfsraw.CallRecord(calls, uint32(100+i), ProgNFS, 6, rc.Cred(), (&nfsraw.Enc{}).Opaque(big).U64(0).U32(1<<20).B)
	}
	go rc.Write(calls)
	waitFor(t, "the stalled connection to be closed", func() bool { return s.l.Active() == 0 })
	if got := s.metric(t, "strata_nfs_guard_connections_rejected_total", "idle"); got != 1 {
		t.Errorf("rejected{idle} = %v, want 1", got)
	}
}

func TestParseAllow(t *testing.T) {
	got, err := ParseAllow([]string{"10.0.0.0/8", "192.168.1.7", "::ffff:127.0.0.1", "fd00::/8"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"10.0.0.0/8", "192.168.1.7/32", "127.0.0.1/32", "fd00::/8"}
	for i, p := range got {
		if p.String() != want[i] {
			t.Errorf("entry %d = %s, want %s", i, p, want[i])
		}
	}
	if _, err := ParseAllow([]string{"10.0.0.0/8", "10.0.0/33"}); err == nil || !contains(err.Error(), `"10.0.0/33"`) {
		t.Errorf("bad entry error %v does not name the entry", err)
	}
	// IPv4-mapped prefixes become their IPv4 form: client addresses are
	// compared unmapped.
	got, err = ParseAllow([]string{"::ffff:127.0.0.0/104", " ::ffff:10.1.2.3/128 "})
	if err != nil || len(got) != 2 || got[0].String() != "127.0.0.0/8" || got[1].String() != "10.1.2.3/32" {
		t.Errorf("mapped prefixes = %v, %v; want [127.0.0.0/8 10.1.2.3/32]", got, err)
	}
	if _, err := ParseAllow([]string{"::ffff:0.0.0.0/90"}); err == nil || !contains(err.Error(), "96 bits") {
		t.Errorf("mapped prefix shorter than /96: %v", err)
	}
	// Empty lists fail closed, and say how to allow everyone.
	for _, in := range [][]string{nil, {}, {""}, {" ", ""}} {
		_, err := ParseAllow(in)
		if !errors.Is(err, ErrEmptyAllow) || !contains(err.Error(), "nfs.allow") || !contains(err.Error(), "0.0.0.0/0") || !contains(err.Error(), "::/0") {
			t.Errorf("ParseAllow(%q) = %v, want the empty-allowlist error", in, err)
		}
	}
}

// A mapped entry admits the IPv4 loopback client it covers; an empty
// allowlist is refused by Listen.
func TestMappedAllowAdmitsIPv4Client(t *testing.T) {
	allow, err := ParseAllow([]string{"::ffff:127.0.0.0/104"})
	if err != nil {
		t.Fatal(err)
	}
	s := serve(t, Options{Allow: allow})
	if err := readHello(t, s.l.Addr().String()); err != nil {
		t.Fatalf("IPv4 loopback client under ::ffff:127.0.0.0/104: %v", err)
	}
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer inner.Close()
	if _, err := Listen(inner, Options{}, nil, nil); !errors.Is(err, ErrEmptyAllow) {
		t.Errorf("Listen with no allowlist: %v, want ErrEmptyAllow", err)
	}
}

// One client cannot take more than MaxConnsPerClient slots; its own
// closed connections give them back.
func TestPerClientCap(t *testing.T) {
	s := serve(t, Options{MaxConnsPerClient: 2})
	freeSlot(t, s, fillCap(t, s, "third connection of one client"))
}

func TestOptionsRejectNonsense(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer inner.Close()
	if _, err := Listen(inner, Options{MaxRecord: 10}, nil, nil); err == nil {
		t.Error("max record below a call header accepted")
	}
	if _, err := Listen(inner, Options{MaxConns: -1}, nil, nil); err == nil {
		t.Error("negative cap accepted")
	}
}

func contains(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return true
		}
	}
	return false
}
