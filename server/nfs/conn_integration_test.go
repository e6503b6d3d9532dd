//go:build integration

package nfs

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/nfsraw"
	"github.com/strata-nix/strata/internal/testenv"
)

// connFixture is the fixture plus a 40 MiB file (READs of 16 MiB go out
// in 1 MiB chunks and outgrow every socket buffer) and a directory of 8,000
// long names (one READDIRPLUS reply is about 3 MB).
type connFixture struct {
	*fixture
	big    []byte
	bigSum [32]byte
}

const bigDirEntries = 8000

func newConnFixture(t *testing.T) *connFixture {
	big := make([]byte, 40<<20)
	rand.Read(big)
	fx := newFixture(t, func(store string) {
		writeFile(t, filepath.Join(store, "conn/big"), big, 0o644)
		long := strings.Repeat("n", 190)
		for i := range bigDirEntries {
			p := filepath.Join(store, "conn/dir", fmt.Sprintf("%s-%05d", long, i))
			if i == 0 {
				writeFile(t, p, []byte("x"), 0o644)
				continue
			}
			if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	})
	return &connFixture{fixture: fx, big: big, bigSum: sha256.Sum256(big)}
}

// served is the export in a child process, as strata server runs it
// (nfs.Listen: busy polling, guard, fast path).
type served struct {
	cmd     *exec.Cmd
	addr    string
	metrics string
	stderr  *testenv.Buffer
}

func (fx *connFixture) start(t *testing.T, env ...string) *served {
	t.Helper()
	var gens []string
	for id, dir := range fx.gen {
		gens = append(gens, fmt.Sprintf("%d=%s", id, dir))
	}
	s := &served{stderr: &testenv.Buffer{Tee: os.Stderr}}
	s.cmd = exec.Command(os.Args[0], "-test.run=^$")
	s.cmd.Env = append(append(os.Environ(), env...), childEnv+"=127.0.0.1:0|"+fx.stateDir+"|"+strings.Join(gens, ","))
	s.cmd.Stderr = s.stderr
	out, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.cmd.Process.Kill(); s.cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	f := strings.Fields(line)
	if err != nil || len(f) != 3 || f[0] != "LISTEN" {
		t.Fatalf("child server: %q %v", line, err)
	}
	s.addr, s.metrics = f[1], f[2]
	return s
}

// metric returns the sum of a metric's samples whose labels contain label
// (empty: all), from the child's /metrics.
func (s *served) metric(t *testing.T, name, label string) float64 {
	t.Helper()
	// No keep-alive: the scrape's own socket must not count as the server's.
	c := http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	res, err := c.Get("http://" + s.metrics + "/metrics")
	if err != nil {
		t.Fatalf("metrics: %v", err)
	}
	defer res.Body.Close()
	sum := 0.0
	sc := bufio.NewScanner(res.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name) || (len(line) > len(name) && line[len(name)] != ' ' && line[len(name)] != '{') {
			continue
		}
		if label != "" && !strings.Contains(line, label) {
			continue
		}
		f := strings.Fields(line)
		v, _ := strconv.ParseFloat(f[len(f)-1], 64)
		sum += v
	}
	return sum
}

// fds counts the child's open descriptors: all, and sockets.
func (s *served) fds(t *testing.T) (all, sockets int) {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", s.cmd.Process.Pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("server process gone? %v", err)
	}
	for _, e := range ents {
		if l, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil && strings.HasPrefix(l, "socket:") {
			sockets++
		}
	}
	return len(ents), sockets
}

// fdList describes the child's descriptors and its TCP sockets' states.
func (s *served) fdList() string {
	dir := fmt.Sprintf("/proc/%d/fd", s.cmd.Process.Pid)
	ents, _ := os.ReadDir(dir)
	var b strings.Builder
	for _, e := range ents {
		l, _ := os.Readlink(filepath.Join(dir, e.Name()))
		fmt.Fprintf(&b, "%s -> %s\n", e.Name(), l)
	}
	out, _ := exec.Command("ss", "-tanp", "state", "established").CombinedOutput()
	fmt.Fprintf(&b, "%s", out)
	return b.String()
}

func (s *served) alive(t *testing.T) {
	t.Helper()
	if err := s.cmd.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatalf("server process died: %v\n%s", err, s.stderr.String())
	}
}

// handles are the file handles the clients use.
type handles struct{ root, big, dir []byte }

func (fx *connFixture) handles(t *testing.T, addr string) handles {
	t.Helper()
	rc := raw(t, addr)
	defer rc.Close()
	root := mountRaw(t, rc, "/gen/1")
	return handles{root: root, big: lookupPath(t, rc, root, "conn/big"), dir: lookupPath(t, rc, root, "conn/dir")}
}

// legitRead mounts /gen/1 on a fresh connection and reads conn/big whole,
// checking its sha256.
func (fx *connFixture) legitRead(addr string) error {
	rc, err := nfsraw.Dial(addr)
	if err != nil {
		return err
	}
	defer rc.Close()
	rc.SetTimeout(20 * time.Second)
	st, root, err := rc.Mount("/gen/1")
	if err != nil || st != 0 {
		return fmt.Errorf("mount: %d %v", st, err)
	}
	fh := root
	for _, name := range []string{"conn", "big"} {
		var st uint32
		if st, fh, _, err = rc.Lookup(fh, name); err != nil || st != nfsraw.NFS3OK {
			return fmt.Errorf("lookup %s: %d %v", name, st, err)
		}
	}
	st, data, err := rc.ReadAll(fh)
	if err != nil || st != nfsraw.NFS3OK {
		return fmt.Errorf("read: %d %v", st, err)
	}
	if sha256.Sum256(data) != fx.bigSum {
		return fmt.Errorf("read %d bytes that differ from the file", len(data))
	}
	return nil
}

// getattr is one GETATTR on a fresh connection.
func (fx *connFixture) getattr(addr string, fh []byte) error {
	rc, err := nfsraw.Dial(addr)
	if err != nil {
		return err
	}
	defer rc.Close()
	rc.SetTimeout(5 * time.Second)
	st, _, err := rc.Getattr(fh)
	if err == nil && st != nfsraw.NFS3OK {
		err = fmt.Errorf("status %d", st)
	}
	return err
}

// pipeline is a burst of calls sent without reading a reply: READs of
// 1 MiB and 16 MiB (chunked), READDIRPLUS pages of the big directory (fast
// path), and READDIR and FSINFO (go-nfs's own replies).
func pipeline(h handles, cred []byte) []byte {
	var b []byte
	xid := uint32(1)
	add := func(proc uint32, args *nfsraw.Enc) {
		b = nfsraw.CallRecord(b, xid, nfsraw.ProgNFS, proc, cred, args.B)
		xid++
	}
	for i := range 3 {
		add(nfsraw.ProcRead, (&nfsraw.Enc{}).Opaque(h.big).U64(uint64(i)<<20).U32(1<<20))
		add(nfsraw.ProcReaddirplus, (&nfsraw.Enc{}).Opaque(h.dir).U64(0).U64(0).U32(1<<24).U32(1<<24))
		add(nfsraw.ProcRead, (&nfsraw.Enc{}).Opaque(h.big).U64(uint64(i)<<24).U32(1<<24))
		add(nfsraw.ProcReaddir, (&nfsraw.Enc{}).Opaque(h.dir).U64(0).U64(0).U32(1<<20))
		add(19, (&nfsraw.Enc{}).Opaque(h.root)) // FSINFO
	}
	return b
}

// reset closes c with an RST (SO_LINGER 0) instead of a FIN.
func reset(c net.Conn) {
	c.(*net.TCPConn).SetLinger(0)
	c.Close()
}

// waitUntil polls cond for up to 30 s.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); !cond(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// settled waits until the server holds no connection and no more sockets or
// descriptors than at baseline (baseAll < 0: no baseline yet).
func (s *served) settled(t *testing.T, baseAll, baseSockets int) {
	t.Helper()
	waitUntil(t, "the connection gauges to reach 0", func() bool {
		return s.metric(t, "strata_nfs_connections", "") == 0 && s.metric(t, "strata_nfs_guard_connections", "") == 0
	})
	for deadline := time.Now().Add(30 * time.Second); baseAll >= 0; time.Sleep(50 * time.Millisecond) {
		all, sockets := s.fds(t)
		if sockets <= baseSockets && all <= baseAll {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("descriptors not back to their baseline (%d, %d sockets): %d, %d sockets:\n%s", baseAll, baseSockets, all, sockets, s.fdList())
		}
	}
}

// TestResetsReleaseConnections: 2,000 connections pipeline READ (some of
// 16 MiB, written in chunks), READDIRPLUS, READDIR and FSINFO calls and then reset before
// reading a reply, interleaved with clean closes; then clients that reset
// in the middle of a 16 MiB READ reply and of a READDIRPLUS reply. After
// each round the server holds no connection, its descriptors are back to
// their baseline, and a legitimate client mounts and reads.
func TestResetsReleaseConnections(t *testing.T) {
	fx := newConnFixture(t)
	s := fx.start(t)
	h := fx.handles(t, s.addr)
	cc := raw(t, s.addr)
	cred := cc.Cred()
	cc.Close()
	calls := pipeline(h, cred)
	// Warm the export's caches (file and directory descriptors) so the
	// baseline holds them.
	if err := fx.legitRead(s.addr); err != nil {
		t.Fatal(err)
	}
	wc := raw(t, s.addr)
	if ents, err := wc.ListAll(h.dir, 0, 0, 1<<20); err != nil || len(ents) != bigDirEntries+2 {
		t.Fatalf("READDIRPLUS of the big directory: %d entries, %v", len(ents), err)
	}
	if st, _, _, _, err := wc.Readdir(h.dir, 0, 0, 1<<20); err != nil || st != nfsraw.NFS3OK {
		t.Fatalf("READDIR: %d %v", st, err)
	}
	wc.Close()
	s.settled(t, -1, -1)
	baseAll, baseSockets := s.fds(t)
	t.Logf("baseline: %d descriptors, %d sockets", baseAll, baseSockets)

	const total = 2000
	var next, failed atomic.Int64
	var wg sync.WaitGroup
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := next.Add(1); i <= total; i = next.Add(1) {
				c, err := net.DialTimeout("tcp", s.addr, 10*time.Second)
				if err != nil {
					failed.Add(1)
					continue
				}
				c.Write(calls)
				if i%4 == 0 {
					c.Close() // clean close, replies unread
				} else {
					reset(c)
				}
			}
		}()
	}
	wg.Wait()
	if n := failed.Load(); n > 0 {
		t.Errorf("%d of %d connections could not be made", n, total)
	}
	s.settled(t, baseAll, baseSockets)
	if err := fx.legitRead(s.addr); err != nil {
		t.Fatalf("legitimate client after %d resets: %v", total, err)
	}

	// Resets in the middle of a reply: the client reads the start of a
	// 16 MiB READ reply, or of a 3 MB READDIRPLUS reply, then
	// resets while the server is still writing it.
	for _, tc := range []struct {
		name string
		call []byte
	}{
		{"16 MiB READ", nfsraw.CallRecord(nil, 7, nfsraw.ProgNFS, nfsraw.ProcRead, cred, (&nfsraw.Enc{}).Opaque(h.big).U64(1<<20).U32(1<<24).B)},
		{"READDIRPLUS", nfsraw.CallRecord(nil, 7, nfsraw.ProgNFS, nfsraw.ProcReaddirplus, cred, (&nfsraw.Enc{}).Opaque(h.dir).U64(0).U64(0).U32(1<<24).U32(1<<24).B)},
	} {
		before := s.metric(t, "strata_nfs_requests_total", "")
		for range 50 {
			c, err := net.DialTimeout("tcp", s.addr, 10*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			c.(*net.TCPConn).SetReadBuffer(4096)
			c.Write(tc.call)
			c.SetReadDeadline(time.Now().Add(20 * time.Second))
			if _, err := io.ReadFull(c, make([]byte, 8192)); err != nil {
				t.Fatalf("%s: no start of a reply: %v", tc.name, err)
			}
			reset(c)
		}
		s.settled(t, baseAll, baseSockets)
		if got := s.metric(t, "strata_nfs_requests_total", "") - before; got < 50 {
			t.Errorf("%s: server counted %v requests, want 50", tc.name, got)
		}
		if err := fx.legitRead(s.addr); err != nil {
			t.Fatalf("legitimate client after resets mid-%s: %v", tc.name, err)
		}
	}
	s.alive(t)
}

// TestResetsNeverLockOutUnderACap: with nfs.max_conns 8, one legitimate
// client holds a connection while 100 clients in a row pipeline calls and
// reset; the held connection keeps working and a new client mounts and
// reads.
func TestResetsNeverLockOutUnderACap(t *testing.T) {
	fx := newConnFixture(t)
	s := fx.start(t, "STRATA_NFSTEST_MAX_CONNS=8")
	h := fx.handles(t, s.addr)
	held := raw(t, s.addr)
	calls := pipeline(h, held.Cred())
	for i := range 100 {
		c, err := net.DialTimeout("tcp", s.addr, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.Write(calls)
		reset(c)
		if i%10 == 9 {
			if st, _, err := held.Getattr(h.big); err != nil || st != nfsraw.NFS3OK {
				t.Fatalf("held connection after %d resets: %d %v", i+1, st, err)
			}
			// A new client gets in between resets (retrying as the
			// kernel's client does, while slots of reset connections
			// are being released).
			start := time.Now()
			for err := fx.getattr(s.addr, h.big); err != nil; err = fx.getattr(s.addr, h.big) {
				if time.Since(start) > 10*time.Second {
					t.Fatalf("new client locked out after %d resets: %v", i+1, err)
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
	}
	waitUntil(t, "only the held connection to remain", func() bool {
		return s.metric(t, "strata_nfs_connections", "") == 1
	})
	if err := fx.legitRead(s.addr); err != nil {
		t.Fatalf("new client after 100 resets under a cap of 8: %v", err)
	}
	t.Logf("connections refused at the cap during the resets: %v", s.metric(t, "strata_nfs_guard_connections_rejected_total", `reason="cap"`))
	s.alive(t)
}

// TestAcceptSurvivesEMFILE: the server runs out of descriptors (RLIMIT_NOFILE
// lowered in the child) while clients keep connecting. Accept fails with
// EMFILE; the server retries it with a backoff, keeps serving the client it
// has, and accepts again once descriptors are free. It never exits.
func TestAcceptSurvivesEMFILE(t *testing.T) {
	fx := newConnFixture(t)
	s := fx.start(t, "STRATA_NFSTEST_NOFILE=48")
	h := fx.handles(t, s.addr)
	a := raw(t, s.addr)
	a.SetTimeout(20 * time.Second)
	read := func() error {
		st, data, _, err := a.ReadView(h.big, 0, 1<<20)
		if err != nil || st != nfsraw.NFS3OK || !bytes.Equal(data, fx.big[:1<<20]) {
			return fmt.Errorf("read: %d %v", st, err)
		}
		return nil
	}
	if err := read(); err != nil {
		t.Fatal(err)
	}
	var extra []net.Conn
	for range 80 {
		c, err := net.DialTimeout("tcp", s.addr, 10*time.Second)
		if err != nil {
			t.Fatalf("connect: %v", err) // the kernel's backlog completes the handshake
		}
		extra = append(extra, c)
	}
	waitUntil(t, "accept to fail with EMFILE", func() bool {
		return strings.Contains(s.stderr.String(), "too many open files")
	})
	if err := read(); err != nil {
		t.Fatalf("existing client while out of descriptors: %v", err)
	}
	for _, c := range extra {
		c.Close()
	}
	waitUntil(t, "a new client to be served", func() bool { return fx.legitRead(s.addr) == nil })
	if n := s.metric(t, "strata_nfs_guard_accept_errors_total", `errno="emfile"`); n < 1 {
		t.Errorf("accept_errors_total{errno=emfile} = %v, want > 0", n)
	}
	if err := read(); err != nil {
		t.Fatalf("existing client after descriptors freed: %v", err)
	}
	s.alive(t)
}
