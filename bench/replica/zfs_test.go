//go:build integration

package replica

import (
	"context"
	"fmt"
	"io"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/apiserve"
	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/phase"
	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/server"
	"github.com/strata-nix/strata/server/replica"
	"github.com/strata-nix/strata/snapshot/zfs"
)

// BenchmarkReplicateZFS is BenchmarkReplicate on OpenZFS: the primary's
// store is a dataset of the pool named by STRATA_TEST_ZPOOL and the replica
// receives into another (zfs send -i / zfs receive -s through the API);
// rsync copies between directories of a third. This host has no ZFS: the
// VM tier's BenchmarkReplicateZFSInVM (vm_test.go, tag vm) runs it in a
// guest with a pool; on the host it skips with STRATA_ZFS_IN_VM=1.
func BenchmarkReplicateZFS(b *testing.B) {
	pool := testenv.RequireZpool(b)
	testenv.RequireCommands(b, "rsync", "nix-store")
	n := benchPaths(b)
	ctx := context.Background()
	dir := b.TempDir()
	parent := fmt.Sprintf("%s/strata-bench-%d", pool, os.Getpid())
	root := filepath.Join(dir, "root")
	// compression=lz4 for every dataset (the primary's, the replica's,
	// rsync's); recordsize=16K for the primary's store, as README advises
	// operators: a new path changes a few 4 KiB pages all over db.sqlite,
	// and an incremental stream carries each changed record whole.
	testenv.Run(b, "zfs", "create", "-p", "-o", "mountpoint=none", "-o", "compression=lz4", parent)
	testenv.Run(b, "zfs", "create", "-o", "recordsize=16K", "-o", "mountpoint="+filepath.Join(root, "nix"), parent+"/primary")
	rdst := filepath.Join(dir, "rsync")
	testenv.Run(b, "zfs", "create", "-o", "mountpoint="+rdst, parent+"/rsync")
	pmount, rmount := filepath.Join(dir, "pgens"), filepath.Join(dir, "rgens")
	b.Cleanup(func() {
		for _, m := range []string{pmount, rmount} {
			ents, _ := os.ReadDir(m)
			for _, e := range ents {
				testenv.Run(b, "umount", filepath.Join(m, e.Name()))
			}
		}
		testenv.Run(b, "zfs", "destroy", "-r", "-f", parent)
	})

	st := nixtest.New(b, root)
	addPaths(b, st, "base", n)
	pcfg := server.Config{StoreRoot: st.NixRoot(), StoreDir: "/nix/store", Backend: "zfs", Dataset: parent + "/primary",
		MountDir: pmount, StateDir: filepath.Join(dir, "pstate"), Keep: 10}
	pzb, err := zfs.New(pcfg.Dataset, pmount, nil)
	if err != nil {
		b.Fatal(err)
	}
	pb := &timedZFS{Backend: pzb}
	prim, err := server.New(ctx, server.Options{Config: pcfg, Backend: pb})
	if err != nil {
		b.Fatal(err)
	}
	ts := httptest.NewServer(prim.Handler(apiserve.NewToken("bench"), nil, func() any { return nil }))
	defer ts.Close()
	publish := func() string {
		res, err := prim.Publish(ctx)
		if err != nil || !res.Published {
			b.Fatalf("publish: %v %+v", err, res)
		}
		snaps, err := pb.List(ctx)
		if err != nil {
			b.Fatal(err)
		}
		for _, s := range snaps {
			if s.ID == res.Generation.ID {
				return s.Path
			}
		}
		b.Fatalf("generation %d published but not listed", res.Generation.ID)
		return ""
	}
	gen1 := publish()

	rcfg := server.Config{ReplicaOf: ts.URL, StoreRoot: filepath.Join(dir, "none"), StoreDir: "/nix/store", Backend: "zfs",
		Dataset: parent + "/replica", MountDir: rmount, StateDir: filepath.Join(dir, "rstate"), Keep: 10}
	rb, err := zfs.NewReplica(rcfg.Dataset, rmount, nil)
	if err != nil {
		b.Fatal(err)
	}
	rs, err := server.New(ctx, server.Options{Config: rcfg, Backend: rb})
	if err != nil {
		b.Fatal(err)
	}
	p := replica.New(replica.Options{Primary: replica.Fixed(api.NewClient(ts.URL, "bench"), ts.URL), Backend: rb, Target: rs,
		StateDir: rcfg.StateDir, Registry: prometheus.NewRegistry()})
	first, err := p.Sync(ctx)
	if err != nil || len(first.Received) != 1 {
		b.Fatalf("first sync: %v %+v", err, first)
	}
	rsyncFullT, rsyncFullB := rsync(b, gen1, rdst)

	addPaths(b, st, "new", 1000)
	var gen2 string
	incr, rowsT, spans := syncIncremental(b, p, rs, prim, &pb.log, 2, func() { gen2 = publish() }, nil)
	rsyncT, rsyncB := rsync(b, gen2, rdst)
	g1, _ := rs.Generation(1)
	g2, _ := rs.Generation(2)
	printTable(b, table{setup: "OpenZFS datasets of one pool (lz4; the store recordsize=16K), same guest", tool: "zfs receive", g1: g1.Paths, g2: g2.Paths,
		full: first.Received[0], incr: incr, rows: rowsT, spans: spans, rsyncFull: rsyncFullT, rsyncFullBytes: rsyncFullB, rsync: rsyncT, rsyncBytes: rsyncB})
}

// timedZFS is timedBtrfs for the ZFS primary.
type timedZFS struct {
	*zfs.Backend
	log *phase.Log
}

func (t *timedZFS) Send(ctx context.Context, w io.Writer, id, from uint64) error {
	return timedSend(t.log, w, func(w io.Writer) error { return t.Backend.Send(ctx, w, id, from) }, "zfs send")
}
