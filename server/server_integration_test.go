//go:build integration

package server

import (
	"bytes"
	"context"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/apiserve"
	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/nixstore"
	"github.com/strata-nix/strata/snapshot/btrfs"
)

// central is a real central store: a btrfs subvolume <mnt>/nix on a loop
// device holding a chroot Nix store made with nix-bin.
type central struct {
	store nixtest.Store
	cfg   Config
}

func newCentral(t *testing.T) *central {
	t.Helper()
	mnt := testenv.LoopBtrfs(t, "1G")
	testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(mnt, "nix"))
	st := nixtest.New(t, mnt)
	cfg := Config{StoreRoot: st.NixRoot(), StoreDir: "/nix/store", Backend: "btrfs",
		SnapshotDir: filepath.Join(mnt, "snaps"), StateDir: filepath.Join(t.TempDir(), "state"), Keep: 10}
	if err := os.MkdirAll(cfg.SnapshotDir, 0o755); err != nil {
		t.Fatal(err)
	}
	return &central{store: st, cfg: cfg}
}

func (c *central) server(t *testing.T) *Server {
	t.Helper()
	b, err := btrfs.New(c.cfg.StoreRoot, c.cfg.SnapshotDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(context.Background(), Options{Config: c.cfg, Backend: b})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// apiCentral is a central store filled by nixtest (Fill) with two of its
// paths signed, a server on it that published generation 1, and the
// server's API over HTTP.
type apiCentral struct {
	*central
	made []string // Fill's paths; made[0] and made[3] are signed
	key  string   // the secret key that signed them
	srv  *Server
	g1   uint64
	url  string      // the API's base URL
	cl   *api.Client // a client of it without a token
}

func newAPICentral(t *testing.T) *apiCentral {
	t.Helper()
	c := newCentral(t)
	made := c.store.Fill(t)
	sk, _ := nixtest.GenerateKey(t, "central-1")
	c.store.Sign(t, sk, made[0], made[3])
	s := c.server(t)
	g1 := publish(t, s)
	hs := httptest.NewServer(s.Handler(apiserve.NewToken(""), nil, func() any { return nil }))
	t.Cleanup(hs.Close)
	return &apiCentral{central: c, made: made, key: sk, srv: s, g1: g1, url: hs.URL, cl: api.NewClient(hs.URL, "")}
}

func parse(t *testing.T, text []byte) map[string]nixstore.PathInfo {
	t.Helper()
	infos, err := nixstore.ParseRegistration(bytes.NewReader(text))
	if err != nil {
		t.Fatalf("parse registration: %v", err)
	}
	m := map[string]nixstore.PathInfo{}
	for _, in := range infos {
		m[in.Path] = in
	}
	return m
}

func sameRecords(t *testing.T, what string, got, want map[string]nixstore.PathInfo) {
	t.Helper()
	if len(got) != len(want) {
		t.Errorf("%s: %d records, want %d", what, len(got), len(want))
	}
	for p, w := range want {
		g, ok := got[p]
		if !ok {
			t.Errorf("%s: missing %s", what, p)
			continue
		}
		if !nixstore.Equal(g, w) {
			t.Errorf("%s: %s differs:\n got %+v\nwant %+v", what, p, g, w)
		}
	}
}

func publish(t *testing.T, s *Server) uint64 {
	t.Helper()
	res, err := s.Publish(context.Background())
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	if !res.Published {
		t.Fatalf("publish: nothing published: %s", res.Reason)
	}
	return res.Generation.ID
}

func TestPublishRegistrationEqualsDumpDB(t *testing.T) {
	c := newCentral(t)
	paths := c.store.Fill(t)
	s := c.server(t)
	id := publish(t, s)

	reg, err := s.Registration(id)
	if err != nil {
		t.Fatal(err)
	}
	want := parse(t, []byte(c.store.DumpDB(t)))
	got := parse(t, reg)
	sameRecords(t, "registration vs nix-store --dump-db", got, want)
	if len(got) < len(paths) {
		t.Fatalf("registration has %d paths, store has at least %d", len(got), len(paths))
	}
	var haveDeriver, haveRefs bool
	for _, in := range got {
		haveDeriver = haveDeriver || in.Deriver != ""
		haveRefs = haveRefs || (len(in.References) > 0 && in.References[0] != in.Path)
	}
	if !haveDeriver || !haveRefs {
		t.Fatalf("fixture lacks derivers (%v) or references (%v)", haveDeriver, haveRefs)
	}

	// Loading the registration into a fresh store and dumping it again
	// gives the same records.
	fresh := nixtest.New(t, filepath.Join(t.TempDir(), "fresh"))
	load := fresh.Command("nix-store", "--load-db")
	load.Stdin = bytes.NewReader(reg)
	// .drv files are read from disk during load: make the files visible.
	copyTree(t, filepath.Join(c.store.NixRoot(), "store"), filepath.Join(fresh.NixRoot(), "store"))
	if out, err := load.CombinedOutput(); err != nil {
		t.Fatalf("nix-store --load-db: %v\n%s", err, out)
	}
	sameRecords(t, "fresh store after --load-db", parse(t, []byte(fresh.DumpDB(t))), want)

	g, _ := s.Generation(id)
	if g.Paths != len(want) || g.RegistrationSHA256 == "" || g.Snapshot != "strata-1" || g.MountPath != "/gen/1" {
		t.Fatalf("manifest %+v", g)
	}
}

func copyTree(t *testing.T, from, to string) {
	t.Helper()
	if err := os.MkdirAll(to, 0o755); err != nil {
		t.Fatal(err)
	}
	testenv.Run(t, "cp", "-a", from+"/.", to+"/")
}

func TestImmutabilityAndDelta(t *testing.T) {
	c := newCentral(t)
	paths := c.store.Fill(t)
	s := c.server(t)
	g1 := publish(t, s)
	g, _ := s.Generation(g1)
	snap := filepath.Join(c.cfg.SnapshotDir, g.Snapshot)
	reg1, _ := s.Registration(g1)
	before := treeDigest(t, snap)

	added := c.store.AddText(t, "late-addition", "added after generation 1\n")
	removed := paths[2] // note-c: nothing refers to it
	c.store.Delete(t, removed)

	if after := treeDigest(t, snap); after != before {
		t.Fatalf("generation %d's files changed after publishing:\n%s", g1, diffLines(before, after))
	}
	if reg, _ := s.Registration(g1); !bytes.Equal(reg, reg1) {
		t.Fatal("generation 1's registration changed")
	}
	if _, err := os.Lstat(filepath.Join(snap, "store", filepath.Base(removed))); err != nil {
		t.Fatalf("deleted path vanished from generation 1: %v", err)
	}

	g2 := publish(t, s)
	d, err := s.Delta(g1, g2)
	if err != nil {
		t.Fatal(err)
	}
	addedPaths := parse(t, []byte(d.Added))
	if len(addedPaths) != 1 || addedPaths[added].Path != added {
		t.Fatalf("delta added %v, want exactly %s", keys(addedPaths), added)
	}
	if len(d.Removed) != 1 || d.Removed[0] != removed {
		t.Fatalf("delta removed %v, want exactly %s", d.Removed, removed)
	}
	if g2g, _ := s.Generation(g2); g2g.Parent != g1 {
		t.Fatalf("generation %d parent %d, want %d", g2, g2g.Parent, g1)
	}
}

func TestUnchangedStorePublishesNothing(t *testing.T) {
	c := newCentral(t)
	c.store.Fill(t)
	s := c.server(t)
	publish(t, s)
	res, err := s.Publish(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if res.Published {
		t.Fatalf("unchanged store published generation %d", res.Generation.ID)
	}
	if n := len(snapshots(t, c)); n != 1 {
		t.Fatalf("%d snapshots after an empty publish, want 1", n)
	}
}

func TestRetentionKeepsNewestAndPinned(t *testing.T) {
	c := newCentral(t)
	c.cfg.Keep = 2
	c.store.Fill(t)
	s := c.server(t)
	g1 := publish(t, s)
	if _, err := s.Pin(g1, "golden"); err != nil {
		t.Fatal(err)
	}
	var ids []uint64
	for i := range 3 {
		c.store.AddText(t, "retention-"+string(rune('a'+i)), "x\n")
		ids = append(ids, publish(t, s))
	}
	// Live: pinned g1 + the newest two. ids[0] (generation 2) is gone.
	var live []uint64
	for _, g := range s.Generations() {
		live = append(live, g.ID)
	}
	want := []uint64{g1, ids[1], ids[2]}
	if !equalIDs(live, want) {
		t.Fatalf("live generations %v, want %v", live, want)
	}
	if got := snapshots(t, c); !equalStrings(got, []string{"strata-1", "strata-3", "strata-4"}) {
		t.Fatalf("snapshots %v", got)
	}
	// Unpinning lets retention take generation 1.
	if _, err := s.Unpin(g1); err != nil {
		t.Fatal(err)
	}
	if _, ok := s.Generation(g1); ok {
		t.Fatal("unpinned generation 1 survived retention")
	}
	// Ids are never reused, across a restart too.
	s2 := c.server(t)
	c.store.AddText(t, "after-restart", "y\n")
	if id := publish(t, s2); id != 5 {
		t.Fatalf("next generation after restart is %d, want 5", id)
	}
}

func TestVerificationRejectsBrokenSnapshot(t *testing.T) {
	t.Run("missing path", func(t *testing.T) {
		c := newCentral(t)
		paths := c.store.Fill(t)
		s := c.server(t)
		// Remove a registered path's files behind Nix's back.
		victim := filepath.Join(c.store.NixRoot(), "store", filepath.Base(paths[1]))
		testenv.Run(t, "rm", "-rf", victim)
		_, err := s.Publish(context.Background())
		if err == nil || !strings.Contains(err.Error(), filepath.Base(paths[1])) {
			t.Fatalf("publish error %v, want one naming %s", err, paths[1])
		}
		assertNothingLive(t, c, s)
	})
	t.Run("unregistered reference", func(t *testing.T) {
		testenv.RequireCommands(t, "sqlite3")
		c := newCentral(t)
		paths := c.store.Fill(t)
		s := c.server(t)
		// paths[0] is referenced by the built output; drop its row with
		// foreign keys off, as a corrupt DB would.
		db := filepath.Join(DBDir(c.store.NixRoot()), "db.sqlite")
		out, err := exec.Command("sqlite3", db, "DELETE FROM ValidPaths WHERE path = '"+paths[0]+"';").CombinedOutput()
		if err != nil {
			t.Fatalf("sqlite3: %v %s", err, out)
		}
		_, err = s.Publish(context.Background())
		if err == nil || !strings.Contains(err.Error(), "not in ValidPaths") && !strings.Contains(err.Error(), "unregistered") {
			t.Fatalf("publish error %v, want an unregistered-reference error", err)
		}
		assertNothingLive(t, c, s)
	})
}

func assertNothingLive(t *testing.T, c *central, s *Server) {
	t.Helper()
	if gs := s.Generations(); len(gs) != 0 {
		t.Fatalf("generations live after a failed publish: %+v", gs)
	}
	if snaps := snapshots(t, c); len(snaps) != 0 {
		t.Fatalf("snapshots left after a failed publish: %v", snaps)
	}
	ents, _ := os.ReadDir(filepath.Join(c.cfg.StateDir, "generations"))
	if len(ents) != 0 {
		t.Fatalf("state left after a failed publish: %v", ents)
	}
}

func snapshots(t *testing.T, c *central) []string {
	t.Helper()
	ents, err := os.ReadDir(c.cfg.SnapshotDir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".labels") { // label changes beside a snapshot
			out = append(out, e.Name())
		}
	}
	return out
}

// treeDigest lists every entry under dir with its type, mode, size, link
// target and content.
func treeDigest(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		b.WriteString(rel + " " + fi.Mode().String())
		switch {
		case fi.Mode()&os.ModeSymlink != 0:
			l, _ := os.Readlink(p)
			b.WriteString(" -> " + l)
		case fi.Mode().IsRegular():
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			b.WriteString(" " + string(rune(len(data))) + string(data))
		}
		b.WriteString("\n")
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func diffLines(a, b string) string {
	am := map[string]bool{}
	for _, l := range strings.Split(a, "\n") {
		am[l] = true
	}
	var out []string
	for _, l := range strings.Split(b, "\n") {
		if !am[l] {
			out = append(out, "+ "+l)
		}
	}
	return strings.Join(out, "\n")
}

func keys(m map[string]nixstore.PathInfo) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func equalIDs(a, b []uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
