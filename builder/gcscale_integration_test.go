//go:build integration

package builder

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
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
	byIndex := make([]string, n) // path i refers to path i/2
	for i := range infos {
		content := []byte(fmt.Sprintf("path %d\n", i))
		name := fmt.Sprintf("p%07d", i)
		p := textPath("/nix/store", name, content, nil)
		if err := writeStoreFile(filepath.Join(storeDir, filepath.Base(p)), content); err != nil {
			t.Fatal(err)
		}
		h, size := narOfFile(content)
		infos[i] = nixstore.PathInfo{Path: p, NarHash: h, NarSize: size}
		byIndex[i] = p
		if i > 0 {
			infos[i].References = []string{infos[i/2].Path}
		}
	}
	nixstore.Sort(infos)
	cfg := Config{StoreDir: storeDir, NixStateDir: filepath.Join(root, "nix", "var", "nix"), NixStore: root, NixBin: "nix-store",
		StateDir: filepath.Join(t.TempDir(), "state")}
	nix := NewNixStore(cfg, testLogger(t))
	a := &Agent{cfg: cfg, nix: nix, log: testLogger(t)}
	ctx := context.Background()
	began := time.Now()
	if _, _, msg, err := a.importRooted(ctx, 1, nixstore.RowsFromInfos(infos), true, nil); err != nil || msg != "" {
		t.Fatalf("import: %v %s", err, msg)
	}
	t.Logf("registering and rooting %d paths took %v", n, time.Since(began).Round(time.Millisecond))
	gc := func() string {
		began := time.Now()
		out, err := st.Command("nix-store", "--gc").CombinedOutput()
		if err != nil {
			t.Fatalf("nix-store --gc: %v %s", err, out)
		}
		t.Logf("nix-store --gc with the root took %v", time.Since(began).Round(time.Millisecond))
		return string(out)
	}
	if out := gc(); strings.Contains(out, "deleting '/nix/store/") {
		t.Fatalf("GC deleted rooted paths:\n%s", lastN(out, 10))
	}
	v, err := nix.CLI.Valid(ctx, pathsOf(infos))
	if err != nil || len(v) != n {
		t.Fatalf("%d of %d paths valid after GC (%v)", len(v), n, err)
	}

	// A rotation: 100 leaves (paths nothing refers to) leave the
	// generation, 100 new paths come. The root's row is renamed and only
	// those references change; GC then deletes exactly the leaves that
	// left, and keeps every other path, old and new.
	var left []string
	for i := n - 100; i < n; i++ {
		left = append(left, byIndex[i])
	}
	var added []nixstore.PathInfo
	for i := range 100 {
		content := []byte(fmt.Sprintf("new path %d\n", i))
		p := textPath("/nix/store", fmt.Sprintf("q%07d", i), content, nil)
		if err := writeStoreFile(filepath.Join(storeDir, filepath.Base(p)), content); err != nil {
			t.Fatal(err)
		}
		h, size := narOfFile(content)
		added = append(added, nixstore.PathInfo{Path: p, NarHash: h, NarSize: size, References: []string{byIndex[i]}})
	}
	nixstore.Sort(added)
	oldRoot, err := os.Readlink(cfg.gcRootLink())
	if err != nil {
		t.Fatal(err)
	}
	began = time.Now()
	if _, _, msg, err := a.importRooted(ctx, 2, nixstore.RowsFromInfos(added), false, left); err != nil || msg != "" {
		t.Fatalf("rotation import: %v %s", err, msg)
	}
	t.Logf("rotation: +100 -100 paths registered and rooted in %v", time.Since(began).Round(time.Millisecond))
	newRoot, err := os.Readlink(cfg.gcRootLink())
	if err != nil || newRoot == oldRoot || !strings.HasSuffix(newRoot, rootName(2)) {
		t.Fatalf("gc root link %q (%v), want generation 2's root instead of %s", newRoot, err, oldRoot)
	}
	if _, err := os.Lstat(filepath.Join(storeDir, filepath.Base(oldRoot))); err == nil {
		t.Errorf("old root file %s still there", oldRoot)
	}
	if refs, err := nix.References(ctx, newRoot); err != nil || len(refs) != n {
		t.Fatalf("new root has %d references (%v), want %d", len(refs), err, n)
	}
	out := gc()
	var deleted []string
	for _, l := range strings.Split(out, "\n") {
		if p, ok := strings.CutPrefix(l, "deleting '"); ok {
			if p = strings.TrimSuffix(p, "'"); !strings.HasSuffix(p, "/trash") && !strings.Contains(p, "/.links") {
				deleted = append(deleted, p)
			}
		}
	}
	slices.Sort(deleted)
	slices.Sort(left)
	wantDeleted := append(slices.Clone(left), oldRoot)
	slices.Sort(wantDeleted)
	if !slices.Equal(deleted, left) && !slices.Equal(deleted, wantDeleted) {
		t.Fatalf("GC after the rotation deleted %d paths, want exactly the %d that left:\n%s", len(deleted), len(left), lastN(out, 10))
	}
	all := append(without(pathsOf(infos), left), pathsOf(added)...)
	if v, err := nix.CLI.Valid(ctx, all); err != nil || len(v) != len(all) {
		t.Fatalf("%d of %d paths valid after GC (%v)", len(v), len(all), err)
	}
}

func lastN(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}
