//go:build integration

package guard_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/internal/nfsraw"
	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/server/nfs"
	"github.com/strata-nix/strata/server/nfs/busypoll"
	"github.com/strata-nix/strata/server/nfs/guard"
)

// childEnv makes TestMain run a guarded export instead of the tests:
// "STATEDIR|STOREDIR". The child prints "LISTEN addr", serves generation 1
// from STOREDIR until its stdin closes, then prints its guard metrics as
// "METRIC name label value" lines and exits 0. A crash is a non-zero exit.
const childEnv = "STRATA_GUARDTEST_SERVE"

func TestMain(m *testing.M) {
	if spec := os.Getenv(childEnv); spec != "" {
		if err := serveChild(spec); err != nil {
			fmt.Fprintln(os.Stderr, "child server:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func serveChild(spec string) error {
	stateDir, storeDir, _ := strings.Cut(spec, "|")
	reg := prometheus.NewRegistry()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
	e, err := nfs.New(nfs.Options{StateDir: stateDir, Registry: reg, Logger: log})
	if err != nil {
		return err
	}
	if err := e.Add(1, storeDir); err != nil {
		return err
	}
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	// busy polling in front of the guard, as strata server runs it
	l, err := guard.Listen(busypoll.Listen(inner, 0), guard.Options{
		Allow:         []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
		MaxConns:      512,
		RecordTimeout: time.Second,
		IdleTimeout:   5 * time.Second,
	}, log, reg)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() { io.Copy(io.Discard, os.Stdin); cancel() }()
	fmt.Printf("LISTEN %s\n", l.Addr())
	if err := e.Serve(ctx, l); err != nil {
		return err
	}
	mfs, err := reg.Gather()
	if err != nil {
		return err
	}
	for _, mf := range mfs {
		if !strings.HasPrefix(mf.GetName(), "strata_nfs_guard_") {
			continue
		}
		for _, m := range mf.GetMetric() {
			label := "-"
			if len(m.GetLabel()) > 0 {
				label = m.GetLabel()[0].GetValue()
			}
			v := m.GetCounter().GetValue() + m.GetGauge().GetValue()
			fmt.Printf("METRIC %s %s %v\n", mf.GetName(), label, v)
		}
	}
	return nil
}

// child is the guarded export running in a re-executed test binary.
type child struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Scanner
	addr  string
}

func startChild(t *testing.T, storeDir string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+t.TempDir()+"|"+storeDir)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	c := &child{cmd: cmd, stdin: stdin, out: bufio.NewScanner(stdout)}
	if !c.out.Scan() || !strings.HasPrefix(c.out.Text(), "LISTEN ") {
		t.Fatalf("child server did not start: %q", c.out.Text())
	}
	c.addr = strings.TrimPrefix(c.out.Text(), "LISTEN ")
	return c
}

// vmHWM returns the peak resident set of pid in bytes.
func vmHWM(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("server process gone: %v", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmHWM:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	t.Fatal("no VmHWM")
	return 0
}

// stop closes the child's stdin, waits for a clean exit and returns its
// metrics by "name/label".
func (c *child) stop(t *testing.T) map[string]float64 {
	t.Helper()
	c.stdin.Close()
	m := map[string]float64{}
	for c.out.Scan() {
		if f := strings.Fields(c.out.Text()); len(f) == 4 && f[0] == "METRIC" {
			v, _ := strconv.ParseFloat(f[3], 64)
			m[f[1]+"/"+f[2]] = v
		}
	}
	if err := c.cmd.Wait(); err != nil {
		t.Fatalf("server exited with %v (crash?)", err)
	}
	return m
}

// legit mounts /gen/1 and reads path with 1 MiB READs in a loop until stop,
// checking its sha256 each time, over one TCP connection. It returns the
// reads done and the first failure. It speaks ONC RPC itself rather than
// through go-nfs-client, whose rpc.Client panics ("close of closed
// channel" in disconnect) when its connection breaks twice while a call
// waits: the test must report a failed read, not die of the client.
func legit(addr, path string, want [32]byte, stop <-chan struct{}) (int, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	r := bufio.NewReader(c)
	xid := uint32(0)
	// call returns the results of an accepted, successful reply.
	call := func(prog, proc uint32, args []byte) ([]byte, error) {
		xid++
		c.SetDeadline(time.Now().Add(30 * time.Second))
		if _, err := c.Write(framed(append(callHeader(xid, prog, 3, proc), args...))); err != nil {
			return nil, err
		}
		var hdr [4]byte
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return nil, err
		}
		body := make([]byte, binary.BigEndian.Uint32(hdr[:])&0x7fffffff)
		if _, err := io.ReadFull(r, body); err != nil {
			return nil, err
		}
		// xid, REPLY, MSG_ACCEPTED, AUTH_NULL verifier, SUCCESS
		if len(body) < 24 || !bytes.Equal(body[:24], u32s(xid, 1, 0, 0, 0, 0)) {
			return nil, fmt.Errorf("call %d: unexpected reply header % x", xid, body[:min(len(body), 24)])
		}
		return body[24:], nil
	}
	// statusOpaque reads an NFS or MOUNT status that must be OK, then an
	// opaque (a file handle).
	statusOpaque := func(b []byte, what string) ([]byte, error) {
		if len(b) < 4 || binary.BigEndian.Uint32(b) != 0 {
			return nil, fmt.Errorf("%s: status % x", what, b[:min(len(b), 4)])
		}
		v, ok := xdrOpaqueAt(b[4:])
		if !ok {
			return nil, fmt.Errorf("%s: short reply", what)
		}
		return v, nil
	}
	res, err := call(100005, 1, xdrOpaque([]byte("/gen/1")))
	if err != nil {
		return 0, fmt.Errorf("mount: %w", err)
	}
	root, err := statusOpaque(res, "mount /gen/1")
	if err != nil {
		return 0, err
	}
	if res, err = call(100003, 3, append(xdrOpaque(root), xdrOpaque([]byte(path))...)); err != nil {
		return 0, fmt.Errorf("lookup %s: %w", path, err)
	}
	fh, err := statusOpaque(res, "lookup "+path)
	if err != nil {
		return 0, err
	}
	for n := 0; ; n++ {
		select {
		case <-stop:
			return n, nil
		default:
		}
		h := sha256.New()
		for off, eof := uint64(0), false; !eof; {
			res, err := call(100003, 6, append(xdrOpaque(fh), u32s(uint32(off>>32), uint32(off), 1<<20)...))
			if err != nil {
				return n, fmt.Errorf("read %s (read %d): %w", path, n, err)
			}
			// status, post_op_attr (present: 84 bytes of fattr3), count, eof, data
			if len(res) < 8 || binary.BigEndian.Uint32(res) != 0 {
				return n, fmt.Errorf("read %s (read %d): status % x", path, n, res[:min(len(res), 4)])
			}
			skip := 8
			if binary.BigEndian.Uint32(res[4:]) == 1 {
				skip += 84
			}
			if len(res) < skip+8 {
				return n, fmt.Errorf("read %s (read %d): short reply", path, n)
			}
			eof = binary.BigEndian.Uint32(res[skip+4:]) != 0
			data, ok := xdrOpaqueAt(res[skip+8:])
			if !ok {
				return n, fmt.Errorf("read %s (read %d): short data", path, n)
			}
			if len(data) == 0 && !eof {
				return n, fmt.Errorf("read %s (read %d): empty READ before eof at %d", path, n, off)
			}
			h.Write(data)
			off += uint64(len(data))
		}
		if got := [32]byte(h.Sum(nil)); got != want {
			return n, fmt.Errorf("read %s (read %d): wrong content", path, n)
		}
	}
}

// xdrOpaqueAt decodes the variable-length opaque at the start of b.
func xdrOpaqueAt(b []byte) ([]byte, bool) {
	if len(b) < 4 {
		return nil, false
	}
	n := int(binary.BigEndian.Uint32(b))
	if len(b)-4 < n {
		return nil, false
	}
	return b[4 : 4+n], true
}

func xdrOpaque(b []byte) []byte {
	out := append(u32s(uint32(len(b))), b...)
	for len(out)%4 != 0 {
		out = append(out, 0)
	}
	return out
}

// TestAttackWhileServing sends a few thousand connections of random and
// malformed records to the real export's guarded port for a bounded time,
// while a legitimate client keeps reading a file: the server must not crash,
// the client must never fail, and the server's peak RSS must stay under
// 256 MiB.
func TestAttackWhileServing(t *testing.T) {
	testenv.RequireRoot(t) // open_by_handle_at needs CAP_DAC_READ_SEARCH
	dur := 20 * time.Second
	if testing.Short() {
		dur = 5 * time.Second
	}
	store := t.TempDir()
	data := make([]byte, 1<<20)
	rand.NewChaCha8([32]byte{1}).Read(data)
	if err := os.WriteFile(filepath.Join(store, "blob"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	want := sha256.Sum256(data)
	srv := startChild(t, store)

	stop := make(chan struct{})
	var legitReads int
	var legitErr error
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); legitReads, legitErr = legit(srv.addr, "blob", want, stop) }()

	var conns, held atomic.Int64
	kinds := make([]atomic.Int64, len(attacks))
	deadline := time.Now().Add(dur)
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 42))
			for time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond) // bounded: a few thousand connections, not a CPU hog
				k := rng.IntN(len(attacks))
				c, err := net.DialTimeout("tcp", srv.addr, time.Second)
				if err != nil {
					time.Sleep(10 * time.Millisecond)
					continue
				}
				conns.Add(1)
				kinds[k].Add(1)
				a := attacks[k]
				c.SetDeadline(time.Now().Add(3 * time.Second))
				c.Write(a.payload(rng))
				if a.hold && held.Load() < 200 {
					held.Add(1)
					go func() { // slowloris: keep it open, say nothing more
						io.Copy(io.Discard, c)
						c.Close()
						held.Add(-1)
					}()
					continue
				}
				c.(*net.TCPConn).CloseWrite()
				c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
				io.Copy(io.Discard, c)
				c.Close()
			}
		}()
	}
	time.Sleep(dur)
	close(stop)
	wg.Wait()
	hwm := vmHWM(t, srv.cmd.Process.Pid)
	m := srv.stop(t)

	t.Logf("%d attack connections in %v; legitimate reads of 1 MiB: %d; server VmHWM %d MiB", conns.Load(), dur, legitReads, hwm>>20)
	for i, a := range attacks {
		t.Logf("  %-28s %d", a.name, kinds[i].Load())
	}
	for k, v := range m {
		t.Logf("  %s = %v", k, v)
	}
	if legitErr != nil {
		t.Errorf("legitimate client failed: %v", legitErr)
	}
	if legitReads == 0 {
		t.Error("legitimate client read nothing")
	}
	if conns.Load() < 500 {
		t.Errorf("only %d attack connections were made", conns.Load())
	}
	if hwm >= 256<<20 {
		t.Errorf("server peak RSS %d MiB, want < 256 MiB", hwm>>20)
	}
	if m["strata_nfs_guard_connections_rejected_total/record"] == 0 || m["strata_nfs_guard_connections_rejected_total/idle"] == 0 {
		t.Errorf("guard did not count record and idle rejections: %v", m)
	}
}

type attack struct {
	name    string
	hold    bool
	payload func(*rand.Rand) []byte
}

func u32s(vs ...uint32) []byte {
	var b []byte
	for _, v := range vs {
		b = binary.BigEndian.AppendUint32(b, v)
	}
	return b
}

func framed(rec []byte) []byte { return append(u32s(1<<31|uint32(len(rec))), rec...) }

func callHeader(xid, prog, vers, proc uint32) []byte {
	return u32s(xid, 0, 2, prog, vers, proc, 0, 0, 0, 0)
}

func randBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

var attacks = []attack{
	{"huge record length", false, func(r *rand.Rand) []byte { return u32s(1<<31 | (0x10000000 + r.Uint32()%0x6fffffff)) }},
	{"truncated header", false, func(r *rand.Rand) []byte { return framed(callHeader(1, 100003, 3, 1))[:4+r.IntN(40)] }},
	{"fragment without last bit", false, func(r *rand.Rand) []byte { return append(u32s(44), callHeader(1, 100003, 3, 0)...) }},
	{"msg_type reply", false, func(r *rand.Rand) []byte { return framed(u32s(1, 1, 0, 0, 0, 0, 0, 0, 0, 0)) }},
	{"wrong rpcvers", false, func(r *rand.Rand) []byte { return framed(u32s(1, 0, 3, 100003, 3, 0, 0, 0, 0, 0)) }},
	{"nfs v4 / mount v1", false, func(r *rand.Rand) []byte {
		if r.IntN(2) == 0 {
			return framed(append(callHeader(1, 100003, 4, 1), u32s(0, 0, 0)...))
		}
		return framed(append(callHeader(1, 100005, 1, 1), u32s(1, 0x2f000000)...))
	}},
	{"cred length 0x7ffffff0", false, func(r *rand.Rand) []byte { return framed(u32s(1, 0, 2, 100003, 3, 0, 1, 0x7ffffff0, 0, 0, 0, 0)) }},
	{"cred 401 bytes", false, func(r *rand.Rand) []byte {
		return framed(append(append(u32s(1, 0, 2, 100003, 3, 0, 1, 401), make([]byte, 404)...), u32s(0, 0)...))
	}},
	{"huge xdr length in args", false, func(r *rand.Rand) []byte {
		procs := []uint32{1, 3, 4, 6, 10, 16, 17}
		return framed(append(callHeader(1, 100003, 3, procs[r.IntN(len(procs))]), u32s(0x7ffffff0-r.Uint32()%1000)...))
	}},
	{"huge mount dirpath", false, func(r *rand.Rand) []byte { return framed(append(callHeader(1, 100005, 3, 1), u32s(0x7ffffff0)...)) }},
	{"garbage after valid header", false, func(r *rand.Rand) []byte {
		return framed(append(callHeader(1, 100003, 3, r.Uint32()%22), randBytes(r, r.IntN(200))...))
	}},
	{"random bytes", false, func(r *rand.Rand) []byte { return randBytes(r, 1+r.IntN(512)) }},
	{"framed random record", false, func(r *rand.Rand) []byte { return framed(randBytes(r, 40+r.IntN(400))) }},
	{"unknown program (nfsacl)", false, func(r *rand.Rand) []byte { return framed(append(callHeader(1, 100227, 3, 1), randBytes(r, 16)...)) }},
	{"valid null calls", false, func(r *rand.Rand) []byte {
		return append(framed(callHeader(1, 100003, 3, 0)), framed(callHeader(2, 100005, 3, 0))...)
	}},
	{"slowloris partial record", true, func(r *rand.Rand) []byte { return framed(callHeader(1, 100003, 3, 0))[:2+r.IntN(30)] }},
	{"slowloris idle", true, func(r *rand.Rand) []byte { return nil }},
}

// netns is a named network namespace made for one test.
type netns struct{ name string }

func newNetns(t *testing.T, name string) *netns {
	t.Helper()
	exec.Command("ip", "netns", "del", name).Run() // leftover from a killed run
	testenv.Run(t, "ip", "netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	testenv.Run(t, "ip", "-n", name, "link", "set", "lo", "up")
	return &netns{name: name}
}

// do runs f on an OS thread switched into the namespace, so sockets f
// creates live there (a socket keeps its namespace for life).
func (n *netns) do(t *testing.T, f func()) {
	t.Helper()
	fd, err := unix.Open("/run/netns/"+n.name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(orig)
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			t.Errorf("setns %s: %v", n.name, err)
			return
		}
		f()
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			return // leave the thread locked: it dies with this goroutine
		}
		runtime.UnlockOSThread()
	}()
	<-done
}

// TestAllowlistAcrossNamespaces serves the real export in namespace S with
// nfs.allow = 127.0.0.0/8. A client in namespace C (veth 10.213.0.2 ->
// 10.213.0.1) is refused and counted while a loopback client in S works;
// after allowing 10.213.0.0/30 the C client works too.
func TestAllowlistAcrossNamespaces(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommands(t, "ip")
	pid := os.Getpid() % 100000
	srvNS := newNetns(t, fmt.Sprintf("sg-srv-%d", pid))
	cliNS := newNetns(t, fmt.Sprintf("sg-cli-%d", pid))
	veth := fmt.Sprintf("sgv%d", pid)
	testenv.Run(t, "ip", "-n", srvNS.name, "link", "add", veth+"a", "type", "veth", "peer", "name", veth+"b", "netns", cliNS.name)
	testenv.Run(t, "ip", "-n", srvNS.name, "addr", "add", "10.213.0.1/30", "dev", veth+"a")
	testenv.Run(t, "ip", "-n", cliNS.name, "addr", "add", "10.213.0.2/30", "dev", veth+"b")
	testenv.Run(t, "ip", "-n", srvNS.name, "link", "set", veth+"a", "up")
	testenv.Run(t, "ip", "-n", cliNS.name, "link", "set", veth+"b", "up")

	store := t.TempDir()
	if err := os.WriteFile(filepath.Join(store, "hello.txt"), []byte("hello\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	e, err := nfs.New(nfs.Options{StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if err := e.Add(1, store); err != nil {
		t.Fatal(err)
	}
	var inner net.Listener
	srvNS.do(t, func() { inner, err = net.Listen("tcp", "0.0.0.0:0") })
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	l, err := guard.Listen(inner, guard.Options{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}, nil, reg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go e.Serve(ctx, l)
	port := inner.Addr().(*net.TCPAddr).Port

	// read mounts /gen/1 and reads hello.txt with the raw client
	// (go-nfs-client panics with "close of closed channel" when a server
	// closes its connection twice while a call waits).
	read := func(ns *netns, host string) error {
		var c *nfsraw.Client
		var err error
		ns.do(t, func() { c, err = nfsraw.Dial(net.JoinHostPort(host, strconv.Itoa(port))) })
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetTimeout(3 * time.Second)
		st, root, err := c.Mount("/gen/1")
		if err == nil && st != 0 {
			err = fmt.Errorf("mount status %d", st)
		}
		if err != nil {
			return err
		}
		st, fh, _, err := c.Lookup(root, "hello.txt")
		if err == nil && st != nfsraw.NFS3OK {
			err = fmt.Errorf("lookup status %d", st)
		}
		if err != nil {
			return err
		}
		st, b, err := c.ReadAll(fh)
		if err == nil && (st != nfsraw.NFS3OK || !bytes.Equal(b, []byte("hello\n"))) {
			err = fmt.Errorf("read status %d, %q", st, b)
		}
		return err
	}
	rawRefused := func(ns *netns, host string) bool {
		var c net.Conn
		var err error
		ns.do(t, func() { c, err = net.Dial("tcp", net.JoinHostPort(host, strconv.Itoa(port))) })
		if err != nil {
			return true
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(time.Second))
		_, err = c.Read(make([]byte, 1))
		ne, ok := err.(net.Error)
		return !(ok && ne.Timeout()) // EOF or reset: closed by the server
	}
	answered := func(ns *netns, host string) bool {
		var c net.Conn
		var err error
		ns.do(t, func() { c, err = net.Dial("tcp", net.JoinHostPort(host, strconv.Itoa(port))) })
		if err != nil {
			return false
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write(framed(callHeader(7, 100003, 3, 0))); err != nil {
			return false
		}
		hdr := make([]byte, 12)
		if _, err := io.ReadFull(c, hdr); err != nil {
			return false
		}
		return binary.BigEndian.Uint32(hdr[4:]) == 7 && binary.BigEndian.Uint32(hdr[8:]) == 1 // xid, REPLY
	}
	rejected := func() float64 {
		mfs, _ := reg.Gather()
		for _, mf := range mfs {
			if mf.GetName() == "strata_nfs_guard_connections_rejected_total" {
				for _, m := range mf.GetMetric() {
					if m.GetLabel()[0].GetValue() == "allowlist" {
						return m.GetCounter().GetValue()
					}
				}
			}
		}
		return 0
	}

	if err := read(srvNS, "127.0.0.1"); err != nil {
		t.Fatalf("loopback client refused: %v", err)
	}
	if !rawRefused(cliNS, "10.213.0.1") {
		t.Fatal("client at 10.213.0.2 outside nfs.allow was not closed")
	}
	// A well-formed NFS NULL call from outside the allowlist gets no answer.
	// (Not through go-nfs-client: its reconnect loop on a connection the
	// server keeps closing races into a double close of a reply channel.)
	if answered(cliNS, "10.213.0.1") {
		t.Fatal("client at 10.213.0.2 outside nfs.allow got an answer")
	}
	if !answered(srvNS, "127.0.0.1") {
		t.Fatal("loopback NULL call got no answer")
	}
	if n := rejected(); n < 2 {
		t.Errorf("rejected{allowlist} = %v, want >= 2", n)
	}
	if err := read(srvNS, "127.0.0.1"); err != nil {
		t.Fatalf("loopback client failed after refusals: %v", err)
	}

	l.SetAllow([]netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("10.213.0.0/30")})
	before := rejected()
	if err := read(cliNS, "10.213.0.1"); err != nil {
		t.Fatalf("client at 10.213.0.2 refused after allowing 10.213.0.0/30: %v", err)
	}
	if n := rejected(); n != before {
		t.Errorf("rejected{allowlist} grew from %v to %v for an allowed client", before, n)
	}

}
