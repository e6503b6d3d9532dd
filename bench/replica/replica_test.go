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
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/apiserve"
	"github.com/strata-nix/strata/internal/nixtest"
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
	pb, err := btrfs.New(pcfg.StoreRoot, pcfg.SnapshotDir, nil)
	if err != nil {
		b.Fatal(err)
	}
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
	publish()
	incr, rowsT := syncIncremental(b, p, rs)
	rsyncT, rsyncB := rsync(b, filepath.Join(pcfg.SnapshotDir, "strata-2"), rdst)
	g1, _ := rs.Generation(1)
	g2, _ := rs.Generation(2)
	full := first.Received[0]

	printTable(b, table{setup: "btrfs on loop devices, same host", tool: "btrfs receive", g1: g1.Paths, g2: g2.Paths,
		full: full, incr: incr, rows: rowsT, rsyncFull: rsyncFullT, rsyncFullBytes: rsyncFullB, rsync: rsyncT, rsyncBytes: rsyncB})
}

// syncIncremental times the replica's sync of generation 2 from 1 (the
// benchmark's timed part), then how long its path rows, written after the
// generation went live, take to appear (OpenRows waits for that write).
func syncIncremental(b *testing.B, p *replica.Puller, rs *server.Server) (replica.Received, time.Duration) {
	b.Helper()
	b.ResetTimer()
	res, err := p.Sync(context.Background())
	b.StopTimer()
	if err != nil || len(res.Received) != 1 || res.Received[0].From != 1 {
		b.Fatalf("incremental sync: %v %+v", err, res)
	}
	start := time.Now()
	f, err := rs.OpenRows(2)
	if err != nil {
		b.Fatalf("rows of generation 2 on the replica: %v", err)
	}
	f.Close()
	return res.Received[0], time.Since(start)
}

// table is one bench-replica result: strata's whole and incremental
// syncs next to rsync's initial copy and incremental copy.
type table struct {
	setup, tool                string // where it ran; the receiving tool
	g1, g2                     int    // paths in generations 1 and 2
	full, incr                 replica.Received
	rows                       time.Duration // the path rows written after going live
	rsyncFull, rsync           time.Duration
	rsyncFullBytes, rsyncBytes int64
}

// printTable prints t and reports its numbers as benchmark metrics.
func printTable(b *testing.B, t table) {
	fmt.Printf("\nreplicate a generation adding 1,000 paths to a %d-path store (%s)\n", t.g1, t.setup)
	fmt.Printf("%-44s %10s %14s\n", "", "seconds", "bytes")
	fmt.Printf("%-44s %10.2f %14d\n", fmt.Sprintf("strata generation 1 whole (%d paths)", t.g1), t.full.Took.Seconds(), t.full.Bytes)
	fmt.Printf("%-44s %10.2f %14d\n", "rsync -a generation 1 (initial copy)", t.rsyncFull.Seconds(), t.rsyncFullBytes)
	fmt.Printf("%-44s %10.2f %14d\n", fmt.Sprintf("strata generation 2 incremental (%d paths)", t.g2), t.incr.Took.Seconds(), t.incr.Bytes)
	fmt.Printf("%-44s %10.2f\n", "  of which stream and "+t.tool, t.incr.Stream.Seconds())
	fmt.Printf("%-44s %10.2f\n", "  of which check and make live", (t.incr.Took - t.incr.Stream).Seconds())
	fmt.Printf("%-44s %10.2f\n", "  path rows written after (background)", t.rows.Seconds())
	fmt.Printf("%-44s %10.2f %14d\n", "rsync -a --delete generation 1 -> 2", t.rsync.Seconds(), t.rsyncBytes)
	fmt.Printf("%-44s %10.1fx %13.1fx\n", "rsync / strata (incremental)", t.rsync.Seconds()/t.incr.Took.Seconds(), float64(t.rsyncBytes)/float64(t.incr.Bytes))
	b.ReportMetric(t.incr.Took.Seconds(), "strata-s")
	b.ReportMetric(t.rsync.Seconds(), "rsync-s")
	b.ReportMetric(float64(t.incr.Bytes), "strata-bytes")
	b.ReportMetric(float64(t.rsyncBytes), "rsync-bytes")
}
