//go:build integration

// Package replica benchmarks replicating a generation to a replica server:
// a store of 100,000 paths (STRATA_BENCH_PATHS overrides) on a loop-backed
// btrfs, generation 1 published and received whole by a replica on another
// loop-backed btrfs, then 1,000 paths added and generation 2 published. It
// times the replica's sync of generation 2 (GET /v1/generations/2/stream?
// from=1, btrfs receive, the registration check, making it live) and counts
// the stream's bytes, next to `rsync -a --delete` of the same change
// between the same two snapshots (generation 1's files already copied to
// the destination), in the same run. BenchmarkReplicateZFS (zfs_test.go)
// is the same on OpenZFS, run in a guest by BenchmarkReplicateZFSInVM
// (vm_test.go, tag vm). Run it as root with
//
//	go test -tags integration -run '^$' -bench . -benchtime 1x ./bench/replica
package replica

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/apiserve"
	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/phase"
	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/server"
	"github.com/strata-nix/strata/server/replica"
	"github.com/strata-nix/strata/snapshot/btrfs"
)

const nix32 = "0123456789abcdfghijklmnpqrsvwxyz"

func storePath(prefix string, i int) string {
	name := fmt.Sprintf("%s-%d", prefix, i)
	h := sha256.Sum256([]byte(name))
	var sb strings.Builder
	sb.WriteString("/nix/store/")
	for k := 0; k < 32; k++ {
		bit := k * 5
		v := uint(h[bit/8])>>(bit%8) | uint(h[bit/8+1])<<(8-bit%8)
		sb.WriteByte(nix32[v&31])
	}
	sb.WriteString("-" + name)
	return sb.String()
}

// addPaths writes n paths (every fourth a directory with a script and a
// symlink, the others files of 1-4 KiB) into the store and registers them
// with `nix-store --load-db` (hashes given), with references to earlier
// paths of the same batch.
func addPaths(b *testing.B, s nixtest.Store, prefix string, n int) {
	b.Helper()
	store := filepath.Join(s.NixRoot(), "store")
	r := rand.New(rand.NewPCG(uint64(n), uint64(len(prefix))))
	paths := make([]string, n)
	var reg bytes.Buffer
	for i := range paths {
		paths[i] = storePath(prefix, i)
		dst := filepath.Join(store, filepath.Base(paths[i]))
		var err error
		if i%4 == 0 {
			err = os.Mkdir(dst, 0o755)
			if err == nil {
				err = os.WriteFile(filepath.Join(dst, "run"), []byte("#!/bin/sh\necho "+paths[i]+"\n"), 0o755)
			}
			if err == nil {
				err = os.Symlink("run", filepath.Join(dst, "link"))
			}
		} else {
			err = os.WriteFile(dst, []byte(paths[i]+"\n"+strings.Repeat("x", 1024+r.IntN(3072))), 0o644)
		}
		if err != nil {
			b.Fatal(err)
		}
		var refs []string
		if i > 0 {
			for k := r.IntN(6); k > 0; k-- {
				refs = append(refs, paths[r.IntN(i)])
			}
		}
		refs = uniq(refs)
		h := sha256.Sum256([]byte(paths[i]))
		fmt.Fprintf(&reg, "%s\n%s\n%d\n\n%d\n", paths[i], hex.EncodeToString(h[:]), 128+r.IntN(1<<20), len(refs))
		for _, ref := range refs {
			reg.WriteString(ref + "\n")
		}
	}
	cmd := s.Command("nix-store", "--load-db")
	cmd.Stdin = &reg
	if out, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("nix-store --load-db: %v\n%s", err, out)
	}
}

func uniq(s []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, x := range s {
		if !seen[x] {
			seen[x] = true
			out = append(out, x)
		}
	}
	return out
}

func benchPaths(b *testing.B) int {
	if s := os.Getenv("STRATA_BENCH_PATHS"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v < 1 {
			b.Fatalf("STRATA_BENCH_PATHS=%q: want a positive number", s)
		}
		return v
	}
	return 100_000
}

var rsyncSent = regexp.MustCompile(`Total bytes sent: ([0-9,.]+)`)
var rsyncRecv = regexp.MustCompile(`Total bytes received: ([0-9,.]+)`)

func rsyncBytes(b *testing.B, out string) int64 {
	var total int64
	for _, re := range []*regexp.Regexp{rsyncSent, rsyncRecv} {
		m := re.FindStringSubmatch(out)
		if m == nil {
			b.Fatalf("rsync --stats: no %s in\n%s", re, out)
		}
		v, err := strconv.ParseInt(strings.NewReplacer(",", "", ".", "").Replace(m[1]), 10, 64)
		if err != nil {
			b.Fatal(err)
		}
		total += v
	}
	return total
}

func rsync(b *testing.B, src, dst string) (time.Duration, int64) {
	b.Helper()
	flushDirty(b)
	start := time.Now()
	out, err := exec.Command("rsync", "-a", "--delete", "--stats", src+"/", dst+"/").CombinedOutput()
	took := time.Since(start)
	if err != nil {
		b.Fatalf("rsync: %v\n%s", err, out)
	}
	return took, rsyncBytes(b, string(out))
}

func BenchmarkReplicate(b *testing.B) {
	testenv.RequireRoot(b)
	testenv.RequireCommands(b, "rsync", "nix-store", "btrfs")
	n := benchPaths(b)
	ctx := context.Background()

	pmnt := testenv.LoopBtrfs(b, "6G")
	testenv.Run(b, "btrfs", "subvolume", "create", filepath.Join(pmnt, "nix"))
	st := nixtest.New(b, pmnt)
	start := time.Now()
	addPaths(b, st, "base", n)
	b.Logf("built a store of %d paths in %v", n, time.Since(start).Round(time.Millisecond))
	pcfg := server.Config{StoreRoot: st.NixRoot(), StoreDir: "/nix/store", Backend: "btrfs",
		SnapshotDir: filepath.Join(pmnt, "snaps"), StateDir: filepath.Join(b.TempDir(), "pstate"), Keep: 10}
	pbb, err := btrfs.New(pcfg.StoreRoot, pcfg.SnapshotDir, nil)
	if err != nil {
		b.Fatal(err)
	}
	pb := &timedBtrfs{Backend: pbb}
	prim, err := server.New(ctx, server.Options{Config: pcfg, Backend: pb})
	if err != nil {
		b.Fatal(err)
	}
	ts := httptest.NewServer(prim.Handler(apiserve.NewToken("bench"), nil, func() any { return nil }))
	defer ts.Close()
	publish := func() {
		if res, err := prim.Publish(ctx); err != nil || !res.Published {
			b.Fatalf("publish: %v %+v", err, res)
		}
	}
	publish()

	rmnt := testenv.LoopBtrfs(b, "6G")
	rcfg := server.Config{ReplicaOf: ts.URL, StoreRoot: filepath.Join(b.TempDir(), "none"), StoreDir: "/nix/store", Backend: "btrfs",
		SnapshotDir: filepath.Join(rmnt, "gens"), StateDir: filepath.Join(b.TempDir(), "rstate"), Keep: 10}
	rb, err := btrfs.NewReplica(rcfg.SnapshotDir, nil)
	if err != nil {
		b.Fatal(err)
	}
	rs, err := server.New(ctx, server.Options{Config: rcfg, Backend: rb})
	if err != nil {
		b.Fatal(err)
	}
	defer rs.Shutdown()
	p := replica.New(replica.Options{Primary: replica.Fixed(api.NewClient(ts.URL, "bench"), ts.URL), Backend: rb, Target: rs,
		StateDir: rcfg.StateDir, Registry: prometheus.NewRegistry()})
	first, err := p.Sync(ctx)
	if err != nil || len(first.Received) != 1 {
		b.Fatalf("first sync: %v %+v", err, first)
	}
	rdst := filepath.Join(rmnt, "rsync")
	if err := os.Mkdir(rdst, 0o755); err != nil {
		b.Fatal(err)
	}
	rsyncFullT, rsyncFullB := rsync(b, filepath.Join(pcfg.SnapshotDir, "strata-1"), rdst)

	addPaths(b, st, "new", 1000)
	incr, rowsT, spans := syncIncremental(b, p, rs, prim, &pb.log, 2, publish, nil)
	rsyncT, rsyncB := rsync(b, filepath.Join(pcfg.SnapshotDir, "strata-2"), rdst)
	what := btrfsStreamBytes(b, filepath.Join(pcfg.SnapshotDir, "strata-1"), filepath.Join(pcfg.SnapshotDir, "strata-2"))
	g1, _ := rs.Generation(1)
	g2, _ := rs.Generation(2)
	full := first.Received[0]

	// The same again (generation 3 adds 1,000 more paths) with cold
	// caches: every clean page and inode dropped before each side.
	addPaths(b, st, "cold", 1000)
	cold, _, coldSpans := syncIncremental(b, p, rs, prim, &pb.log, 3, publish, func() { dropCaches(b) })
	dropCaches(b)
	rsyncColdT, rsyncColdB := rsync(b, filepath.Join(pcfg.SnapshotDir, "strata-3"), rdst)

	printTable(b, table{setup: "btrfs on loop devices, same host", tool: "btrfs receive", g1: g1.Paths, g2: g2.Paths,
		full: full, incr: incr, rows: rowsT, spans: spans, what: what, rsyncFull: rsyncFullT, rsyncFullBytes: rsyncFullB, rsync: rsyncT, rsyncBytes: rsyncB,
		cold: &coldRow{strata: cold, rsync: rsyncColdT, rsyncBytes: rsyncColdB, spans: coldSpans}})
}

// dropCaches writes dirty pages back and drops the page, dentry and inode
// caches (echo 3 > /proc/sys/vm/drop_caches), for the cold-cache rows.
func dropCaches(b *testing.B) {
	b.Helper()
	unix.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0o200); err != nil {
		b.Fatalf("drop caches: %v", err)
	}
}

// coldRow is the cold-cache comparison: strata's incremental sync of the
// next generation and rsync's of the same change, each after dropCaches.
type coldRow struct {
	strata     synced
	rsync      time.Duration
	rsyncBytes int64
	spans      []phase.Span
}

// flushDirty writes every dirty page back (sync(2)) before a timed step,
// so that neither side pays for the writeback of what came before it (the
// initial copies write hundreds of megabytes to the replica's filesystem).
// Caches stay warm for both.
func flushDirty(b *testing.B) {
	b.Helper()
	unix.Sync()
}

// btrfsStreamBytes breaks the incremental stream from snapshot from to
// snapshot to down by what it carries: `btrfs send -p` (the same stream
// the primary's endpoint sent) through `btrfs receive --dump`, its write
// commands summed by file.
func btrfsStreamBytes(b *testing.B, from, to string) []kindBytes {
	b.Helper()
	send := exec.Command("btrfs", "send", "-q", "-p", from, to)
	dump := exec.Command("btrfs", "receive", "--dump")
	pipe, err := send.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	cr := &testenv.CountingReader{R: pipe}
	dump.Stdin = cr
	out, err := dump.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := send.Start(); err != nil {
		b.Fatal(err)
	}
	if err := dump.Start(); err != nil {
		b.Fatal(err)
	}
	sums := map[string]int64{}
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 4 || f[0] != "write" {
			continue
		}
		n, err := strconv.ParseInt(strings.TrimPrefix(f[len(f)-1], "len="), 10, 64)
		if err != nil {
			b.Fatalf("btrfs receive --dump: %q", sc.Text())
		}
		sums[fileKind(f[1])] += n
	}
	if err := dump.Wait(); err != nil {
		b.Fatalf("btrfs receive --dump: %v", err)
	}
	if err := send.Wait(); err != nil {
		b.Fatalf("btrfs send: %v", err)
	}
	var data int64
	var out2 []kindBytes
	for _, k := range []string{"store files (new paths)", "var/nix/db/db.sqlite", "var/nix/db/db.sqlite-wal", "other files"} {
		if sums[k] > 0 || k == "var/nix/db/db.sqlite-wal" {
			out2 = append(out2, kindBytes{k, sums[k]})
		}
		data += sums[k]
	}
	return append(out2, kindBytes{"stream commands and metadata", cr.N - data})
}

func fileKind(p string) string {
	switch {
	case strings.Contains(p, "/store/"):
		return "store files (new paths)"
	case strings.HasSuffix(p, "/var/nix/db/db.sqlite"):
		return "var/nix/db/db.sqlite"
	case strings.HasSuffix(p, "/var/nix/db/db.sqlite-wal"):
		return "var/nix/db/db.sqlite-wal"
	}
	return "other files"
}

type kindBytes struct {
	what  string
	bytes int64
}

// syncIncremental publishes generation id on the primary (dirty pages
// written back first) and times the replica's sync of it from id-1 (the
// benchmark's timed part) from the moment the publish returned, that is
// from when the generation is live on the primary, to when it is live on
// the replica: whatever the primary still does for the stream after its
// publish returned (a precompute still running) is inside. between, if
// set, runs after the publish and before the sync (dropping caches), and
// the time starts after it. Then it times how long the replica's path
// rows, written after the generation went live, take to appear (OpenRows
// waits for that write). Only generation 2's sync is the benchmark's timed
// op. The spans are seconds from the start of the timed part (the publish
// and a precompute begin before it: negative).
func syncIncremental(b *testing.B, p *replica.Puller, rs, prim *server.Server, primary **phase.Log, id uint64, publish, between func()) (synced, time.Duration, []phase.Span) {
	b.Helper()
	flushDirty(b)
	log := phase.New()
	*primary = log
	pubStart := time.Now()
	publish()
	pubEnd := time.Now()
	log.Add("primary: publish (snapshot, db, checks, live)", pubStart, pubEnd)
	if between != nil {
		between()
	}
	if id == 2 {
		b.ResetTimer()
	}
	syncStart := time.Now()
	res, err := p.Sync(phase.With(context.Background(), log))
	whole := time.Since(syncStart)
	if id == 2 {
		b.StopTimer()
	}
	*primary = nil
	if err != nil || len(res.Received) != 1 || res.Received[0].ID != id || res.Received[0].From != id-1 {
		b.Fatalf("incremental sync: %v %+v, want generation %d from %d", err, res, id, id-1)
	}
	var pre *precompute
	if start, end, ok := prim.Precomputed(id, id-1); ok {
		pre = &precompute{start: start.Sub(syncStart), end: end.Sub(syncStart)}
		log.Add("primary: precompute the stream (btrfs/zfs send to a file)", start, end)
	}
	start := time.Now()
	f, err := rs.OpenRows(id)
	if err != nil {
		b.Fatalf("rows of generation %d on the replica: %v", id, err)
	}
	f.Close()
	log.Add("after live: path rows written (background)", start, time.Now())
	shift := syncStart.Sub(pubStart) // the log started just before the publish
	spans := log.Spans()
	for i := range spans {
		spans[i].Start -= shift
		spans[i].End -= shift
	}
	return synced{Received: res.Received[0], Whole: whole, Pre: pre}, time.Since(start), spans
}

// precompute is when the primary's precompute of the stream ran, from
// the start of the timed sync (negative: before it).
type precompute struct{ start, end time.Duration }

// synced is one timed sync: what it received, and the whole sync's time
// (listing the primary's generations, the checks before asking for the
// stream, and retention after, besides the receive).
type synced struct {
	replica.Received
	Whole time.Duration
	Pre   *precompute // nil: the stream was sent live
}

// timedBtrfs is the primary's btrfs backend with its sends timed into log
// (the stream handler runs under the HTTP request's context, not the
// sync's).
type timedBtrfs struct {
	*btrfs.Backend
	log *phase.Log
}

func (t *timedBtrfs) Send(ctx context.Context, w io.Writer, id, from uint64) error {
	return timedSend(t.log, w, func(w io.Writer) error { return t.Backend.Send(ctx, w, id, from) }, "btrfs send")
}

// timedSend runs send into w and records, into log, the send from its
// start to its first byte and to its end.
func timedSend(log *phase.Log, w io.Writer, send func(io.Writer) error, tool string) error {
	if log == nil {
		return send(w)
	}
	start := time.Now()
	fw := &firstWrite{w: w}
	err := send(fw)
	end := time.Now()
	if !fw.at.IsZero() {
		log.Add("primary: "+tool+" until its first byte", start, fw.at)
	}
	log.Add("primary: "+tool, start, end)
	return err
}

type firstWrite struct {
	w  io.Writer
	at time.Time
}

func (f *firstWrite) Write(p []byte) (int, error) {
	if f.at.IsZero() {
		f.at = time.Now()
	}
	return f.w.Write(p)
}

// table is one bench-replica result: strata's whole and incremental
// syncs next to rsync's initial copy and incremental copy.
type table struct {
	setup, tool                string // where it ran; the receiving tool
	g1, g2                     int    // paths in generations 1 and 2
	full                       replica.Received
	incr                       synced
	rows                       time.Duration // the path rows written after going live
	spans                      []phase.Span  // where the incremental sync's time went
	what                       []kindBytes   // the incremental stream's bytes by what they carry
	cold                       *coldRow      // nil: no cold-cache rows
	rsyncFull, rsync           time.Duration
	rsyncFullBytes, rsyncBytes int64
}

// printTable prints t and reports its numbers as benchmark metrics.
func printTable(b *testing.B, t table) {
	fmt.Printf("\nreplicate a generation adding 1,000 paths to a %d-path store (%s)\n", t.g1, t.setup)
	fmt.Printf("(strata incremental: from the primary's publish returning, generation live there, to live on the replica)\n")
	fmt.Printf("%-44s %10s %14s\n", "", "seconds", "bytes")
	fmt.Printf("%-44s %10.2f %14d\n", fmt.Sprintf("strata generation 1 whole (%d paths)", t.g1), t.full.Took.Seconds(), t.full.Bytes)
	fmt.Printf("%-44s %10.2f %14d\n", "rsync -a generation 1 (initial copy)", t.rsyncFull.Seconds(), t.rsyncFullBytes)
	fmt.Printf("%-44s %10.2f %14d\n", fmt.Sprintf("strata generation 2 incremental (%d paths)", t.g2), t.incr.Whole.Seconds(), t.incr.Bytes+t.incr.DeltaBytes)
	for _, w := range t.what {
		fmt.Printf("%-44s %10s %14d\n", "  stream: "+w.what, "", w.bytes)
	}
	fmt.Printf("%-44s %10s %14d\n", "  registration delta (API, JSON)", "", t.incr.DeltaBytes)
	if pre := t.incr.Pre; pre != nil {
		fmt.Printf("%-44s %10.2f\n", "  stream precomputed at publish; ready at", pre.end.Seconds())
	} else {
		fmt.Printf("%-44s\n", "  stream sent live (not precomputed)")
	}
	fmt.Printf("%-44s %10.2f\n", "  of which stream and "+t.tool, t.incr.Stream.Seconds())
	fmt.Printf("%-44s %10.2f\n", "  of which check and make live", (t.incr.Took - t.incr.Stream).Seconds())
	fmt.Printf("%-44s %10.2f\n", "  of which listing, checks, retention", (t.incr.Whole - t.incr.Took).Seconds())
	fmt.Printf("%-44s %10.2f\n", "  path rows written after (background)", t.rows.Seconds())
	fmt.Printf("%-44s %10.2f %14d\n", "rsync -a --delete generation 1 -> 2", t.rsync.Seconds(), t.rsyncBytes)
	printSpans("the incremental sync's steps (seconds from its start; steps may overlap)", t.spans)
	fmt.Printf("%-44s %10.1fx %13.1fx\n", "rsync / strata (incremental)", t.rsync.Seconds()/t.incr.Whole.Seconds(), float64(t.rsyncBytes)/float64(t.incr.Bytes+t.incr.DeltaBytes))
	if c := t.cold; c != nil {
		fmt.Printf("%-44s %10.2f %14d\n", "strata generation 3 incremental, cold caches", c.strata.Whole.Seconds(), c.strata.Bytes+c.strata.DeltaBytes)
		fmt.Printf("%-44s %10.2f %14d\n", "rsync -a --delete 2 -> 3, cold caches", c.rsync.Seconds(), c.rsyncBytes)
		fmt.Printf("%-44s %10.1fx %13.1fx\n", "rsync / strata (incremental, cold caches)", c.rsync.Seconds()/c.strata.Whole.Seconds(), float64(c.rsyncBytes)/float64(c.strata.Bytes+c.strata.DeltaBytes))
		printSpans("the cold incremental sync's steps", c.spans)
	}
	b.ReportMetric(t.incr.Whole.Seconds(), "strata-s")
	b.ReportMetric(t.rsync.Seconds(), "rsync-s")
	b.ReportMetric(float64(t.incr.Bytes+t.incr.DeltaBytes), "strata-bytes")
	b.ReportMetric(float64(t.rsyncBytes), "rsync-bytes")
}

// printSpans prints a sync's steps, by start.
func printSpans(title string, spans []phase.Span) {
	if len(spans) == 0 {
		return
	}
	fmt.Printf("\n%s\n", title)
	fmt.Printf("%-60s %7s %7s %7s\n", "", "start", "end", "took")
	sorted := slices.Clone(spans)
	slices.SortStableFunc(sorted, func(a, b phase.Span) int { return cmp.Compare(a.Start, b.Start) })
	for _, s := range sorted {
		fmt.Printf("%-60s %7.3f %7.3f %7.3f\n", s.Name, s.Start.Seconds(), s.End.Seconds(), s.Took().Seconds())
	}
	fmt.Println()
}
