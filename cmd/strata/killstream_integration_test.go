//go:build integration

package main

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/testenv"
)

// throttle is a TCP proxy to a primary's API that passes the primary's
// answers at about 20 MB/s and counts their bytes, so that a test can kill
// a daemon in the middle of a snapshot stream.
type throttle struct {
	l    net.Listener
	sent atomic.Int64
	// cutAt, when set, resets the connection that passes it (once).
	cutAt atomic.Int64
}

func newThrottle(t *testing.T, upstream string) *throttle {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &throttle{l: l}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go p.relay(c, upstream)
		}
	}()
	return p
}

func (p *throttle) relay(c net.Conn, upstream string) {
	defer c.Close()
	u, err := net.Dial("tcp", upstream)
	if err != nil {
		return // the primary is down: the client sees its connection closed
	}
	defer u.Close()
	go func() { io.Copy(u, c); u.(*net.TCPConn).CloseWrite() }()
	buf := make([]byte, 64<<10)
	for {
		n, err := u.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
			if at := p.cutAt.Load(); at > 0 && p.sent.Add(int64(n)) >= at && p.cutAt.CompareAndSwap(at, 0) {
				c.(*net.TCPConn).SetLinger(0) // RST
				return
			} else if at == 0 {
				p.sent.Add(int64(n))
			}
			time.Sleep(time.Duration(n) * time.Second / (20 << 20))
		}
		if err != nil {
			return
		}
	}
}

// waitSent waits until at least n bytes passed since sent was reset.
func (p *throttle) waitSent(t *testing.T, n int64) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for p.sent.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("only %d bytes of the stream passed in a minute", p.sent.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// addBig adds a store path holding one file of mb MiB, no two 1 MiB blocks
// alike.
func addBig(t *testing.T, s *site, name string, mb int) {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	block := bytes.Repeat([]byte(name+" block for a long stream\n"), (1<<20)/(len(name)+25)+1)[:1<<20]
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	for i := range mb {
		copy(block, fmt.Sprintf("%08d", i))
		if _, err := f.Write(block); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	s.store.Run(t, "nix-store", "--add", p)
}

// receiving lists the processes still running `btrfs receive` into dir.
func receiving(dir string) []string {
	var out []string
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, _ := os.ReadFile(p)
		if cmd := strings.ReplaceAll(string(b), "\x00", " "); strings.HasPrefix(cmd, "btrfs receive") && strings.Contains(cmd, dir) {
			out = append(out, filepath.Base(filepath.Dir(p))+": "+cmd)
		}
	}
	return out
}

// A reset and kill -9 on either side of a replica stream, the real `strata
// server` as primary and replica (btrfs on loop devices), the stream
// passing a proxy that slows it to 20 MB/s. The connection reset 8 MB into
// a 60 MB incremental stream: the next sync asks for the same incremental
// stream, never a whole one. The primary killed 8 MB into the next: the replica logs the failed sync, leaves no half-received
// subvolume and no manifest, keeps serving what it had (held NFS handles
// read the same bytes), and receives the generation on its own once the
// primary is back. The replica killed 8 MB into the next one: its `btrfs
// receive` ends (none left running), the restarted replica deletes the
// half-received subvolume, serves what it had and receives the generation
// whole and equal to the primary's.
func TestReplicaStreamKilled(t *testing.T) {
	s := newSite(t)
	prim := startPrimary(t, s)
	g1 := prim.generations(t).Generations[0].ID
	proxy := newThrottle(t, prim.addr)

	rmnt := testenv.LoopBtrfs(t, "1G")
	rsnaps := filepath.Join(rmnt, "gens")
	rstate := filepath.Join(t.TempDir(), "rstate")
	rcfg := prim.replicaConfig(t, replica{of: proxy.l.Addr().String(), snaps: rsnaps, state: rstate})
	repl := start(t, rcfg, rstate, nil)
	snapshots := func() []string {
		names, _ := snapshotNames(rsnaps) // none yet: empty
		return names
	}
	repl.waitServes(t, g1)
	handles := holdHandles(t, repl.nfs, []uint64{g1}, s.noteFile(t))
	sums := regSums(t, repl, []uint64{g1})
	held := func(step string) {
		t.Helper()
		if st1, st2, data := resolve(t, repl.nfs, handles[g1]); st1 != 0 || st2 != 0 || !bytes.Equal(data, handles[g1].data) {
			t.Errorf("%s: held handles of generation %d: GETATTR %d, READ %d, %q", step, g1, st1, st2, data)
		}
		if got := regSums(t, repl, []uint64{g1}); got[g1] != sums[g1] {
			t.Errorf("%s: generation %d's registration changed on the replica", step, g1)
		}
	}

	// A connection reset in the middle of generation 2's stream, the
	// primary up: the next sync asks for the same incremental stream
	// again, not for a whole one.
	addBig(t, s, "big-two", 60)
	proxy.sent.Store(0)
	proxy.cutAt.Store(8 << 20)
	g2 := publishOne(t, s, prim.daemonProc, "second")
	repl.waitServes(t, g1, g2)
	repl.waitLog(t, fmt.Sprintf("generation=%d from=%d kind=incremental", g2, g1))
	if l := repl.logs.String(); !strings.Contains(l, "replica sync failed") || strings.Contains(l, "trying an older base or a whole stream") ||
		strings.Contains(l, fmt.Sprintf("generation=%d from=0", g2)) {
		t.Errorf("after a reset mid-stream the replica did not fail once and then receive generation %d incrementally again:\n%s", g2, l)
	}
	held("after a reset")
	last := len(repl.logs.String())

	// The primary killed in the middle of generation 3's stream.
	addBig(t, s, "big-three", 60)
	proxy.sent.Store(0)
	g3 := publishOne(t, s, prim.daemonProc, "third")
	proxy.waitSent(t, 8<<20)
	prim.cmd.Process.Kill()
	<-prim.done
	t.Logf("primary killed %d bytes into generation %d's stream", proxy.sent.Load(), g3)
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(repl.logs.String()[last:], "replica sync failed") {
		if time.Now().After(deadline) {
			t.Fatalf("the replica logged no failed sync after the primary died:\n%s", repl.logs.String()[last:])
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := snapshots(); !slices.Equal(got, []string{fmt.Sprintf("strata-%d", g1), fmt.Sprintf("strata-%d", g2)}) {
		t.Errorf("replica snapshot dir after the primary died mid-stream: %v, want strata-%d and strata-%d", got, g1, g2)
	}
	if got := manifests(t, rstate); !slices.Equal(got, []string{fmt.Sprint(g1), fmt.Sprint(g2)}) {
		t.Errorf("replica state dir manifests %v, want [%d %d]", got, g1, g2)
	}
	if got := ids(repl.generations(t).Generations); !slices.Equal(got, []uint64{g1, g2}) {
		t.Errorf("replica serves %v while the primary is down, want [%d %d]", got, g1, g2)
	}
	held("primary down")
	prim.restart(t, s)
	repl.waitServes(t, g1, g2, g3)
	if a, b := regSums(t, prim.daemonProc, []uint64{g3}), regSums(t, repl, []uint64{g3}); a[g3] != b[g3] {
		t.Errorf("generation %d: registration sha256 differs between primary and replica", g3)
	}
	held("after the catch-up")

	// The replica killed in the middle of generation 4's stream.
	addBig(t, s, "big-four", 60)
	proxy.sent.Store(0)
	g4 := publishOne(t, s, prim.daemonProc, "fourth")
	proxy.waitSent(t, 8<<20)
	repl.cmd.Process.Kill()
	<-repl.done
	t.Logf("replica killed %d bytes into generation %d's stream", proxy.sent.Load(), g4)
	deadline = time.Now().Add(10 * time.Second)
	for len(receiving(rsnaps)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("btrfs receive still runs 10 s after its replica was killed: %v", receiving(rsnaps))
		}
		time.Sleep(50 * time.Millisecond)
	}
	half := slices.Contains(snapshots(), fmt.Sprintf("strata-%d", g4))
	t.Logf("after the kill the replica's snapshot dir holds %v", snapshots())
	if got := manifests(t, rstate); !slices.Equal(got, []string{fmt.Sprint(g1), fmt.Sprint(g2), fmt.Sprint(g3)}) {
		t.Errorf("killed replica's manifests %v, want [%d %d %d]", got, g1, g2, g3)
	}
	repl = start(t, rcfg, rstate, nil)
	if half {
		repl.waitLog(t, "removing half-received snapshot")
	}
	repl.waitServes(t, g1, g2, g3, g4)
	if a, b := regSums(t, prim.daemonProc, []uint64{g2, g3, g4}), regSums(t, repl, []uint64{g2, g3, g4}); a[g2] != b[g2] || a[g3] != b[g3] || a[g4] != b[g4] {
		t.Errorf("registration sha256 of generations %d, %d, %d differ between primary and replica", g2, g3, g4)
	}
	held("after the restarted replica caught up")
	repl.stop(t)
	prim.stop(t)
}
