//go:build integration

package publish

import (
	"bytes"
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	_ "modernc.org/sqlite"

	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/nixstore"
)

const cacheRoot = "/var/tmp/strata-bench"

// nix32 is Nix's base-32 alphabet.
const nix32 = "0123456789abcdfghijklmnpqrsvwxyz"

func benchPaths(b *testing.B) int {
	n := 100_000
	if s := os.Getenv("STRATA_BENCH_PATHS"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v < 1 {
			b.Fatalf("STRATA_BENCH_PATHS=%q: want a positive number", s)
		}
		n = v
	}
	return n
}

// storePath names bench path i: a 32-character base-32 hash part (the
// first 160 bits of sha256 of the name, as Nix's compressed hashes) and
// the name.
func storePath(i int) string {
	name := fmt.Sprintf("bench-%d", i)
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

// benchStore returns a chroot store of n registered paths with real files,
// building it the first time (cached by n).
func benchStore(b *testing.B, n int) nixtest.Store {
	b.Helper()
	testenv.RequireRoot(b)
	testenv.RequireCommands(b, "nix-store")
	root := filepath.Join(cacheRoot, fmt.Sprintf("publish-%d-v1", n))
	done := filepath.Join(root, "complete")
	if _, err := os.Stat(done); err == nil {
		return nixtest.Store{Root: root}
	}
	if err := os.RemoveAll(root); err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	s := nixtest.New(b, root)
	store := filepath.Join(s.NixRoot(), "store")

	// Real files: every fourth path is a directory with a script and a
	// symlink, the others single files.
	r := rand.New(rand.NewPCG(1, 2))
	paths := make([]string, n)
	var reg bytes.Buffer
	for i := range paths {
		paths[i] = storePath(i)
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
			err = os.WriteFile(dst, []byte(paths[i]+"\n"), 0o644)
		}
		if err != nil {
			b.Fatal(err)
		}
		// Registration (hashes given): refs to 0–10
		// earlier paths (about 5 on average), so the closure is complete.
		var refs []string
		if i > 0 {
			for k := r.IntN(11); k > 0; k-- {
				refs = append(refs, paths[r.IntN(i)])
			}
		}
		slices.Sort(refs)
		refs = slices.Compact(refs)
		h := sha256.Sum256([]byte(paths[i]))
		fmt.Fprintf(&reg, "%s\n%s\n%d\n\n%d\n", paths[i], hex.EncodeToString(h[:]), 128+r.IntN(1<<20), len(refs))
		for _, ref := range refs {
			reg.WriteString(ref + "\n")
		}
	}
	files := time.Since(start)
	// Nix 2.8's `--register-validity --hash-given` stats /nix/store/… on
	// the host, not in the chroot store, so register with --load-db: the
	// same format and transaction (hashes given), without canonicalising
	// file metadata.
	cmd := s.Command("nix-store", "--load-db")
	cmd.Stdin = &reg
	if out, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("nix-store --load-db: %v\n%s", err, out)
	}
	if err := os.WriteFile(done, nil, 0o644); err != nil {
		b.Fatal(err)
	}
	b.Logf("built a store of %d paths in %v (files %v, load-db %v)", n, time.Since(start).Round(time.Millisecond), files.Round(time.Millisecond), (time.Since(start) - files).Round(time.Millisecond))
	return s
}

// walCopy makes a copy of the store's db dir whose last transaction (one
// more path) is still in db.sqlite-wal, as a snapshot of a store that a
// nix-daemon keeps open looks.
func walCopy(b *testing.B, dbDir string) string {
	b.Helper()
	live := b.TempDir()
	copyFile(b, filepath.Join(dbDir, "db.sqlite"), filepath.Join(live, "db.sqlite"))
	db, err := sql.Open("sqlite", "file:"+filepath.Join(live, "db.sqlite")+"?_pragma=journal_mode(wal)&_pragma=wal_autocheckpoint(0)")
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	h := sha256.Sum256([]byte("wal"))
	if _, err := db.Exec("INSERT INTO ValidPaths (path, hash, registrationTime, narSize) VALUES (?, ?, 0, 1)",
		storePath(-1), "sha256:"+hex.EncodeToString(h[:])); err != nil {
		b.Fatal(err)
	}
	snap := b.TempDir()
	copyFile(b, filepath.Join(live, "db.sqlite"), filepath.Join(snap, "db.sqlite"))
	copyFile(b, filepath.Join(live, "db.sqlite-wal"), filepath.Join(snap, "db.sqlite-wal"))
	return snap
}

func copyFile(b *testing.B, src, dst string) {
	b.Helper()
	in, err := os.Open(src)
	if err != nil {
		b.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		b.Fatal(err)
	}
	if err := out.Close(); err != nil {
		b.Fatal(err)
	}
}

// cost is one step's median wall time and the median CPU time (user+sys)
// this process spent in it; on a shared machine the CPU time shows the
// work done, the wall time what it took with the load at hand.
type cost struct{ wall, cpu time.Duration }

func (c cost) add(d cost) cost { return cost{c.wall + d.wall, c.cpu + d.cpu} }

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func childCPUTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_CHILDREN, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// median runs f runs times and returns the median costs; cpu measures the
// CPU time (of this process, or of its children).
func median(b *testing.B, runs int, cpu func() time.Duration, f func() error) cost {
	b.Helper()
	var walls, cpus []time.Duration
	for i := 0; i < runs; i++ {
		c0, t0 := cpu(), time.Now()
		if err := f(); err != nil {
			b.Fatal(err)
		}
		walls = append(walls, time.Since(t0))
		cpus = append(cpus, cpu()-c0)
	}
	slices.Sort(walls)
	slices.Sort(cpus)
	return cost{walls[len(walls)/2], cpus[len(cpus)/2]}
}

func BenchmarkPublish(b *testing.B) {
	n := benchPaths(b)
	s := benchStore(b, n)
	ctx := context.Background()
	dbDir := filepath.Join(s.NixRoot(), "var", "nix", "db")
	storeDir := filepath.Join(s.NixRoot(), "store")
	walDir := walCopy(b, dbDir)
	const runs = 3

	for b.Loop() {
		var infos []nixstore.PathInfo
		readDB := median(b, runs, cpuTime, func() (err error) {
			infos, err = nixstore.ReadDB(ctx, dbDir)
			return err
		})
		if len(infos) != n {
			b.Fatalf("ReadDB: %d paths, want %d", len(infos), n)
		}
		readWAL := median(b, runs, cpuTime, func() error {
			got, err := nixstore.ReadDB(ctx, walDir)
			if err == nil && len(got) != n+1 {
				err = fmt.Errorf("ReadDB with WAL: %d paths, want %d", len(got), n+1)
			}
			return err
		})
		verify := median(b, runs, cpuTime, func() error { return nixstore.Verify(storeDir, "/nix/store", infos) })
		var reg bytes.Buffer
		write := median(b, runs, cpuTime, func() error { reg.Reset(); return nixstore.WriteRegistration(&reg, infos) })

		var dump []byte
		dumpDB := median(b, runs, childCPUTime, func() (err error) {
			cmd := s.Command("nix-store", "--dump-db")
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			if dump, err = cmd.Output(); err != nil {
				return fmt.Errorf("nix-store --dump-db: %w: %s", err, stderr.String())
			}
			return nil
		})
		if !bytes.Equal(dump, reg.Bytes()) {
			b.Fatalf("WriteRegistration(ReadDB) differs from nix-store --dump-db (%d vs %d bytes)", reg.Len(), len(dump))
		}
		parse := median(b, runs, cpuTime, func() error {
			_, err := nixstore.ParseRegistration(bytes.NewReader(dump))
			return err
		})

		rate := func(c cost) string {
			return fmt.Sprintf("%.3f s, %.0f paths/s (CPU %.3f s)", c.wall.Seconds(), float64(n)/c.wall.Seconds(), c.cpu.Seconds())
		}
		refs := 0
		for _, in := range infos {
			refs += len(in.References)
		}
		fmt.Printf("\npublish cost, %d paths, %d references, registration %d bytes (median of %d runs; load average %s)\n\n", n, refs, len(dump), runs, loadavg())
		fmt.Printf("| step | strata | nix-store --dump-db |\n|---|---|---|\n")
		fmt.Printf("| read registration | ReadDB %s | %s |\n", rate(readDB), rate(dumpDB))
		fmt.Printf("| read registration, WAL to replay | ReadDB %s | |\n", rate(readWAL))
		fmt.Printf("| verify (lstat every path, closure) | Verify %s | |\n", rate(verify))
		fmt.Printf("| publish = ReadDB + Verify | %s | |\n", rate(readDB.add(verify)))
		fmt.Printf("| publish with WAL = ReadDB + Verify | %s | |\n", rate(readWAL.add(verify)))
		fmt.Printf("| write registration text | WriteRegistration %s | |\n", rate(write))
		fmt.Printf("| parse registration text | ParseRegistration %s | |\n\n", rate(parse))
		goal := "met"
		if readWAL.wall+verify.wall > time.Second {
			goal = "NOT met"
		}
		fmt.Printf("goal ReadDB+Verify ≤ 1 s: %s\n", goal)

		b.ReportMetric((readDB.wall + verify.wall).Seconds(), "publish-s")
		b.ReportMetric((readWAL.wall + verify.wall).Seconds(), "publish-wal-s")
		b.ReportMetric((readWAL.cpu + verify.cpu).Seconds(), "publish-wal-cpu-s")
		b.ReportMetric(dumpDB.wall.Seconds(), "dumpdb-s")
	}
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	return strings.Join(strings.Fields(string(b))[:3], " ")
}
