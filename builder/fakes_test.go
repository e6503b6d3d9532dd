package builder

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/strata-nix/strata/mountinfo"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/nixstore"
	"github.com/strata-nix/strata/overlay"

	"golang.org/x/sys/unix"
)

// fakeMounter keeps a mount table in memory with the kernel's parent
// links, so overlay.TopMount works on it as on the real one.
type fakeMounter struct {
	mu       sync.Mutex
	mounts   []mountinfo.Mount
	next     int
	failGen  error
	failSwap error
	// failAfterSwitch is returned by Swap after it switched.
	failAfterSwitch error
	// noMetacopy: overlays with metacopy=on fail with EINVAL, as on a
	// kernel or lower that refuses it.
	noMetacopy bool
	calls      []string
}

func newFakeMounter() *fakeMounter {
	return &fakeMounter{next: 100, mounts: []mountinfo.Mount{{ID: 1, ParentID: 0, Mountpoint: "/", FSType: "ext4", Source: "/dev/root"}}}
}

func (f *fakeMounter) add(target, fstype, source, opts string) mountinfo.Mount {
	parent := 1
	if t, ok := mountinfo.Top(f.mounts, target); ok {
		parent = t.ID
	}
	f.next++
	m := mountinfo.Mount{ID: f.next, ParentID: parent, Mountpoint: filepath.Clean(target), FSType: fstype, Source: source, SuperOptions: opts}
	f.mounts = append(f.mounts, m)
	return m
}

func (f *fakeMounter) MountGeneration(_ context.Context, nfs string, gen uint64, dir string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, fmt.Sprintf("mountgen %d", gen))
	if f.failGen != nil {
		return f.failGen
	}
	f.add(dir, "nfs", fmt.Sprintf("%s:/gen/%d", nfs, gen), "ro")
	return nil
}

// ForceUnmount removes the top mount at target, as MNT_FORCE|MNT_DETACH.
func (f *fakeMounter) ForceUnmount(_ context.Context, target string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "forceunmount "+target)
	return f.detach(target)
}

func (f *fakeMounter) MountOverlay(_ context.Context, target string, l overlay.Layers) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "overlay "+l.String())
	if f.noMetacopy && l.Metacopy {
		return fmt.Errorf("create overlay: %w", unix.EINVAL)
	}
	f.add(target, "overlay", overlay.Source, "rw,"+l.String())
	return nil
}

// Swap mounts the new overlay beneath the top one and detaches the top,
// as MOVE_MOUNT_BENEATH does. failSwap fails before anything changes;
// failAfterSwitch fails after the switch, as a failed read-back or staging
// cleanup does.
func (f *fakeMounter) Swap(_ context.Context, target string, l overlay.Layers) (overlay.SwapResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "swap "+l.String())
	if f.noMetacopy && l.Metacopy {
		return overlay.SwapResult{}, fmt.Errorf("create overlay: %w", unix.EINVAL)
	}
	if f.failSwap != nil {
		return overlay.SwapResult{}, f.failSwap
	}
	if err := f.beneath(target, l); err != nil {
		return overlay.SwapResult{}, err
	}
	if err := f.detach(target); err != nil {
		return overlay.SwapResult{Method: overlay.MethodBeneath}, err
	}
	res := overlay.SwapResult{Method: overlay.MethodBeneath, Switched: true}
	return res, f.failAfterSwitch
}

// BindLocal records a bind mount of the store dir at dir.
func (f *fakeMounter) BindLocal(_ context.Context, storeDir, dir string, _ func(mountinfo.Mount) bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "bindlocal "+dir)
	f.add(dir, "ext4", "/dev/root", "rw")
	return nil
}

func (f *fakeMounter) beneath(target string, l overlay.Layers) error {
	top, ok := mountinfo.Top(f.mounts, target)
	if !ok {
		return errors.New("nothing mounted")
	}
	f.next++
	m := mountinfo.Mount{ID: f.next, ParentID: top.ParentID, Mountpoint: top.Mountpoint, FSType: "overlay",
		Source: overlay.Source, SuperOptions: "rw," + l.String()}
	for i := range f.mounts {
		if f.mounts[i].ID == top.ID {
			f.mounts[i].ParentID = m.ID
		}
	}
	f.mounts = append(f.mounts, m)
	return nil
}

func (f *fakeMounter) Detach(_ context.Context, target string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "detach "+target)
	return f.detach(target)
}

func (f *fakeMounter) detach(target string) error {
	top, ok := mountinfo.Top(f.mounts, target)
	if !ok {
		return fmt.Errorf("detach %s: not mounted", target)
	}
	f.mounts = slices.DeleteFunc(f.mounts, func(m mountinfo.Mount) bool { return m.ID == top.ID })
	for i := range f.mounts {
		if f.mounts[i].ParentID == top.ID {
			f.mounts[i].ParentID = top.ParentID
		}
	}
	return nil
}

func (f *fakeMounter) Mounts() ([]mountinfo.Mount, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.mounts), nil
}

// fakeNix is a local Nix DB in memory.
type fakeNix struct {
	mu       sync.Mutex
	valid    map[string]nixstore.PathInfo
	rows     map[string]nixstore.Row // as loaded, with signatures
	loads    int
	failLoad error
}

func newFakeNix() *fakeNix {
	return &fakeNix{valid: map[string]nixstore.PathInfo{}, rows: map[string]nixstore.Row{}}
}

func (n *fakeNix) Load(_ context.Context, rows *nixstore.Rows, root *nixstore.RootUpdate) (int, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.failLoad != nil {
		return 0, n.failLoad
	}
	c := 0
	for _, r := range rows.Paths {
		if _, ok := n.valid[r.Path]; !ok {
			n.valid[r.Path] = r.PathInfo
			n.rows[r.Path] = r
			c++
		}
	}
	n.loads++
	if root != nil {
		// As nixstore.ImportDB: rename the previous root, then full or
		// delta references.
		in, ok := n.valid[root.Path]
		if prev, pok := n.valid[root.Prev]; !ok && pok && root.Prev != "" {
			in = prev
			delete(n.valid, root.Prev)
		}
		in.Path, in.NarHash, in.NarSize = root.Path, root.NarHash, root.NarSize
		refs := slices.DeleteFunc(slices.Clone(in.References), func(p string) bool { return slices.Contains(root.Remove, p) })
		if root.Full {
			refs = nil
		}
		for _, r := range rows.Paths {
			refs = append(refs, r.Path)
		}
		slices.Sort(refs)
		in.References = slices.Compact(refs)
		n.valid[root.Path] = in
	}
	return c, nil
}

func (n *fakeNix) Referrers(_ context.Context, paths []string) (map[string]bool, map[string][]string, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	valid, refs := map[string]bool{}, map[string][]string{}
	for _, p := range paths {
		if _, ok := n.valid[p]; !ok {
			continue
		}
		valid[p] = true
		for q, in := range n.valid {
			if q != p && slices.Contains(in.References, p) {
				refs[p] = append(refs[p], q)
			}
		}
		sort.Strings(refs[p])
	}
	return valid, refs, nil
}

func (n *fakeNix) Invalidate(_ context.Context, paths []string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, p := range paths {
		for q, in := range n.valid {
			if q != p && !slices.Contains(paths, q) && slices.Contains(in.References, p) && !strings.Contains(q, "-strata-generation-") {
				return fmt.Errorf("invalidate %s: referred to by %s", p, q)
			}
		}
	}
	for _, p := range paths {
		delete(n.valid, p)
	}
	// A generation root's references to them go with them.
	for q, in := range n.valid {
		if strings.Contains(q, "-strata-generation-") {
			in.References = slices.DeleteFunc(slices.Clone(in.References), func(r string) bool { return slices.Contains(paths, r) })
			n.valid[q] = in
		}
	}
	return nil
}

func (n *fakeNix) References(_ context.Context, p string) ([]string, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.valid[p].References), nil
}

func (n *fakeNix) isValid(p string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	_, ok := n.valid[p]
	return ok
}

// fakeServer serves generations from memory.
type fakeServer struct {
	mu        sync.Mutex
	gens      map[uint64][]nixstore.PathInfo
	down      bool
	failDelta error
	// sigs are served in the path rows; noRows makes /paths answer 404
	// (a generation published by an older server).
	sigs   map[string][]string
	noRows bool
	// pathsCalls counts /paths requests (full, delta).
	pathsCalls [2]int
	// nfs is the NFS address advertised (default 0.0.0.0:2049).
	nfs string
	// storeDir is the store dir of the generations' paths (default
	// /nix/store) as the rows header and the generation list say it;
	// listsNoStoreDir: the list does not (a server older than store_dir).
	storeDir        string
	listsNoStoreDir bool
	// stall makes Delta and Paths wait for their context to end, as a
	// server that died in the middle of a call; stalled counts them.
	stall   bool
	stalled int
}

// wait blocks a call while s.stall is set, until ctx ends (s.mu held; it
// is released while waiting).
func (s *fakeServer) wait(ctx context.Context) error {
	if !s.stall {
		return nil
	}
	s.stalled++
	s.mu.Unlock()
	<-ctx.Done()
	s.mu.Lock()
	return ctx.Err()
}

// replicaOf returns a server that serves the same generations as s.
func (s *fakeServer) replicaOf() *fakeServer {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := &fakeServer{gens: maps.Clone(s.gens), nfs: "0.0.0.0:3049"}
	return r
}

func (s *fakeServer) setDown(d bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.down = d
}

func (s *fakeServer) publish(infos ...nixstore.PathInfo) uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.gens == nil {
		s.gens = map[uint64][]nixstore.PathInfo{}
	}
	id := uint64(1)
	for g := range s.gens {
		id = max(id, g+1)
	}
	c := slices.Clone(infos)
	nixstore.Sort(c)
	s.gens[id] = c
	return id
}

var errDown = errors.New("dial tcp: connection refused")

// dir is s.storeDir, default /nix/store (s.mu held).
func (s *fakeServer) dir() string {
	if s.storeDir == "" {
		return "/nix/store"
	}
	return s.storeDir
}

func (s *fakeServer) Generations(context.Context) (api.GenerationList, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.down {
		return api.GenerationList{}, errDown
	}
	l := api.GenerationList{NFS: s.nfs, StoreDir: s.dir()}
	if l.NFS == "" {
		l.NFS = "0.0.0.0:2049"
	}
	if s.listsNoStoreDir {
		l.StoreDir = ""
	}
	ids := slices.Sorted(maps.Keys(s.gens))
	for _, id := range ids {
		var b bytes.Buffer
		nixstore.WriteRegistration(&b, s.gens[id])
		sum := sha256.Sum256(b.Bytes())
		l.Generations = append(l.Generations, api.Generation{ID: id, Paths: len(s.gens[id]), RegistrationSHA256: hex.EncodeToString(sum[:])})
	}
	return l, nil
}

func (s *fakeServer) Registration(_ context.Context, id uint64) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.down {
		return nil, errDown
	}
	var b bytes.Buffer
	if err := nixstore.WriteRegistration(&b, s.gens[id]); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

func (s *fakeServer) Paths(ctx context.Context, id, from uint64) (io.ReadCloser, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.wait(ctx); err != nil {
		return nil, err
	}
	if s.down {
		return nil, errDown
	}
	if from == 0 {
		s.pathsCalls[0]++
	} else {
		s.pathsCalls[1]++
	}
	if s.noRows {
		return nil, &api.StatusError{Code: 404, Status: "404 Not Found", Message: "generation has no path rows", JSON: true}
	}
	rows := func(g uint64) *nixstore.Rows {
		rs := nixstore.RowsFromInfos(s.gens[g])
		for i := range rs.Paths {
			rs.Paths[i].Sigs = s.sigs[rs.Paths[i].Path]
		}
		return rs
	}
	rs := rows(id)
	if from > 0 {
		if s.failDelta != nil {
			return nil, s.failDelta
		}
		rs = nixstore.RowsDelta(rows(from), rs)
	}
	var b bytes.Buffer
	if err := nixstore.WriteRows(&b, nixstore.RowsHeader{StoreDir: s.dir(), Generation: id, From: from}, rs); err != nil {
		return nil, err
	}
	return io.NopCloser(&b), nil
}

func (s *fakeServer) Delta(ctx context.Context, from, to uint64) (api.Delta, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.wait(ctx); err != nil {
		return api.Delta{}, err
	}
	if s.down {
		return api.Delta{}, errDown
	}
	if s.failDelta != nil {
		return api.Delta{}, s.failDelta
	}
	added, removed := nixstore.Delta(s.gens[from], s.gens[to])
	var b bytes.Buffer
	if err := nixstore.WriteRegistration(&b, added); err != nil {
		return api.Delta{}, err
	}
	return api.Delta{From: from, To: to, Added: b.String(), Removed: removed}, nil
}

func info(name string, refs ...string) nixstore.PathInfo {
	p := "/nix/store/" + fmt.Sprintf("%032d", len(name)) + "-" + name
	in := nixstore.PathInfo{Path: p, NarHash: fmt.Sprintf("%064x", len(name)), NarSize: 120}
	for _, r := range refs {
		in.References = append(in.References, r)
	}
	sort.Strings(in.References)
	return in
}

type unitEnv struct {
	cfg Config
	m   *fakeMounter
	nix *fakeNix
	srv *fakeServer
}

func newUnitEnv(t *testing.T) *unitEnv {
	t.Helper()
	dir := t.TempDir()
	// nix.store a directory (a chroot store): paths are named in
	// /nix/store, as the fake server's are, while the overlay is mounted on
	// <dir>/store.
	cfg := Config{ServerAPI: "http://central:7480", StoreDir: filepath.Join(dir, "store"), NixStore: dir, NixStateDir: filepath.Join(dir, "var"),
		NixBin: "nix-store", StateDir: filepath.Join(dir, "state"), NConnect: 4, CheckInterval: time.Second, MaxWait: time.Hour,
		StagingDir: filepath.Join(dir, "staging"), LogLevel: "info"}
	return &unitEnv{cfg: cfg, m: newFakeMounter(), nix: newFakeNix(), srv: &fakeServer{}}
}

func (u *unitEnv) agent(t *testing.T, opts ...func(*Options)) *Agent {
	t.Helper()
	o := Options{Config: u.cfg, Server: u.srv, Mounter: u.m, Nix: u.nix}
	for _, f := range opts {
		f(&o)
	}
	a, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// fakeDir is a Directory of fake servers: candidates in the order given,
// dead ones left out (as gossip does).
type fakeDir struct {
	mu   sync.Mutex
	eps  []Candidate
	srvs map[string]*fakeServer
	dead map[string]bool
}

func newFakeDir() *fakeDir {
	return &fakeDir{srvs: map[string]*fakeServer{}, dead: map[string]bool{}}
}

func (d *fakeDir) add(name string, s *fakeServer) Endpoint {
	d.mu.Lock()
	defer d.mu.Unlock()
	e := Endpoint{Name: name, API: "http://" + name + ":7480"}
	d.eps = append(d.eps, Candidate{Endpoint: e})
	d.srvs[e.API] = s
	return e
}

func (d *fakeDir) setDead(name string, dead bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.dead[name] = dead
}

func (d *fakeDir) Candidates() []Candidate {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []Candidate
	for _, c := range d.eps {
		if !d.dead[c.Name] {
			out = append(out, c)
		}
	}
	return out
}

func (d *fakeDir) Dead(e Endpoint) (bool, string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.dead[e.Name] {
		return true, "gossip: member " + e.Name + " is dead"
	}
	return false, ""
}

func (d *fakeDir) Client(e Endpoint) Server {
	d.mu.Lock()
	defer d.mu.Unlock()
	if s, ok := d.srvs[e.API]; ok {
		return s
	}
	return &fakeServer{down: true}
}

// hungProbe is an Options.ProbeLower: once kill is called, the probe of
// generation 1's lower hangs (statfs of a hard NFS mount whose server is
// dead) until the test ends, then fails with EIO; every other probe
// answers.
type hungProbe struct {
	mu   sync.Mutex
	dead bool
	hang chan struct{}
}

func newHungProbe(t *testing.T) *hungProbe {
	p := &hungProbe{hang: make(chan struct{})}
	t.Cleanup(func() { close(p.hang) })
	return p
}

func (p *hungProbe) kill() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.dead = true
}

func (p *hungProbe) probe(dir string) error {
	p.mu.Lock()
	h := p.dead && strings.HasSuffix(dir, "/1")
	p.mu.Unlock()
	if h {
		<-p.hang
		return errors.New("statfs: input/output error")
	}
	return nil
}
