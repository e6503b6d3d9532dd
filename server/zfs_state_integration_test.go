//go:build integration

package server

import (
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/snapshot"
	"github.com/strata-nix/strata/snapshot/zfs"
)

func zfsSnapshots(t *testing.T, dataset string) []string {
	t.Helper()
	out, err := exec.Command("zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-d", "1", dataset).Output()
	if err != nil {
		t.Fatalf("zfs list: %v", err)
	}
	var names []string
	for _, l := range strings.Fields(string(out)) {
		names = append(names, strings.TrimPrefix(l, dataset+"@"))
	}
	slices.Sort(names)
	return names
}

// TestZFSStateRebuiltFromProperties is issue 13 on a real OpenZFS pool:
// three generations (one pinned) published through the ZFS backend carry
// their identity as strata:* user properties; a server with an empty state
// dir rebuilds the same manifests, registrations and pin from them and
// destroys nothing; an unfinished publish reserved in the state is the only
// snapshot a start destroys, while another state's unfinished publish and a
// snapshot without labels are kept.
func TestZFSStateRebuiltFromProperties(t *testing.T) {
	pool := testenv.RequireZpool(t)
	testenv.RequireCommands(t, "nix-store")
	dir := t.TempDir()
	dataset := fmt.Sprintf("%s/strata-state-%d", pool, os.Getpid())
	root := filepath.Join(dir, "root")
	testenv.Run(t, "zfs", "create", "-p", "-o", "mountpoint="+filepath.Join(root, "nix"), dataset)
	mountDir := filepath.Join(dir, "gens")
	t.Cleanup(func() {
		entries, _ := os.ReadDir(mountDir)
		for _, e := range entries {
			_ = exec.Command("umount", filepath.Join(mountDir, e.Name())).Run()
		}
		if out, err := exec.Command("zfs", "destroy", "-r", "-f", dataset).CombinedOutput(); err != nil {
			t.Errorf("zfs destroy -r %s: %v %s", dataset, err, out)
		}
	})
	st := nixtest.New(t, root)
	st.AddTree(t, "tool-a", map[string]string{"bin/run*": "#!/bin/sh\necho a\n", "lib": "->bin"})
	cfg := Config{StoreRoot: st.NixRoot(), StoreDir: "/nix/store", Backend: "zfs", Dataset: dataset,
		MountDir: mountDir, StateDir: filepath.Join(dir, "state1"), Keep: 10}
	open := func(cfg Config) *Server {
		t.Helper()
		b, err := zfs.New(dataset, mountDir, nil)
		if err != nil {
			t.Fatal(err)
		}
		s, err := New(context.Background(), Options{Config: cfg, Backend: b})
		if err != nil {
			t.Fatalf("New: %v", err)
		}
		return s
	}
	ctx := context.Background()
	s := open(cfg)
	for i := range 3 {
		if i > 0 {
			st.AddText(t, fmt.Sprintf("note-%d", i), "note\n")
		}
		if res, err := s.Publish(ctx); err != nil || !res.Published {
			t.Fatalf("publish %d: %+v %v", i+1, res, err)
		}
	}
	if _, err := s.Pin(2, "golden"); err != nil {
		t.Fatal(err)
	}
	before := s.Generations()
	regs := map[uint64][32]byte{}
	for _, g := range before {
		b, err := s.Registration(g.ID)
		if err != nil {
			t.Fatal(err)
		}
		regs[g.ID] = sha256.Sum256(b)
	}
	out, err := exec.Command("zfs", "get", "-H", "-o", "value", "strata:state,strata:generation,strata:pinned,strata:pin_name", dataset+"@strata-2").Output()
	if err != nil || strings.Join(strings.Fields(string(out)), " ") != "live 2 true golden" {
		t.Errorf("user properties of strata-2: %q, %v; want live 2 true golden", out, err)
	}

	// Crash leftovers: strata-4 is the state's own unfinished publish;
	// strata-5 another state dir's; strata-6 has no labels at all.
	b, err := zfs.New(dataset, mountDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	for id, l := range map[uint64]snapshot.Labels{
		4: {labelGeneration: "4", labelState: "publishing"},
		5: {labelGeneration: "5", labelState: "publishing"},
		6: nil,
	} {
		if _, err := b.Create(ctx, id, l); err != nil {
			t.Fatal(err)
		}
	}
	fresh := cfg
	fresh.StateDir = filepath.Join(dir, "state2")
	if err := os.MkdirAll(fresh.StateDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := (state{dir: fresh.StateDir}).setPublishing(4); err != nil {
		t.Fatal(err)
	}

	s2 := open(fresh)
	after := s2.Generations()
	if len(after) != len(before) {
		t.Fatalf("rebuilt generations %v, want %v", after, before)
	}
	for i := range before {
		w, g := before[i], after[i]
		if !g.Created.Equal(w.Created) {
			t.Errorf("generation %d created %v, want %v", w.ID, g.Created, w.Created)
		}
		g.Created = w.Created
		if g != w {
			t.Errorf("generation %d rebuilt as\n %+v\nwant %+v", w.ID, g, w)
		}
		b, err := s2.Registration(w.ID)
		if err != nil || sha256.Sum256(b) != regs[w.ID] {
			t.Errorf("generation %d: registration differs after the rebuild (%v)", w.ID, err)
		}
	}
	if got, want := zfsSnapshots(t, dataset), []string{"strata-1", "strata-2", "strata-3", "strata-5", "strata-6"}; !slices.Equal(got, want) {
		t.Errorf("snapshots after the rebuild %v, want %v (only strata-4 destroyed)", got, want)
	}
	if p := strings.Join(s2.Problems(), "\n"); !strings.Contains(p, "strata-5") || !strings.Contains(p, "strata-6") {
		t.Errorf("problems %q, want strata-5 and strata-6 reported", p)
	}
	st.AddText(t, "after-rebuild", "x\n")
	res, err := s2.Publish(ctx)
	if err != nil || !res.Published || res.Generation.ID != 7 {
		t.Errorf("publish after rebuild: %+v %v; want generation 7", res, err)
	}
}
