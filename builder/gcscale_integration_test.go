//go:build integration

package builder

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/nixstore"
)

// The GC root of a large generation: a chroot store holds N valid paths
// (STRATA_GCROOT_PATHS, default 20,000); the agent roots them all with
// one root path and nix-store --gc of Nix 2.8 then deletes nothing of
// them (without a root it deletes them all: TestGarbageCollectionKeeps-
// Generations shows a path of a generation deleted once unrooted). It
// logs what rooting and collecting cost.
func TestGCRootAtScale(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommands(t, "nix-store")
	n := 20000
	if v, err := strconv.Atoi(os.Getenv("STRATA_GCROOT_PATHS")); err == nil && v > 0 {
		n = v
	}
	root := t.TempDir()
	testenv.Run(t, "mount", "-t", "tmpfs", "-o", "size=2g", "gcscale", root)
	t.Cleanup(func() { testenv.Run(t, "umount", "-l", root) })
	st := nixtest.Store{Root: root}
	storeDir := filepath.Join(root, "nix", "store")
	if err := os.MkdirAll(storeDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := st.Command("nix-store", "--dump-db").CombinedOutput(); err != nil { // creates the DB
		t.Fatalf("init db: %v %s", err, out)
	}
	// N single-file paths, path i referring to path i/2 (a tree, as
	// packages refer to libraries).
	infos := make([]nixstore.PathInfo, n)
	for i := range infos {
		content := []byte(fmt.Sprintf("path %d\n", i))
		name := fmt.Sprintf("p%07d", i)
		p := textPath("/nix/store", name, content, nil)
		if err := writeStoreFile(filepath.Join(storeDir, filepath.Base(p)), content); err != nil {
			t.Fatal(err)
		}
		h, size := narOfFile(content)
		infos[i] = nixstore.PathInfo{Path: p, NarHash: h, NarSize: size}
		if i > 0 {
			infos[i].References = []string{infos[i/2].Path}
		}
	}
	nixstore.Sort(infos)
	cfg := Config{StoreDir: storeDir, NixStateDir: filepath.Join(root, "nix", "var", "nix"), NixStore: root, NixBin: "nix-store",
		StateDir: filepath.Join(t.TempDir(), "state")}
	nix := NewNixStore(cfg, testLogger(t))
	began := time.Now()
	if _, err := nix.Load(context.Background(), nixstore.RowsFromInfos(infos)); err != nil {
		t.Fatal(err)
	}
	t.Logf("registered %d paths in %v", n, time.Since(began).Round(time.Millisecond))
	a := &Agent{cfg: cfg, nix: nix, log: testLogger(t)}
	began = time.Now()
	if err := a.rootGeneration(context.Background(), 1, pathsOf(infos)); err != nil {
		t.Fatal(err)
	}
	t.Logf("rooting %d paths took %v", n, time.Since(began).Round(time.Millisecond))
	began = time.Now()
	out, err := st.Command("nix-store", "--gc").CombinedOutput()
	if err != nil {
		t.Fatalf("nix-store --gc: %v %s", err, out)
	}
	t.Logf("nix-store --gc with the root took %v", time.Since(began).Round(time.Millisecond))
	if strings.Contains(string(out), "deleting '/nix/store/") {
		t.Fatalf("GC deleted rooted paths:\n%s", lastN(string(out), 10))
	}
	v, err := nix.CLI.Valid(context.Background(), pathsOf(infos))
	if err != nil || len(v) != n {
		t.Fatalf("%d of %d paths valid after GC (%v)", len(v), n, err)
	}
}

func lastN(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}
