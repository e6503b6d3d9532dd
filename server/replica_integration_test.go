//go:build integration

package server

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/cluster"
	"github.com/strata-nix/strata/internal/apiserve"
	"github.com/strata-nix/strata/internal/nfsraw"
	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/server/nfs"
	"github.com/strata-nix/strata/server/nfs/guard"
	"github.com/strata-nix/strata/server/replica"
	"github.com/strata-nix/strata/snapshot/btrfs"
)

// served is a Server with its NFS export on a loopback port.
type served struct {
	*Server
	nfsAddr string
}

// serveNFS makes an export whose handle key lives in stateDir and serves it
// on 127.0.0.1:0 until the test ends.
func serveNFS(t *testing.T, stateDir string) (*nfs.Export, string) {
	t.Helper()
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	e, err := nfs.New(nfs.Options{StateDir: stateDir, Registry: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	l, err := nfs.Listen(nfs.ListenOptions{Addr: "127.0.0.1:0",
		Guard: guard.Options{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); e.Serve(ctx, l) }()
	t.Cleanup(func() { cancel(); l.Close(); e.Close(); <-done })
	return e, l.Addr().String()
}

// primaryEnv is a primary server over a real central store (btrfs loop
// device, nix-bin chroot store) with its API on an httptest server.
type primaryEnv struct {
	c   *central
	srv served
	api *httptest.Server
}

// add puts one store path named name with text into the primary's central
// store and publishes it as the next generation.
func (p *primaryEnv) add(t *testing.T, name, text string) {
	t.Helper()
	p.c.store.AddText(t, name, text)
	publish(t, p.srv.Server)
}

// replica starts a replica of this primary on its own loop btrfs, with the
// primary's token; nothing is synced yet.
func (p *primaryEnv) replica(t *testing.T) (*replicaEnv, served, *replica.Puller) {
	t.Helper()
	re := newReplicaEnv(t, p.api.URL)
	rs, pl := re.start(t, "primary-token")
	return re, rs, pl
}

func newPrimary(t *testing.T, keep int) *primaryEnv {
	t.Helper()
	c := newCentral(t)
	c.cfg.Keep = keep
	exp, addr := serveNFS(t, c.cfg.StateDir)
	b, err := btrfs.New(c.cfg.StoreRoot, c.cfg.SnapshotDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(context.Background(), Options{Config: c.cfg, Backend: b, Export: exp})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s.Handler(apiserve.NewToken("primary-token"), nil, func() any { return nil }))
	t.Cleanup(ts.Close)
	return &primaryEnv{c: c, srv: served{s, addr}, api: ts}
}

// replicaEnv is a replica server: its own btrfs, state dir and export.
type replicaEnv struct {
	cfg     Config
	snapDir string
}

func newReplicaEnv(t *testing.T, origin string) *replicaEnv {
	t.Helper()
	mnt := testenv.LoopBtrfs(t, "2G")
	dir := t.TempDir()
	return &replicaEnv{snapDir: filepath.Join(mnt, "gens"), cfg: Config{ReplicaOf: origin, StoreRoot: filepath.Join(dir, "no-store"),
		StoreDir: "/nix/store", Backend: "btrfs", SnapshotDir: filepath.Join(mnt, "gens"), StateDir: filepath.Join(dir, "state"), Keep: 10}}
}

// start starts (or restarts) the replica server and returns it with a
// puller that uses token.
func (r *replicaEnv) start(t *testing.T, token string) (served, *replica.Puller) {
	t.Helper()
	exp, addr := serveNFS(t, r.cfg.StateDir)
	b, err := btrfs.NewReplica(r.snapDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(context.Background(), Options{Config: r.cfg, Backend: b, Export: exp})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Shutdown) // joins the background writes of path rows
	p := replica.New(replica.Options{Primary: replica.Fixed(api.NewClient(r.cfg.ReplicaOf, token), r.cfg.ReplicaOf),
		Backend: b, Target: s, StateDir: r.cfg.StateDir, Registry: prometheus.NewRegistry()})
	return served{s, addr}, p
}

func syncOnce(t *testing.T, p *replica.Puller) replica.Result {
	t.Helper()
	res, err := p.Sync(context.Background())
	if err != nil {
		t.Fatalf("replica sync: %v", err)
	}
	return res
}

func ids(gs []api.Generation) []uint64 {
	var out []uint64
	for _, g := range gs {
		out = append(out, g.ID)
	}
	return out
}

// exportWalk walks generation id over NFS (internal/nfsraw) and returns one
// line per entry: path, type, mode, size, link target, sha256 of the file.
func exportWalk(t *testing.T, addr string, id uint64) string {
	t.Helper()
	c, err := nfsraw.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetTimeout(time.Minute)
	st, root, err := c.Mount(fmt.Sprintf("/gen/%d", id))
	if err != nil || st != 0 {
		t.Fatalf("mount /gen/%d at %s: status %d, %v", id, addr, st, err)
	}
	var lines []string
	var walk func(fh []byte, prefix string)
	walk = func(fh []byte, prefix string) {
		ents, err := c.ListAll(fh, 0, 0, 32768)
		if err != nil {
			t.Fatalf("list %s: %v", prefix, err)
		}
		for _, e := range ents {
			if e.Name == "." || e.Name == ".." {
				continue
			}
			p := prefix + "/" + e.Name
			line := fmt.Sprintf("%s %d %o %d", p, e.Attr.Type, e.Attr.Mode, e.Attr.Size)
			switch e.Attr.Type {
			case 1: // regular
				st, data, err := c.ReadAll(e.FH)
				if err != nil || st != 0 {
					t.Fatalf("read %s: status %d, %v", p, st, err)
				}
				sum := sha256.Sum256(data)
				line += " " + hex.EncodeToString(sum[:])
			case 5: // symlink
				st, target, err := c.Readlink(e.FH)
				if err != nil || st != 0 {
					t.Fatalf("readlink %s: status %d, %v", p, st, err)
				}
				line += " -> " + target
			case 2: // directory
				walk(e.FH, p)
			}
			lines = append(lines, line)
		}
	}
	walk(root, "")
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

func regSHA(t *testing.T, s *Server, id uint64) string {
	t.Helper()
	b, err := s.Registration(id)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// The replica role end to end on real btrfs and real Nix stores: a
// replica receives generation 1 whole and 2, 3 incrementally; its export
// walk (sha256 of every file over NFS) and its registrations equal the
// primary's; `generations --json` says where each came from and when; a
// restarted replica that missed two publishes catches up incrementally;
// one whose newest generation is gone on the primary takes a whole stream;
// a wrong token and a primary of another store are refused with nothing
// received; publish is refused on a replica.
func TestReplicaFollowsPrimary(t *testing.T) {
	prim := newPrimary(t, 3)
	prim.c.store.Fill(t)
	publish(t, prim.srv.Server)
	prim.add(t, "two", "2\n")
	prim.c.store.AddTree(t, "three", map[string]string{"bin/x*": "#!/bin/sh\n", "lib": "->bin"})
	publish(t, prim.srv.Server)

	re := newReplicaEnv(t, prim.api.URL)
	// Wrong token: refused, nothing received.
	_, bad := re.start(t, "wrong-token")
	if _, err := bad.Sync(context.Background()); err == nil || !strings.Contains(err.Error(), "401") || !strings.Contains(err.Error(), "replica.token_file") {
		t.Fatalf("sync with a wrong token: %v, want a 401 naming replica.token_file", err)
	}
	if ents, _ := os.ReadDir(re.snapDir); len(ents) != 0 {
		t.Fatalf("a refused replica received %d snapshots", len(ents))
	}

	rs, p := re.start(t, "primary-token")
	res := syncOnce(t, p)
	if len(res.Received) != 3 || res.Received[0].From != 0 || res.Received[1].From != 1 || res.Received[2].From != 2 {
		t.Fatalf("received %+v, want 1 whole, 2 from 1, 3 from 2", res.Received)
	}
	t.Logf("stream bytes: generation 1 whole %d, 2 incremental %d, 3 incremental %d", res.Received[0].Bytes, res.Received[1].Bytes, res.Received[2].Bytes)
	for _, id := range []uint64{1, 2, 3} {
		if w, r := exportWalk(t, prim.srv.nfsAddr, id), exportWalk(t, rs.nfsAddr, id); w != r {
			t.Errorf("generation %d: the replica's export walk differs from the primary's:\n%s\n---\n%s", id, r, w)
		} else if strings.Count(w, "\n") < 10 {
			t.Errorf("generation %d: export walk too small to mean anything:\n%s", id, w)
		}
		if a, b := regSHA(t, prim.srv.Server, id), regSHA(t, rs.Server, id); a != b {
			t.Errorf("generation %d: registration sha256 %s on the replica, %s on the primary", id, b, a)
		}
		// The replica writes the rows after the generation went live;
		// asking for them waits for that write.
		if a, b := rowsOf(t, prim.srv.Server, id), rowsOf(t, rs.Server, id); !bytes.Equal(a, b) {
			t.Errorf("generation %d: the replica's path rows (%d bytes) differ from the primary's (%d bytes)", id, len(b), len(a))
		}
	}
	// generations --json: origin and arrival time.
	rapi := httptest.NewServer(rs.Handler(apiserve.NewToken(""), nil, func() any { return nil }))
	defer rapi.Close()
	resp, err := http.Get(rapi.URL + "/v1/generations")
	if err != nil {
		t.Fatal(err)
	}
	var list api.GenerationList
	json.NewDecoder(resp.Body).Decode(&list)
	resp.Body.Close()
	if len(list.Generations) != 3 {
		t.Fatalf("replica lists %+v", list)
	}
	for _, g := range list.Generations {
		if g.Origin != prim.api.URL || g.Arrived == nil || time.Since(*g.Arrived) > time.Minute {
			t.Errorf("replica generation %d: origin %q arrived %v, want %s and just now", g.ID, g.Origin, g.Arrived, prim.api.URL)
		}
	}
	if _, err := api.NewClient(rapi.URL, "").Publish(context.Background()); err == nil {
		t.Errorf("publish on a replica succeeded")
	}
	if _, err := rs.Publish(context.Background()); err == nil || !strings.Contains(err.Error(), "replica") {
		t.Errorf("Publish on a replica: %v", err)
	}

	// The primary pins 3 (a label change on its snapshot, made writable
	// for a moment) and publishes 4: it still comes incrementally.
	if _, err := prim.srv.Pin(3, "keep"); err != nil {
		t.Fatal(err)
	}
	testenv.Run(t, "btrfs", "filesystem", "sync", prim.c.cfg.SnapshotDir)
	prim.add(t, "four", "4\n")
	if plive := ids(prim.srv.Generations()); fmt.Sprint(plive) != "[2 3 4]" {
		t.Fatalf("primary serves %v, want [2 3 4]", plive)
	}
	res = syncOnce(t, p)
	if len(res.Received) != 1 || res.Received[0].ID != 4 || res.Received[0].From == 0 {
		t.Fatalf("after the pin the replica received %+v, want 4 incrementally", res.Received)
	}

	// The replica is down while the primary publishes 5 and 6; restarted,
	// it serves what it had and catches up incrementally.
	// It also died before writing generation 4's rows (they are written
	// after the generation went live): the next start writes them from the
	// snapshot's DB.
	rs.Shutdown()
	if err := os.Remove(filepath.Join(re.cfg.StateDir, "generations", "4", "paths.jsonl.gz")); err != nil {
		t.Fatal(err)
	}
	prim.add(t, "five", "5\n")
	prim.add(t, "six", "6\n")
	rs, p = re.start(t, "primary-token")
	if a, b := rowsOf(t, prim.srv.Server, 4), rowsOf(t, rs.Server, 4); !bytes.Equal(a, b) {
		t.Errorf("generation 4: rows written at the restart differ from the primary's")
	}
	if got := ids(rs.Generations()); fmt.Sprint(got) != "[1 2 3 4]" {
		t.Fatalf("restarted replica serves %v, want [1 2 3 4]", got)
	}
	res = syncOnce(t, p)
	if len(res.Received) != 2 || res.Received[0].ID != 5 || res.Received[0].From != 4 || res.Received[1].From != 5 {
		t.Fatalf("catch-up received %+v, want 5 from 4, 6 from 5", res.Received)
	}
	if w, r := exportWalk(t, prim.srv.nfsAddr, 6), exportWalk(t, rs.nfsAddr, 6); w != r {
		t.Errorf("generation 6 differs after catch-up")
	}

	// The primary unpins 3; the replica is down again while the primary
	// publishes 7, 8, 9 and its retention (keep 3) destroys 3 to 6: none
	// of the replica's generations is live there any more, so the oldest
	// live one comes whole, the rest incrementally.
	if _, err := prim.srv.Unpin(3); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"seven", "eight", "nine"} {
		prim.c.store.AddText(t, n, n+"\n")
		publish(t, prim.srv.Server)
	}
	if plive := ids(prim.srv.Generations()); fmt.Sprint(plive) != "[7 8 9]" {
		t.Fatalf("primary serves %v, want [7 8 9]", plive)
	}
	res = syncOnce(t, p)
	if len(res.Received) != 3 || res.Received[0].ID != 7 || res.Received[0].From != 0 || res.Received[1].From != 7 || res.Received[2].From != 8 {
		t.Fatalf("after losing its base the replica received %+v, want 7 whole, 8 from 7, 9 from 8", res.Received)
	}
	if a, b := regSHA(t, prim.srv.Server, 9), regSHA(t, rs.Server, 9); a != b {
		t.Errorf("generation 9: registration sha256 differs")
	}

	// A primary of another central store: refused, nothing received.
	other := newPrimary(t, 3)
	other.c.store.Fill(t)
	other.c.store.AddText(t, "other", "x\n")
	for range 9 {
		other.c.store.AddText(t, fmt.Sprintf("o-%d", time.Now().UnixNano()), "o\n")
		publish(t, other.srv.Server)
	}
	before, _ := os.ReadDir(re.snapDir)
	re.cfg.ReplicaOf = other.api.URL
	_, p2 := re.start(t, "primary-token")
	if _, err := p2.Sync(context.Background()); err == nil || !strings.Contains(err.Error(), "another cluster") {
		t.Errorf("sync from a primary of another store: %v, want a refusal", err)
	}
	if after, _ := os.ReadDir(re.snapDir); len(after) != len(before) {
		t.Errorf("refused sync changed the snapshot dir: %d entries, was %d", len(after), len(before))
	}
}

// 1,000 new small paths (one file of 1-4 KiB each) in a store of 20,000:
// the incremental stream is under 10 % of the whole one. What an
// incremental carries besides the new files is the central store's
// db.sqlite pages that the 1,000 inserts touched: SQLite's index on the
// path hash spreads them over the whole index (about 2 MB here), so with
// 100-byte paths the ratio is about 13 %.
func TestReplicaIncrementalProportional(t *testing.T) {
	prim := newPrimary(t, 10)
	addMany(t, prim.c.store, "base", 20000)
	publish(t, prim.srv.Server)
	_, _, p := prim.replica(t)
	res := syncOnce(t, p)
	addMany(t, prim.c.store, "new", 1000)
	publish(t, prim.srv.Server)
	res2 := syncOnce(t, p)
	if len(res.Received) != 1 || len(res2.Received) != 1 {
		t.Fatalf("received %+v then %+v", res.Received, res2.Received)
	}
	full, incr := res.Received[0].Bytes, res2.Received[0].Bytes
	t.Logf("20,000-path store: whole stream %d bytes; +1,000 paths: incremental stream %d bytes (%.1f %%)", full, incr, 100*float64(incr)/float64(full))
	if incr*10 >= full {
		t.Errorf("incremental stream %d bytes is not under 10 %% of the whole %d", incr, full)
	}
	g, _ := prim.srv.Generation(2)
	if g.Paths < 21000 {
		t.Errorf("generation 2 has %d paths, want >= 21000", g.Paths)
	}
}

// addMany adds n small single-file paths (1-4 KiB) with nix-store --add,
// 2,000 per call.
func addMany(t *testing.T, st nixtest.Store, prefix string, n int) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), prefix)
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	var batch []string
	flush := func() {
		if len(batch) == 0 {
			return
		}
		cmd := st.Command("nix-store", append([]string{"--add"}, batch...)...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Run(); err != nil {
			t.Fatalf("nix-store --add: %v\n%s", err, stderr.String())
		}
		batch = batch[:0]
	}
	for i := range n {
		p := filepath.Join(dir, fmt.Sprintf("%s-%05d", prefix, i))
		if err := os.WriteFile(p, []byte(fmt.Sprintf("%s %d %s\n", prefix, i, strings.Repeat("x", 1024+(i*37)%3072))), 0o644); err != nil {
			t.Fatal(err)
		}
		batch = append(batch, p)
		if len(batch) == 2000 {
			flush()
		}
	}
	flush()
}

// replica.from_cluster: the replica finds its primary by gossip (real
// memberlist over loopback): the one alive server that is not a replica.
func TestReplicaFromCluster(t *testing.T) {
	prim := newPrimary(t, 10)
	prim.c.store.Fill(t)
	publish(t, prim.srv.Server)
	pn, err := cluster.New(cluster.Config{Name: "primary", ClusterName: "t", Bind: "127.0.0.1:0", Settle: time.Second,
		Meta: cluster.Meta{Role: cluster.RoleServer, API: prim.api.URL}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pn.Close()
	rn, err := cluster.New(cluster.Config{Name: "replica", ClusterName: "t", Bind: "127.0.0.1:0", Join: []string{pn.Addr()}, Settle: time.Second,
		Meta: cluster.Meta{Role: cluster.RoleServer, API: "http://127.0.0.1:1", Replica: true}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rn.Close()
	re := newReplicaEnv(t, "")
	re.cfg.ReplicaFromCluster = true
	exp, _ := serveNFS(t, re.cfg.StateDir)
	b, err := btrfs.NewReplica(re.snapDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	rs, err := New(context.Background(), Options{Config: re.cfg, Backend: b, Export: exp})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rs.Shutdown)
	p := replica.New(replica.Options{Primary: replica.FromCluster(rn.Servers, "primary-token"), Backend: b, Target: rs, Registry: prometheus.NewRegistry()})
	var res replica.Result
	deadline := time.Now().Add(30 * time.Second)
	for {
		if res, err = p.Sync(context.Background()); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("sync from the cluster's primary: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if len(res.Received) != 1 || p.Primary() != prim.api.URL {
		t.Fatalf("received %+v from %q, want generation 1 from %s", res.Received, p.Primary(), prim.api.URL)
	}
	if g, _ := rs.Generation(1); g.Origin != prim.api.URL {
		t.Errorf("origin %q", g.Origin)
	}
}

// rowsOf returns generation id's path rows file as s serves it.
func rowsOf(t *testing.T, s *Server, id uint64) []byte {
	t.Helper()
	f, err := s.OpenRows(id)
	if err != nil {
		t.Fatalf("rows of generation %d: %v", id, err)
	}
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestReplicaRefusesPrimaryStartedOver: a primary that lost its state dir
// and snapshots publishes from generation 1 again, with the same central
// store (same store identity). The replica refuses it loudly at every
// sync (ErrDiverged, naming the generation and both registrations), while
// the primary's newest is older than the replica's and once it is past
// it (its generation 3 would have come next to other content under 1 and
// 2); it receives nothing,
// destroys nothing, and keeps serving what it had, unchanged.
func TestReplicaRefusesPrimaryStartedOver(t *testing.T) {
	prim := newPrimary(t, 10)
	prim.add(t, "one", "1\n")
	prim.add(t, "two", "2\n")
	re, rs, p := prim.replica(t)
	syncOnce(t, p)
	had := map[uint64]string{1: regSHA(t, rs.Server, 1), 2: regSHA(t, rs.Server, 2)}
	walks := map[uint64]string{1: exportWalk(t, rs.nfsAddr, 1), 2: exportWalk(t, rs.nfsAddr, 2)}

	// The primary starts over: a new state dir and snapshot dir, the same
	// store.
	prim.srv.Shutdown()
	c := prim.c
	c.cfg.StateDir = filepath.Join(t.TempDir(), "state")
	c.cfg.SnapshotDir = filepath.Join(filepath.Dir(c.cfg.SnapshotDir), "snaps-again")
	if err := os.MkdirAll(c.cfg.SnapshotDir, 0o755); err != nil {
		t.Fatal(err)
	}
	again := c.server(t)
	t.Cleanup(again.Shutdown)
	ts := httptest.NewServer(again.Handler(apiserve.NewToken("primary-token"), nil, func() any { return nil }))
	t.Cleanup(ts.Close)
	c.store.AddText(t, "three", "3\n")
	if id := publish(t, again); id != 1 {
		t.Fatalf("the primary started over published generation %d, want 1", id)
	}
	if again.StoreID() != rs.StoreID() {
		t.Fatalf("store %s on the primary started over, %s on the replica: want the same store", again.StoreID(), rs.StoreID())
	}
	p = replica.New(replica.Options{Primary: replica.Fixed(api.NewClient(ts.URL, "primary-token"), ts.URL),
		Backend: mustReplicaBackend(t, re.snapDir), Target: rs.Server, StateDir: re.cfg.StateDir, Registry: prometheus.NewRegistry()})
	check := func(want string) {
		t.Helper()
		res, err := p.Sync(context.Background())
		if !errors.Is(err, replica.ErrDiverged) || !strings.Contains(err.Error(), want) || len(res.Received) != 0 {
			t.Fatalf("sync: %+v %v, want ErrDiverged naming %q and nothing received", res.Received, err, want)
		}
		if got := ids(rs.Generations()); fmt.Sprint(got) != "[1 2]" {
			t.Fatalf("the replica serves %v, want [1 2] as before", got)
		}
		for id, sum := range had {
			if regSHA(t, rs.Server, id) != sum || exportWalk(t, rs.nfsAddr, id) != walks[id] {
				t.Errorf("generation %d changed on the replica", id)
			}
			if _, err := os.Stat(filepath.Join(re.snapDir, fmt.Sprintf("strata-%d", id))); err != nil {
				t.Errorf("generation %d's snapshot: %v", id, err)
			}
		}
	}
	g1, _ := again.Generation(1)
	want := fmt.Sprintf("has generation 1 with registration sha256 %s, this replica has generation 1 with %s", g1.RegistrationSHA256, had[1])
	check(want)
	// Past the replica's ids: generation 3 would have been received
	// (whole: no common base) next to the replica's other 1 and 2.
	for _, n := range []string{"four", "five"} {
		c.store.AddText(t, n, n+"\n")
		publish(t, again)
	}
	check(want)
}

func mustReplicaBackend(t *testing.T, dir string) *btrfs.Backend {
	t.Helper()
	b, err := btrfs.NewReplica(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
