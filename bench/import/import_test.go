//go:build integration

package importbench

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/apiserve"
	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/nixstore"
	"github.com/strata-nix/strata/server"
	"github.com/strata-nix/strata/snapshot/btrfs"
)

const nix32 = "0123456789abcdfghijklmnpqrsvwxyz"

func nixHash(seed string, n int) string {
	h := sha256.Sum256([]byte(seed))
	var sb strings.Builder
	for k := 0; k < n; k++ {
		sb.WriteByte(nix32[h[k%32]&31])
		if k%32 == 31 {
			h = sha256.Sum256(h[:])
		}
	}
	return sb.String()
}

func storePath(name string) string { return "/nix/store/" + nixHash(name, 32) + "-" + name }

// synth makes rows for paths [from, to) of a synthetic store, sorted;
// references point at paths below i (earlier generations included).
func synth(from, to int) *nixstore.Rows {
	r := rand.New(rand.NewPCG(uint64(from), uint64(to)))
	rs := &nixstore.Rows{Paths: make([]nixstore.Row, 0, to-from)}
	sig := make([]byte, 64)
	for i := from; i < to; i++ {
		name := "bench-" + strconv.Itoa(i)
		h := sha256.Sum256([]byte(name))
		row := nixstore.Row{PathInfo: nixstore.PathInfo{Path: storePath(name), NarHash: hex.EncodeToString(h[:]),
			NarSize: uint64(r.IntN(1 << 22))}, RegistrationTime: 1_700_000_000 + int64(i)}
		if i%2 == 0 {
			row.Deriver = storePath(name + ".drv")
		}
		if i%4 == 0 {
			// 52 base-32 digits carry 260 bits: the first holds the
			// top 1 bit of a SHA-256.
			row.CA = "fixed:r:sha256:" + "01"[i%2:i%2+1] + nixHash(name+"ca", 51)
		}
		for k := range sig {
			sig[k] = h[k%32] ^ byte(k)
		}
		row.Sigs = []string{"cache.example.org-1:" + base64.StdEncoding.EncodeToString(sig)}
		if i > 0 {
			seen := map[int]bool{}
			for k := r.IntN(9); k > 0; k-- {
				j := r.IntN(i)
				if !seen[j] {
					seen[j] = true
					row.References = append(row.References, storePath("bench-"+strconv.Itoa(j)))
				}
			}
		}
		rs.Paths = append(rs.Paths, row)
	}
	nixstore.SortRows(rs)
	return rs
}

func emptyStore(b *testing.B) nixtest.Store {
	b.Helper()
	return nixtest.New(b, filepath.Join(b.TempDir(), "root"))
}

func dbDir(s nixtest.Store) string { return filepath.Join(s.NixRoot(), "var", "nix", "db") }

// cost is a wall time and the CPU time (user + system) spent in it: the
// machine is shared, so wall times depend on the load; CPU times do not.
type cost struct{ wall, cpu time.Duration }

func (c cost) add(d cost) cost { return cost{c.wall + d.wall, c.cpu + d.cpu} }

func (c cost) String() string {
	return fmt.Sprintf("%.2f s (cpu %.2f s)", c.wall.Seconds(), c.cpu.Seconds())
}

func selfCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func measure(f func()) cost {
	runtime.GC()
	c0, t0 := selfCPU(), time.Now()
	f()
	return cost{time.Since(t0), selfCPU() - c0}
}

// root is generation gen's GC root as the agent registers it with the
// import: full on a cold import, else renamed from the previous one with
// only the new paths' references added.
func root(gen uint64) *nixstore.RootUpdate {
	name := "strata-generation-" + strconv.FormatUint(gen, 10)
	h := sha256.Sum256([]byte(name))
	u := &nixstore.RootUpdate{Path: storePath(name), NarHash: hex.EncodeToString(h[:]), NarSize: 128, Full: gen == 1}
	if gen > 1 {
		u.Prev = storePath("strata-generation-" + strconv.FormatUint(gen-1, 10))
	}
	return u
}

// strataImport decodes a rows file and imports it with its GC root (none
// when root is nil), costing both.
func strataImport(b *testing.B, s nixtest.Store, file []byte, root *nixstore.RootUpdate) (decode, imp cost, n int) {
	b.Helper()
	var rs *nixstore.Rows
	decode = measure(func() {
		var err error
		if _, rs, err = nixstore.ReadRows(bytes.NewReader(file)); err != nil {
			b.Fatal(err)
		}
	})
	imp = measure(func() {
		res, err := nixstore.ImportDB(context.Background(), dbDir(s), rs, root)
		if err != nil {
			b.Fatal(err)
		}
		n = res.Imported
	})
	return decode, imp, n
}

func loadDB(b *testing.B, s nixtest.Store, infos []nixstore.PathInfo) cost {
	b.Helper()
	var reg bytes.Buffer
	if err := nixstore.WriteRegistration(&reg, infos); err != nil {
		b.Fatal(err)
	}
	cmd := s.Command("nix-store", "--load-db")
	cmd.Stdin = &reg
	t0 := time.Now()
	if out, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("nix-store --load-db: %v\n%s", err, out)
	}
	return cost{time.Since(t0), cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()}
}

func rowsFile(b *testing.B, rs *nixstore.Rows, gen, from uint64) []byte {
	b.Helper()
	var buf bytes.Buffer
	if err := nixstore.WriteRows(&buf, nixstore.RowsHeader{StoreDir: "/nix/store", Generation: gen, From: from}, rs); err != nil {
		b.Fatal(err)
	}
	return buf.Bytes()
}

func gzLen(p []byte) int {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(p)
	zw.Close()
	return buf.Len()
}

func sizes(b *testing.B) []int {
	s := os.Getenv("STRATA_BENCH_SIZES")
	if s == "" {
		s = "100000,1000000"
	}
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 2000 {
			b.Fatalf("STRATA_BENCH_SIZES=%q: want sizes ≥ 2000", s)
		}
		out = append(out, n)
	}
	return out
}

// centralServer is a strata server on a btrfs central store whose Nix DB
// is a copy of the one in dbFrom (a store holding the generation's rows)
// and whose store dir holds an empty file per path (publish checks that
// every registered path exists), with one generation published and its
// API on a TCP port of the loopback.
type centralServer struct {
	srv *server.Server
	api string
	gen uint64
}

func newCentral(b *testing.B, dbFrom string, rs *nixstore.Rows) centralServer {
	b.Helper()
	mnt := testenv.LoopBtrfs(b, fmt.Sprintf("%dM", 1024+len(rs.Paths)/200))
	testenv.Run(b, "btrfs", "subvolume", "create", filepath.Join(mnt, "nix"))
	db := filepath.Join(mnt, "nix", "var", "nix", "db")
	store := filepath.Join(mnt, "nix", "store")
	for _, d := range []string{db, store, filepath.Join(mnt, "snaps")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			b.Fatal(err)
		}
	}
	for _, f := range []string{"db.sqlite", "db.sqlite-wal", "schema"} {
		in, err := os.ReadFile(filepath.Join(dbFrom, f))
		if err != nil && f == "db.sqlite-wal" {
			continue
		}
		if err != nil {
			b.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(db, f), in, 0o644); err != nil {
			b.Fatal(err)
		}
	}
	for _, r := range rs.Paths {
		if err := os.WriteFile(filepath.Join(store, filepath.Base(r.Path)), nil, 0o444); err != nil {
			b.Fatal(err)
		}
	}
	bk, err := btrfs.New(filepath.Join(mnt, "nix"), filepath.Join(mnt, "snaps"), nil)
	if err != nil {
		b.Fatal(err)
	}
	srv, err := server.New(context.Background(), server.Options{Backend: bk, Config: server.Config{StoreRoot: filepath.Join(mnt, "nix"),
		StoreDir: "/nix/store", Backend: "btrfs", SnapshotDir: filepath.Join(mnt, "snaps"), StateDir: filepath.Join(b.TempDir(), "server"), Keep: 10}})
	if err != nil {
		b.Fatal(err)
	}
	res, err := srv.Publish(context.Background())
	if err != nil || !res.Published {
		b.Fatalf("publish: %v %+v", err, res)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	hs := &http.Server{Handler: srv.Handler(apiserve.NewToken(""), nil, func() any { return nil })}
	go hs.Serve(l)
	b.Cleanup(func() { hs.Close() })
	return centralServer{srv: srv, api: "http://" + l.Addr().String(), gen: res.Generation.ID}
}

// installGenerationDB is what an empty builder's first start does to get
// a usable Nix DB (builder/installdb.go): check its DB is empty, write the
// root file, ask the server for the generation list (the path count) and
// the generation's DB, download, check and install it
// (nixstore.InstallDB), point the GC root link at the root. It returns
// the compressed bytes received.
func installGenerationDB(b *testing.B, s nixtest.Store, c centralServer) int64 {
	b.Helper()
	ctx := context.Background()
	if empty, err := nixstore.DBEmpty(ctx, dbDir(s)); err != nil || !empty {
		b.Fatalf("builder db empty: %v %v", empty, err)
	}
	root := nixstore.RootOf("/nix/store", c.gen)
	store := filepath.Join(s.NixRoot(), "store")
	if err := os.WriteFile(filepath.Join(store, filepath.Base(root.Path)), root.Content, 0o444); err != nil {
		b.Fatal(err)
	}
	cl := api.NewClient(c.api, "")
	l, err := cl.Generations(ctx)
	if err != nil || len(l.Generations) != 1 {
		b.Fatalf("generations: %v %+v", err, l)
	}
	body, d, err := cl.NixDB(ctx, c.gen)
	if err != nil {
		b.Fatal(err)
	}
	defer body.Close()
	if d.Root != root.Path || d.Paths != l.Generations[0].Paths+1 {
		b.Fatalf("nix db %+v, generation %+v", d, l.Generations[0])
	}
	t0, last, steps := time.Now(), "fetch", []string{}
	step := func(s string) error {
		steps = append(steps, fmt.Sprintf("%s %.2f", last, time.Since(t0).Seconds()))
		t0, last = time.Now(), s
		return nil
	}
	if err := nixstore.InstallDB(ctx, dbDir(s), body, nixstore.DBFile{SHA256: d.SHA256, Size: d.Size, Paths: d.Paths,
		Schema: d.Schema, Root: d.Root}, nixstore.InstallOptions{Step: step}); err != nil {
		b.Fatal(err)
	}
	b.Logf("install steps (s, wall): %s", strings.Join(steps, ", "))
	link := filepath.Join(s.NixRoot(), "var", "nix", "gcroots", "strata")
	if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
		b.Fatal(err)
	}
	if err := os.Symlink(root.Path, link); err != nil {
		b.Fatal(err)
	}
	return d.Compressed
}

func BenchmarkImport(b *testing.B) {
	testenv.RequireRoot(b)
	testenv.RequireCommands(b, "nix-store")
	const rotation = 1000
	type line struct{ what, strata, peer, ratio string }
	var lines []line
	var bytesLines []string
	var loadDB100k cost
	for _, n := range sizes(b) {
		rs := synth(0, n)
		file := rowsFile(b, rs, 1, 0)
		var reg bytes.Buffer
		nixstore.WriteRegistration(&reg, rs.Infos())
		refs := 0
		for _, r := range rs.Paths {
			refs += len(r.References)
		}
		bytesLines = append(bytesLines, fmt.Sprintf("%d paths (%.1f refs/path, all signed):\trows.jsonl.gz %.0f B/path\tregistration %.0f B/path\tregistration gzip %.0f B/path",
			n, float64(refs)/float64(n), float64(len(file))/float64(n), float64(reg.Len())/float64(n), float64(gzLen(reg.Bytes()))/float64(n)))

		// Cold: strata.
		s := emptyStore(b)
		dec, imp, got := strataImport(b, s, file, root(1))
		if got != n {
			b.Fatalf("imported %d of %d", got, n)
		}
		cold := dec.add(imp)
		// Cold: nix-store --load-db, measured at 100k (and 1M on request).
		var peer cost
		peerLabel := "-"
		if n <= 100_000 || os.Getenv("STRATA_BENCH_LOADDB_1M") == "1" {
			peer = loadDB(b, emptyStore(b), rs.Infos())
			if n == 100_000 {
				loadDB100k = peer
			}
			peerLabel = peer.String()
		} else if loadDB100k.wall > 0 {
			k := time.Duration(n / 100_000)
			peer = cost{loadDB100k.wall * k, loadDB100k.cpu * k}
			peerLabel = peer.String() + " EXTRAPOLATED (" + strconv.Itoa(n/100_000) + " × the 100,000 run)"
		}
		dec0, imp0 := dec, imp
		b.Logf("cold import, %d paths (rows): strata %s; load-db %s; %s", n, cold, peerLabel, ratio(peer, cold))

		// Rotation: 1,000 new paths (referring to old ones) into the store
		// holding n; the peer loads the same 1,000 into a store that holds
		// the same n (made with strata's import: load-db makes the same DB).
		delta := synth(n, n+rotation)
		dfile := rowsFile(b, delta, 2, 1)
		dec, imp, got = strataImport(b, s, dfile, root(2))
		if got != rotation {
			b.Fatalf("rotation imported %d of %d", got, rotation)
		}
		rot := dec.add(imp)
		dec1, imp1 := dec, imp
		peerStore := emptyStore(b)
		if _, _, got := strataImport(b, peerStore, file, nil); got != n {
			b.Fatal("peer store import")
		}

		// Cold: the generation's Nix DB from a real strata server (its
		// central store holds the same n paths), installed into an empty
		// store. The server makes the DB once per generation, on the
		// first request; that is timed apart (make), not in the cold row.
		central := newCentral(b, dbDir(peerStore), rs)
		var made api.NixDB
		mk := measure(func() {
			var err error
			if _, made, err = central.srv.NixDB(central.gen); err != nil {
				b.Fatal(err)
			}
		})
		gs := emptyStore(b)
		var got64 int64
		inst := measure(func() { got64 = installGenerationDB(b, gs, central) })
		lines = append(lines, line{fmt.Sprintf("cold, %d paths: generation DB", n),
			fmt.Sprintf("%s (server made it once: %s)", inst, mk), peerLabel, ratio(peer, inst)})
		b.Logf("%s: strata %s; load-db %s; %s", lines[len(lines)-1].what, lines[len(lines)-1].strata, peerLabel, ratio(peer, inst))
		lines = append(lines, line{fmt.Sprintf("cold, %d paths: rows (previous)", n),
			fmt.Sprintf("%s = decode %s + import %s", cold, dec0, imp0), peerLabel, ratio(peer, cold)})
		bytesLines = append(bytesLines, fmt.Sprintf("%d paths:\tgeneration DB %.0f B/path zstd (%.0f B/path as SQLite)", n,
			float64(got64)/float64(n), float64(made.Size)/float64(n)))
		gpi := gs.PathInfos(b, rs.Paths[n/2].Path)[rs.Paths[n/2].Path]
		if len(gpi.Signatures) != 1 || gpi.RegistrationTime != rs.Paths[n/2].RegistrationTime {
			b.Fatalf("installed DB: %s %+v", rs.Paths[n/2].Path, gpi)
		}
		// Rotation on the installed DB: the same 1,000 rows, the root
		// renamed from the generation DB's.
		gr1 := nixstore.RootOf("/nix/store", central.gen)
		gr2 := nixstore.RootOf("/nix/store", central.gen+1)
		dec, imp, got = strataImport(b, gs, dfile, &nixstore.RootUpdate{Path: gr2.Path, NarHash: gr2.NarHash, NarSize: gr2.NarSize, Prev: gr1.Path})
		if got != rotation {
			b.Fatalf("rotation on the installed DB imported %d of %d", got, rotation)
		}
		if refs := strings.Count(gs.Run(b, "nix-store", "--query", "--references", gr2.Path), "\n") + 1; refs != n+rotation {
			b.Fatalf("installed DB: root refers to %d paths after rotation, want %d", refs, n+rotation)
		}
		grot := dec.add(imp)

		rpeer := loadDB(b, peerStore, delta.Infos())
		lines = append(lines, line{fmt.Sprintf("rotation, +%d paths on %d (generation DB)", rotation, n),
			fmt.Sprintf("%s = decode %s + import %s", grot, dec, imp), rpeer.String(), ratio(rpeer, grot)})
		lines = append(lines, line{fmt.Sprintf("rotation, +%d paths on %d (rows)", rotation, n),
			fmt.Sprintf("%s = decode %s + import %s", rot, dec1, imp1), rpeer.String(), ratio(rpeer, rot)})
		b.Logf("%s: strata %s; load-db %s; %s", lines[len(lines)-1].what, lines[len(lines)-1].strata, rpeer, ratio(rpeer, rot))
		// Check what Nix sees: the imported store verifies and the
		// delta's paths are valid with their signatures.
		p := delta.Paths[0].Path
		if out := s.Run(b, "nix-store", "--check-validity", "--print-invalid", p); out != "" {
			b.Fatalf("%s not valid after rotation import", p)
		}
		if pi := s.PathInfos(b, p)[p]; len(pi.Signatures) != 1 {
			b.Fatalf("%s: signatures %v after import", p, pi.Signatures)
		}
		// The GC root: renamed, referring to every path of both.
		r1, r2 := root(1).Path, root(2).Path
		if out := s.Run(b, "nix-store", "--check-validity", "--print-invalid", r1, r2); out != r1 {
			b.Fatalf("invalid of roots %s, %s: %q, want only the first", r1, r2, out)
		}
		if refs := strings.Count(s.Run(b, "nix-store", "--query", "--references", r2), "\n") + 1; refs != n+rotation {
			b.Fatalf("root refers to %d paths, want %d", refs, n+rotation)
		}
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	load, _ := os.ReadFile("/proc/loadavg")
	fmt.Fprintf(tw, "\nbuilder import (host, %s, nix-bin %s, %d CPUs, load average %s)\t\t\t\n", time.Now().UTC().Format("2006-01-02 15:04"),
		nixVersion(b), runtime.NumCPU(), strings.Join(strings.Fields(string(load))[:3], " "))
	fmt.Fprintf(tw, "case\tstrata (with the GC root)\tnix-store --load-db\tspeed-up\n")
	for _, l := range lines {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", l.what, l.strata, l.peer, l.ratio)
	}
	tw.Flush()
	tw = tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\nbytes sent per path")
	for _, l := range bytesLines {
		fmt.Fprintln(tw, l)
	}
	tw.Flush()
}

// ratio is peer/strata in wall and CPU time.
func ratio(peer, strata cost) string {
	if peer.wall == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f× (cpu %.0f×)", peer.wall.Seconds()/strata.wall.Seconds(), peer.cpu.Seconds()/strata.cpu.Seconds())
}

func nixVersion(b *testing.B) string {
	s := nixtest.Store{Root: b.TempDir()}
	return s.Version(b)
}
