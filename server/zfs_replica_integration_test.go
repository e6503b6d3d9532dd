//go:build integration

package server

import (
	"context"
	"crypto/rand"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/apiserve"
	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/server/replica"
	"github.com/strata-nix/strata/snapshot/zfs"
)

// replicaChildEnv makes TestMain run one replica Sync instead of the tests:
// "DATASET|MOUNTDIR|STATEDIR|PRIMARY_URL". TestZFSReplicaFollowsPrimary
// kills it with SIGKILL in the middle of a stream, as a replica daemon
// could be killed.
const replicaChildEnv = "STRATA_SERVERTEST_REPLICA_SYNC"

func TestMain(m *testing.M) {
	if spec := os.Getenv(replicaChildEnv); spec != "" {
		p := strings.Split(spec, "|")
		cfg := zfsReplicaConfig(p[0], p[1], p[2], p[3])
		if err := func() error {
			b, err := zfs.NewReplica(cfg.Dataset, cfg.MountDir, nil)
			if err != nil {
				return err
			}
			s, err := New(context.Background(), Options{Config: cfg, Backend: b})
			if err != nil {
				return err
			}
			pl := replica.New(replica.Options{Primary: replica.Fixed(api.NewClient(cfg.ReplicaOf, "primary-token"), cfg.ReplicaOf),
				Backend: b, Target: s, StateDir: cfg.StateDir})
			_, err = pl.Sync(context.Background())
			return err
		}(); err != nil {
			fmt.Fprintln(os.Stderr, "child replica sync:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func zfsReplicaConfig(dataset, mountDir, stateDir, origin string) Config {
	return Config{ReplicaOf: origin, StoreRoot: filepath.Join(stateDir, "no-store"), StoreDir: "/nix/store",
		Backend: "zfs", Dataset: dataset, MountDir: mountDir, StateDir: stateDir, Keep: 10}
}

// throttle slows snapshot streams to about 4 MiB/s while on is set and
// counts the stream bytes it passed, so a test can kill a receiver halfway.
type throttle struct {
	h    http.Handler
	on   atomic.Bool
	sent atomic.Int64
}

func (th *throttle) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if th.on.Load() && strings.HasSuffix(r.URL.Path, "/stream") {
		w = &slowWriter{ResponseWriter: w, th: th}
	}
	th.h.ServeHTTP(w, r)
}

type slowWriter struct {
	http.ResponseWriter
	th *throttle
}

func (s *slowWriter) Write(p []byte) (int, error) {
	var n int
	for len(p) > 0 {
		c := min(len(p), 64<<10)
		k, err := s.ResponseWriter.Write(p[:c])
		n += k
		s.th.sent.Add(int64(k))
		if err != nil {
			return n, err
		}
		if f, ok := s.ResponseWriter.(http.Flusher); ok {
			f.Flush()
		}
		p = p[c:]
		time.Sleep(16 * time.Millisecond)
	}
	return n, nil
}

func (s *slowWriter) Flush() {
	if f, ok := s.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// The replica role on real OpenZFS (the VM tier runs this with a pool,
// vm.TestOpenZFSReplica): a replica server receives generation 1 whole
// and 2, 3 incrementally through the primary's API (zfs send -i / zfs
// receive -s); its export walk (sha256 of every file over NFS) and its
// registrations equal the primary's. Then a replica killed with SIGKILL in
// the middle of generation 4's stream leaves a resume token, and the
// restarted replica asks only for the rest (zfs send -t) and serves 4.
func TestZFSReplicaFollowsPrimary(t *testing.T) {
	pool := testenv.RequireZpool(t)
	testenv.RequireCommands(t, "nix-store")
	dir := t.TempDir()
	parent := fmt.Sprintf("%s/strata-replica-%d", pool, os.Getpid())
	primDS, replDS := parent+"/primary", parent+"/replica"
	root := filepath.Join(dir, "root")
	testenv.Run(t, "zfs", "create", "-p", "-o", "mountpoint=none", parent)
	testenv.Run(t, "zfs", "create", "-o", "mountpoint="+filepath.Join(root, "nix"), primDS)
	primMount, replMount := filepath.Join(dir, "pgens"), filepath.Join(dir, "rgens")
	t.Cleanup(func() {
		for _, m := range []string{primMount, replMount} {
			entries, _ := os.ReadDir(m)
			for _, e := range entries {
				_ = exec.Command("umount", filepath.Join(m, e.Name())).Run()
			}
		}
		if out, err := exec.Command("zfs", "destroy", "-r", "-f", parent).CombinedOutput(); err != nil {
			t.Errorf("zfs destroy -r %s: %v %s", parent, err, out)
		}
	})

	// The primary: a Nix store on its own dataset, its export and API.
	st := nixtest.New(t, root)
	// No Fill: its nix-build needs a sandbox, and a guest's initramfs root
	// cannot pivot_root.
	st.AddTree(t, "tool-a", map[string]string{"bin/run*": "#!/bin/sh\necho a\n", "lib": "->bin", "share/doc": "a tool\n"})
	addMany(t, st, "base", 400)
	pcfg := Config{StoreRoot: st.NixRoot(), StoreDir: "/nix/store", Backend: "zfs", Dataset: primDS,
		MountDir: primMount, StateDir: filepath.Join(dir, "pstate"), Keep: 10}
	pexp, paddr := serveNFS(t, pcfg.StateDir)
	pb, err := zfs.New(primDS, primMount, nil)
	if err != nil {
		t.Fatal(err)
	}
	prim, err := New(context.Background(), Options{Config: pcfg, Backend: pb, Export: pexp})
	if err != nil {
		t.Fatal(err)
	}
	th := &throttle{h: prim.Handler(apiserve.NewToken("primary-token"), nil, func() any { return nil })}
	papi := httptest.NewServer(th)
	t.Cleanup(papi.Close)
	publish(t, prim)
	st.AddText(t, "two", "2\n")
	publish(t, prim)
	st.AddTree(t, "three", map[string]string{"bin/x*": "#!/bin/sh\n", "lib": "->bin"})
	publish(t, prim)

	rstate := filepath.Join(dir, "rstate")
	rcfg := zfsReplicaConfig(replDS, replMount, rstate, papi.URL)
	startReplica := func(reg *prometheus.Registry) (served, *replica.Puller) {
		t.Helper()
		exp, addr := serveNFS(t, rstate)
		b, err := zfs.NewReplica(replDS, replMount, nil)
		if err != nil {
			t.Fatal(err)
		}
		s, err := New(context.Background(), Options{Config: rcfg, Backend: b, Export: exp})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(s.Shutdown) // joins the background writes of path rows
		return served{s, addr}, replica.New(replica.Options{Primary: replica.Fixed(api.NewClient(papi.URL, "primary-token"), papi.URL),
			Backend: b, Target: s, StateDir: rstate, Registry: reg})
	}

	rs, p := startReplica(nil)
	res := syncOnce(t, p)
	if len(res.Received) != 3 || res.Received[0].From != 0 || res.Received[1].From != 1 || res.Received[2].From != 2 {
		t.Fatalf("received %+v, want 1 whole, 2 from 1, 3 from 2", res.Received)
	}
	t.Logf("zfs stream bytes: generation 1 whole %d, 2 incremental %d, 3 incremental %d", res.Received[0].Bytes, res.Received[1].Bytes, res.Received[2].Bytes)
	if res.Received[1].Bytes*4 >= res.Received[0].Bytes {
		t.Errorf("incremental stream of one small path (%d bytes) is not under a quarter of the whole stream (%d)", res.Received[1].Bytes, res.Received[0].Bytes)
	}
	for _, id := range []uint64{1, 2, 3} {
		if w, r := exportWalk(t, paddr, id), exportWalk(t, rs.nfsAddr, id); w != r {
			t.Errorf("generation %d: the replica's export walk differs from the primary's:\n%s\n---\n%s", id, r, w)
		} else if strings.Count(w, "\n") < 10 {
			t.Errorf("generation %d: export walk too small to mean anything:\n%s", id, w)
		}
		if a, b := regSHA(t, prim, id), regSHA(t, rs.Server, id); a != b {
			t.Errorf("generation %d: registration sha256 %s on the replica, %s on the primary", id, b, a)
		}
	}
	rs.Shutdown()

	// Generation 4 adds 24 MiB of incompressible data. A replica daemon
	// (a child process) is killed with SIGKILL once about a third of its
	// stream has passed.
	big := filepath.Join(t.TempDir(), "blob")
	buf := make([]byte, 24<<20)
	rand.Read(buf)
	if err := os.WriteFile(big, buf, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := st.Command("nix-store", "--add", big).CombinedOutput(); err != nil {
		t.Fatalf("nix-store --add: %v\n%s", err, out)
	}
	publish(t, prim)
	th.sent.Store(0)
	th.on.Store(true)
	self, _ := os.Executable()
	child := exec.Command(self)
	child.Env = append(os.Environ(), fmt.Sprintf("%s=%s|%s|%s|%s", replicaChildEnv, replDS, replMount, rstate, papi.URL))
	child.Stderr = os.Stderr
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for th.sent.Load() < 8<<20 {
		if time.Now().After(deadline) {
			child.Process.Kill()
			child.Wait()
			t.Fatalf("the child replica received only %d bytes of generation 4 in 2 minutes", th.sent.Load())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := child.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	child.Wait()
	killedAt := th.sent.Load()
	th.on.Store(false)
	b, err := zfs.NewReplica(replDS, replMount, nil)
	if err != nil {
		t.Fatal(err)
	}
	var tok string
	for i := 0; i < 100 && tok == ""; i++ { // zfs receive notices its stdin closed and saves its state
		if tok, err = b.ResumeToken(context.Background()); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if tok == "" {
		t.Fatalf("no resume token after the replica was killed %d bytes into generation 4", killedAt)
	}
	if l, _ := b.List(context.Background()); len(l) != 3 {
		t.Errorf("after the killed receive the replica has %+v, want generations 1-3 only", l)
	}

	// Restarted, the replica resumes: it asks for the rest of the stream
	// only, and serves generation 4 equal to the primary's.
	reg := prometheus.NewRegistry()
	rs, p = startReplica(reg)
	res = syncOnce(t, p)
	if len(res.Received) != 1 || res.Received[0].ID != 4 {
		t.Fatalf("after the restart the replica received %+v, want generation 4", res.Received)
	}
	resumed := counterValue(t, reg, "strata_replica_stream_bytes_total", "kind", "resume")
	t.Logf("generation 4: killed after %d stream bytes; the resume carried %d bytes (metric: %.0f)", killedAt, res.Received[0].Bytes, resumed)
	if resumed != float64(res.Received[0].Bytes) {
		t.Errorf("strata_replica_stream_bytes_total{kind=resume} = %.0f, want the %d bytes of the resumed stream", resumed, res.Received[0].Bytes)
	}
	if res.Received[0].Bytes == 0 || res.Received[0].Bytes > int64(len(buf))-int64(killedAt)/2 {
		t.Errorf("the resume carried %d bytes: want only the rest of a %d-byte path after %d were received", res.Received[0].Bytes, len(buf), killedAt)
	}
	if w, r := exportWalk(t, paddr, 4), exportWalk(t, rs.nfsAddr, 4); w != r {
		t.Errorf("generation 4 differs on the replica after the resume")
	}
	if a, b := regSHA(t, prim, 4), regSHA(t, rs.Server, 4); a != b {
		t.Errorf("generation 4: registration sha256 differs after the resume")
	}
}

// counterValue returns the counter name{label=value} gathered from reg.
func counterValue(t *testing.T, reg *prometheus.Registry, name, label, value string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}
