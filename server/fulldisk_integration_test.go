//go:build integration

package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/apiserve"
	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/snapshot/btrfs"
)

// A publish on a full disk, real btrfs and a real state dir on its own small
// tmpfs: (0) the central store's btrfs with its data space full publishes
// (a snapshot needs metadata only); (1) data and metadata full (btrfs
// takes the snapshot, but cannot rename it into place); (2) the state dir
// full (nothing can be reserved, and a pin is refused); (3) the state dir
// with room for the reservation but not for the registration. Each publish
// fails with an error that says "no space left on device" and names the
// file it could not write; the generations published before keep being
// served, unchanged, over NFS and the API; no snapshot, no half-written
// generation and no reservation stay; and once the space is free the next
// publish works without a restart. A restart afterwards reads the same
// state.
func TestPublishOnFullDisk(t *testing.T) {
	c := newCentral(t)
	c.store.Fill(t)
	stateMnt := t.TempDir()
	testenv.Run(t, "mount", "-t", "tmpfs", "-o", "size=8m", "strata-state", stateMnt)
	t.Cleanup(func() { testenv.Run(t, "umount", "-l", stateMnt) })
	c.cfg.StateDir = filepath.Join(stateMnt, "state")
	exp, nfsAddr := serveNFS(t, c.cfg.StateDir)
	b, err := btrfs.New(c.cfg.StoreRoot, c.cfg.SnapshotDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(context.Background(), Options{Config: c.cfg, Backend: b, Export: exp})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Shutdown)
	ts := httptest.NewServer(s.Handler(apiserve.NewToken(""), nil, func() any { return nil }))
	t.Cleanup(ts.Close)

	publish(t, s)
	c.store.AddText(t, "two", "2\n")
	publish(t, s)
	walks := map[uint64]string{}
	for _, id := range []uint64{1, 2} {
		walks[id] = exportWalk(t, nfsAddr, id)
	}

	// served checks that exactly want are live, listed by the API, and
	// that the ones published before the failures still read as they did.
	served := func(step string, want ...uint64) {
		t.Helper()
		if got := ids(s.Generations()); !slices.Equal(got, want) {
			t.Fatalf("%s: live generations %v, want %v", step, got, want)
		}
		resp, err := http.Get(ts.URL + "/v1/generations")
		if err != nil {
			t.Fatal(err)
		}
		var l api.GenerationList
		err = json.NewDecoder(resp.Body).Decode(&l)
		resp.Body.Close()
		if err != nil || !slices.Equal(ids(l.Generations), want) {
			t.Fatalf("%s: GET /v1/generations lists %v (%v), want %v", step, ids(l.Generations), err, want)
		}
		for id, w := range walks {
			if got := exportWalk(t, nfsAddr, id); got != w {
				t.Fatalf("%s: generation %d reads differently over NFS:\n%s\n--- was\n%s", step, id, got, w)
			}
		}
	}
	// clean checks that a failed publish left nothing: only want's
	// snapshots, a manifest that parses for each, no temp dirs, no
	// reservation.
	clean := func(step string, want ...uint64) {
		t.Helper()
		var snaps []string
		ents, _ := os.ReadDir(c.cfg.SnapshotDir)
		for _, e := range ents {
			if !strings.HasSuffix(e.Name(), ".labels") {
				snaps = append(snaps, e.Name())
			}
		}
		var wantSnaps []string
		for _, id := range want {
			wantSnaps = append(wantSnaps, fmt.Sprintf("strata-%d", id))
		}
		if !slices.Equal(snaps, wantSnaps) {
			t.Errorf("%s: snapshot dir holds %v, want %v", step, snaps, wantSnaps)
		}
		st := state{dir: c.cfg.StateDir}
		gs, err := st.generations()
		if err != nil || !slices.Equal(ids(gs), want) {
			t.Errorf("%s: state dir generations %v (%v), want %v", step, ids(gs), err, want)
		}
		if p, err := st.publishing(); p != 0 || err != nil {
			t.Errorf("%s: a reservation for generation %d stays (%v)", step, p, err)
		}
		filepath.WalkDir(c.cfg.StateDir, func(p string, d fs.DirEntry, err error) error {
			if strings.Contains(d.Name(), ".tmp") {
				t.Errorf("%s: %s left in the state dir", step, p)
			}
			return nil
		})
	}

	// (0) Its data space full, metadata not: a snapshot and its labels
	// need metadata only, so the publish works.
	c.store.AddText(t, "data-full", "d\n")
	free0 := testenv.Fill(t, filepath.Dir(c.cfg.SnapshotDir), 1)
	res, err := s.Publish(context.Background())
	if err != nil || !res.Published {
		t.Fatalf("publish with the snapshot filesystem's data space full: %+v %v", res, err)
	}
	free0()
	walks[res.Generation.ID] = exportWalk(t, nfsAddr, res.Generation.ID)

	// (1) The central store's filesystem full, data and metadata.
	c.store.AddText(t, "three", "3\n")
	free := testenv.Fill(t, filepath.Dir(c.cfg.SnapshotDir), 0)
	_, err = s.Publish(context.Background())
	t.Logf("publish with the snapshot filesystem full: %v", err)
	if err == nil || !strings.Contains(err.Error(), "no space left on device") || !strings.Contains(err.Error(), c.cfg.SnapshotDir) {
		t.Fatalf("publish with the snapshot filesystem full: %v, want an error naming %s and ENOSPC", err, c.cfg.SnapshotDir)
	}
	served("snapshot filesystem full", 1, 2, 3)
	clean("snapshot filesystem full", 1, 2, 3)
	free()
	g := publish(t, s)
	walks[g] = exportWalk(t, nfsAddr, g)
	if !strings.Contains(walks[g], "-three ") {
		t.Fatalf("generation %d lacks the path added before the failed publish:\n%s", g, walks[g])
	}
	live := []uint64{1, 2, 3, g}

	// (2) The state dir full: nothing can be reserved.
	c.store.AddText(t, "four", "4\n")
	before := treeSums(t, c.cfg.StateDir)
	free = testenv.Fill(t, c.cfg.StateDir, 0)
	_, err = s.Publish(context.Background())
	t.Logf("publish with the state dir full: %v", err)
	if err == nil || !strings.Contains(err.Error(), "no space left on device") || !strings.Contains(err.Error(), c.cfg.StateDir) {
		t.Fatalf("publish with the state dir full: %v, want an error naming %s and ENOSPC", err, c.cfg.StateDir)
	}
	served("state dir full", live...)
	clean("state dir full", live...)
	if _, err := s.Pin(1, "golden"); err == nil || !strings.Contains(err.Error(), "no space left on device") {
		t.Errorf("pin with the state dir full: %v, want ENOSPC", err)
	}
	if gen, _ := s.Generation(1); gen.Pinned {
		t.Errorf("a pin that could not be recorded shows generation 1 pinned")
	}
	free()
	if after := treeSums(t, c.cfg.StateDir); after != before {
		t.Errorf("a publish that failed on a full state dir changed it:\n%s\n--- was\n%s", after, before)
	}

	// (3) Room for the reservation, not for the registration and rows of
	// 2,000 more paths.
	c.store.AddMany(t, "many", 2000)
	free = testenv.Fill(t, c.cfg.StateDir, 64<<10)
	_, err = s.Publish(context.Background())
	t.Logf("publish with 64 KiB left in the state dir: %v", err)
	if err == nil || !strings.Contains(err.Error(), "no space left on device") || !strings.Contains(err.Error(), c.cfg.StateDir) {
		t.Fatalf("publish with 64 KiB left in the state dir: %v, want an error naming %s and ENOSPC", err, c.cfg.StateDir)
	}
	served("state dir nearly full", live...)
	clean("state dir nearly full", live...)
	free()
	g = publish(t, s)
	if gen, _ := s.Generation(g); gen.Paths < 2000 {
		t.Fatalf("generation %d has %d paths, want the 2,000 added", g, gen.Paths)
	}
	live = append(live, g)
	served("after the space was freed", live...)
	clean("after the space was freed", live...)

	// A restart reads the same state.
	sums := map[uint64]string{}
	for _, id := range live {
		sums[id] = regSHA(t, s, id)
	}
	s.Shutdown()
	b2, err := btrfs.New(c.cfg.StoreRoot, c.cfg.SnapshotDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	s2, err := New(context.Background(), Options{Config: c.cfg, Backend: b2})
	if err != nil {
		t.Fatalf("restart after the full-disk publishes: %v", err)
	}
	t.Cleanup(s2.Shutdown)
	if got := ids(s2.Generations()); !slices.Equal(got, live) {
		t.Fatalf("restarted server serves %v, want %v", got, live)
	}
	for _, id := range live {
		if got := regSHA(t, s2, id); got != sums[id] {
			t.Errorf("generation %d: registration sha256 %s after the restart, %s before", id, got, sums[id])
		}
	}
	c.store.AddText(t, "five", "5\n")
	if n := publish(t, s2); n != g+1 {
		t.Errorf("the publish after the restart is generation %d, want %d", n, g+1)
	}
}

// treeSums lists every file under dir with the sha256 of its content, one
// per line, sorted.
func treeSums(t *testing.T, dir string) string {
	t.Helper()
	var lines []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || strings.HasPrefix(d.Name(), ".testenv-fill-") {
			return err
		}
		if strings.Contains(p, "/.testenv-fill-") {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		sum := sha256.Sum256(b)
		lines = append(lines, strings.TrimPrefix(p, dir)+" "+hex.EncodeToString(sum[:]))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}
