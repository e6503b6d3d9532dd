// Package builder is the strata builder agent. It mounts the newest
// generation of the central store read-only (NFS) as the lower layer of an
// overlay on the local store dir, with a persistent local upper for local
// builds, registers the generation's paths in the local Nix database, and
// rotates atomically to each newer generation.
//
// Layout under state_dir:
//
//	upper/        the overlay's upper: local builds, kept for ever
//	work/gen<N>-* one fresh overlay workdir per mounted overlay (same fs as upper/)
//	lower/<N>/    mountpoint of generation N's NFS mount
//	lower/<N>@<server>/  the same generation from another server (failover)
//	dead/         dead servers' mounts being reaped (kernels without the NFS shutdown knob)
//	state.json    the agent's State, replaced atomically after each transition
//	api.sock      the agent's API (GET /v1/status, POST /v1/rotate)
//
// Mount namespace: the agent must run in the mount namespace whose store
// dir users see (the host's; a systemd unit without PrivateMounts). A swap
// with MOVE_MOUNT_BENEATH needs the store dir's parent mount not to be the
// namespace root (true on every installed system: / is the root, the store
// dir's parent is /nix or /); the propagation fallback (kernels < 6.5)
// makes that parent mount shared if it is not, and keeps a small private
// tmpfs at swap.staging_dir (see overlay.MethodPropagation for what this
// means for other mount namespaces). The agent sets up nothing else.
//
// Invariants kept (DESIGN.md): every path valid in the local DB is readable
// under the store dir at every instant (paths leaving are invalidated
// before the swap, while still readable; new paths are registered after
// it, once readable); path lookups never fail during a swap; the upper
// survives rotation, restarts and reboots.
package builder

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/strata-nix/strata/mountinfo"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/lifecycle"
	"github.com/strata-nix/strata/nixstore"
	"github.com/strata-nix/strata/overlay"

	"golang.org/x/sys/unix"
)

// Server is what the agent asks the strata server. *api.Client is one.
type Server interface {
	Generations(ctx context.Context) (api.GenerationList, error)
	Registration(ctx context.Context, id uint64) ([]byte, error)
	// Paths returns generation id's path rows (a nixstore rows file), only
	// those added since from when from > 0.
	Paths(ctx context.Context, id, from uint64) (io.ReadCloser, error)
	Delta(ctx context.Context, from, to uint64) (api.Delta, error)
}

// Options are the parts an Agent is built from.
type Options struct {
	Config Config
	Logger *slog.Logger
	// Servers are the servers the agent may use and fail over between;
	// nil: Server alone (server.api), no failover.
	Servers Directory
	// Server is the one server of an agent without Servers.
	Server  Server
	Mounter Mounter
	Nix     Nix
	// Busy reports whether a build runs (idle policy); nil means Busy on
	// the store dir and upper.
	Busy func() (bool, string, error)
	// Notify sends a systemd notification such as "READY=1"; nil: none.
	Notify func(state string)
	// OnTransition is called after each transition is persisted, on the
	// agent's goroutine. Tests use it to stop the agent at a given state.
	OnTransition func(State)
	// Progress brackets each start attempt and each check of Run (mount,
	// import, rotation), for the watchdog; may be nil.
	Progress *lifecycle.Step
	// ProbeLower asks the NFS server of the lower mounted at dir whether
	// it answers (failover monitor); nil: statfs(2) of dir.
	ProbeLower func(dir string) error
	// InUse reports which detached overlays processes still use (see
	// Retired); nil: overlay.InUse, a scan of /proc.
	InUse func([]overlay.Detached) (used []bool, denied int, err error)
}

// Agent is the builder agent. Run drives it; Status and RequestRotation
// may be called from other goroutines.
type Agent struct {
	cfg          Config
	log          *slog.Logger
	dir          Directory
	m            Mounter
	nix          Nix
	busy         func() (bool, string, error)
	notify       func(string)
	onTransition func(State)
	step         *lifecycle.Step
	probe        func(dir string) error
	inUse        func([]overlay.Detached) ([]bool, int, error)
	// refusedLogged: a scan for detached overlays in use was refused
	// some processes once (logged as a warning once; agent goroutine only).
	refusedLogged bool

	mu        sync.Mutex
	st        State
	ready     bool
	method    overlay.Method
	cur       Endpoint          // the server in use (zero: none chosen yet)
	nfs       map[string]string // NFS address each server advertised, by API URL
	latest    uint64            // newest generation the server listed
	health    health            // the server in use as the failover monitor sees it
	waitSince time.Time
	// noMetacopy: the kernel refused metacopy=on once; mount without it.
	noMetacopy bool
	// minStall is the least stall time (see stall): 10 s.
	minStall time.Duration

	usage usageCache
	met   *metrics // served at GET /metrics

	rotateReq chan rotateRequest
	failover  chan failoverRequest
	wake      chan struct{} // gossip: a newer generation may exist
	watchers  []func(State) // called after each transition (see Watch)
}

// New creates the state dir layout and loads the state file. It mounts
// nothing.
func New(o Options) (*Agent, error) {
	if (o.Server == nil && o.Servers == nil) || o.Mounter == nil || o.Nix == nil {
		return nil, errors.New("new builder agent: Server or Servers, Mounter and Nix are required")
	}
	dir := o.Servers
	if dir == nil {
		dir = fixedServer{e: Endpoint{Name: o.Config.ServerAPI, API: o.Config.ServerAPI, NFS: o.Config.ServerNFS}, srv: o.Server}
	}
	a := &Agent{cfg: o.Config, log: o.Logger, dir: dir, m: o.Mounter, nix: o.Nix, busy: o.Busy, nfs: map[string]string{},
		notify: o.Notify, onTransition: o.OnTransition, step: o.Progress, probe: o.ProbeLower, inUse: o.InUse, rotateReq: make(chan rotateRequest),
		failover: make(chan failoverRequest), wake: make(chan struct{}, 1), minStall: 10 * time.Second}
	if a.log == nil {
		a.log = slog.New(slog.DiscardHandler)
	}
	a.met = newMetrics(a)
	if a.notify == nil {
		a.notify = func(string) {}
	}
	if a.inUse == nil {
		a.inUse = overlay.InUse
	}
	if a.busy == nil {
		a.busy = func() (bool, string, error) { return Busy(a.cfg.StoreDir, a.cfg.upperDir()) }
	}
	if err := mkdirs(a.cfg.StateDir, a.cfg.upperDir(), a.cfg.workRoot(), a.cfg.lowerRoot()); err != nil {
		return nil, fmt.Errorf("new builder agent: state dir: %w", err)
	}
	st, err := loadState(a.cfg.stateFile())
	if err != nil {
		return nil, fmt.Errorf("new builder agent: %w", err)
	}
	a.st = st
	a.cur = st.Server
	if o.Servers == nil {
		a.cur = dir.Candidates()[0].Endpoint
	}
	return a, nil
}

// Wake asks the running agent to check for a newer generation now (gossip
// announced one), under its rotation policy; while it is not ready yet it
// makes the next start attempt come at once. It never blocks.
func (a *Agent) Wake() {
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

// Watch adds f, called with the state after each persisted transition on
// the agent's goroutine (it must not block), and once now. Call it before
// Run.
func (a *Agent) Watch(f func(State)) {
	a.watchers = append(a.watchers, f)
	f(a.State())
}

// State returns a copy of the agent's state.
func (a *Agent) State() State {
	a.mu.Lock()
	defer a.mu.Unlock()
	s := a.st
	s.Lowers = slices.Clone(s.Lowers)
	s.Next = slices.Clone(s.Next)
	s.Retired = slices.Clone(s.Retired)
	if s.LastFailover != nil {
		f := *s.LastFailover
		s.LastFailover = &f
	}
	return s
}

// Ready reports whether the store dir serves a generation.
func (a *Agent) Ready() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.ready
}

// Current returns the server in use (zero before one is chosen).
func (a *Agent) Current() Endpoint {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.cur
}

// client returns the API client of the server in use.
func (a *Agent) client() Server { return a.dir.Client(a.Current()) }

// transition changes the state, persists it, logs it and calls the hook.
// A failure to persist is returned: the caller stops its step.
func (a *Agent) transition(f func(*State)) error {
	a.mu.Lock()
	f(&a.st)
	s := a.st
	a.mu.Unlock()
	if err := saveState(a.cfg.stateFile(), s); err != nil {
		return fmt.Errorf("persist state %s: %w", s, err)
	}
	a.log.Debug("state", "state", s.String())
	if a.onTransition != nil {
		a.onTransition(s)
	}
	for _, w := range a.watchers {
		w(s)
	}
	return nil
}

func (a *Agent) setError(err error) {
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	if perr := a.transition(func(s *State) { s.LastError = msg }); perr != nil {
		a.log.Error("persist state", "err", perr)
	}
}

// generations asks the server in use for its live generations (choosing
// one first if none is: pickServer) and remembers the advertised NFS
// address.
func (a *Agent) generations(ctx context.Context) (api.GenerationList, error) {
	e := a.Current()
	if e.IsZero() {
		return a.pickServer(ctx)
	}
	l, err := a.list(ctx, e)
	if err != nil {
		return l, err
	}
	a.mu.Lock()
	if n := len(l.Generations); n > 0 {
		a.latest = l.Generations[n-1].ID
	}
	a.mu.Unlock()
	return l, nil
}

// list asks server e for its live generations, within failover.after
// (at least 10 s) so a dead server cannot stall the agent, and remembers
// the NFS address it advertises.
func (a *Agent) list(ctx context.Context, e Endpoint) (api.GenerationList, error) {
	ctx, cancel := context.WithTimeout(ctx, max(a.cfg.FailoverAfter, 10*time.Second))
	defer cancel()
	l, err := a.dir.Client(e).Generations(ctx)
	if err != nil {
		return l, fmt.Errorf("list generations at %s: %w", e, err)
	}
	if l.StoreDir != "" {
		if err := a.checkStoreDir(l.StoreDir, "server "+e.String()+" serves generations of"); err != nil {
			return api.GenerationList{}, err
		}
	}
	a.mu.Lock()
	a.nfs[normAPI(e.API)] = l.NFS
	a.mu.Unlock()
	return l, nil
}

// checkStoreDir refuses generations whose paths are named in store dir
// dir (what says so, ending in "of": a server, a rows header) when that is not the store
// dir this builder's paths are named in: mounted on this store.dir, they
// would register paths that name another directory.
func (a *Agent) checkStoreDir(dir, what string) error {
	if want := a.cfg.logicalStoreDir(); filepath.Clean(dir) != want {
		return fmt.Errorf("%s store dir %s, but this builder's store dir is %s (store.dir, or /nix/store with a directory as nix.store): refusing to mount them", what, dir, want)
	}
	return nil
}

// pickServer chooses the server to use when none is (first start): the
// first candidate, best first, that lists its generations.
func (a *Agent) pickServer(ctx context.Context) (api.GenerationList, error) {
	cs := a.dir.Candidates()
	if len(cs) == 0 {
		return api.GenerationList{}, fmt.Errorf("no strata server known yet (server.api %q, server.prefer %v, cluster.join %v)",
			a.cfg.ServerAPI, a.cfg.Prefer, a.cfg.Cluster.Join)
	}
	var errs []error
	for _, c := range cs {
		l, err := a.list(ctx, c.Endpoint)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		a.mu.Lock()
		a.cur = c.Endpoint
		if n := len(l.Generations); n > 0 {
			a.latest = l.Generations[n-1].ID
		}
		a.mu.Unlock()
		a.log.Info("using server", "server", c.String())
		return l, a.transition(func(s *State) { s.Server = c.Endpoint })
	}
	return api.GenerationList{}, errors.Join(errs...)
}

// nfsAddress is the host:port to mount server e's generations from: its
// configured or gossiped NFS address, else what it advertised, with an
// unspecified host replaced by its API URL's host.
func (a *Agent) nfsAddress(e Endpoint) (string, error) {
	addr := e.NFS
	if addr == "" {
		a.mu.Lock()
		addr = a.nfs[normAPI(e.API)]
		a.mu.Unlock()
	}
	c := Config{ServerNFS: addr, ServerAPI: e.API}
	h, p, err := c.NFSAddress("")
	if err != nil {
		return "", fmt.Errorf("server %s: %w", e, err)
	}
	return net.JoinHostPort(h, strconv.Itoa(p)), nil
}

func (a *Agent) registration(ctx context.Context, srv Server, gen uint64) ([]nixstore.PathInfo, error) {
	b, err := srv.Registration(ctx, gen)
	if err != nil {
		return nil, fmt.Errorf("fetch registration of generation %d: %w", gen, err)
	}
	infos, err := nixstore.ParseRegistration(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("registration of generation %d: %w", gen, err)
	}
	return infos, nil
}

// isOurs reports whether m is one of the agent's overlays: its upper is
// state_dir/upper.
func (a *Agent) isOurs(m mountinfo.Mount) bool {
	if m.FSType != "overlay" {
		return false
	}
	u, ok := m.Option("upperdir")
	return ok && filepath.Clean(u) == filepath.Clean(a.cfg.upperDir())
}

// ourOverlays returns the agent's overlays at the store dir (upper is ours),
// in mountinfo order, and the visible one.
func (a *Agent) ourOverlays(ms []mountinfo.Mount) (all []mountinfo.Mount, top mountinfo.Mount, hasTop bool) {
	for _, m := range mountinfo.At(ms, a.cfg.StoreDir) {
		if a.isOurs(m) {
			all = append(all, m)
		}
	}
	t, ok := mountinfo.Top(ms, a.cfg.StoreDir)
	if ok && slices.ContainsFunc(all, func(m mountinfo.Mount) bool { return m.ID == t.ID }) {
		return all, t, true
	}
	return all, mountinfo.Mount{}, false
}

// lowersOf reads the lowers of an overlay (lower/<N> or lower/<N>@<server>
// paths): generation and mountpoint name, with the server the state
// records for that mountpoint (none recorded: the server in use).
func (a *Agent) lowersOf(m mountinfo.Mount) ([]Lower, string, error) {
	l, err := overlay.LayersOf(m)
	if err != nil {
		return nil, "", err
	}
	var out []Lower
	for i, d := range l.Lower {
		if i == len(l.Lower)-1 && i > 0 && filepath.Clean(d) == filepath.Clean(a.cfg.localDir()) {
			break // the local store, bottom layer
		}
		if filepath.Dir(filepath.Clean(d)) != filepath.Clean(a.cfg.lowerRoot()) {
			return nil, "", fmt.Errorf("overlay %d: lower %s is not under %s", m.ID, d, a.cfg.lowerRoot())
		}
		g, ok := parseLowerName(filepath.Base(d))
		if !ok {
			return nil, "", fmt.Errorf("overlay %d: lower %s is not a generation", m.ID, d)
		}
		x := Lower{Gen: g, Server: a.ownerOf(filepath.Base(d))}
		if filepath.Base(d) != x.name() {
			x.Dir = filepath.Base(d)
		}
		out = append(out, x)
	}
	return out, l.Work, nil
}

// parseLowerName reads a lower mountpoint name: "<N>" or "<N>@<server>".
func parseLowerName(name string) (uint64, bool) {
	n, _, _ := strings.Cut(name, "@")
	g, err := strconv.ParseUint(n, 10, 64)
	return g, err == nil && g > 0
}

// ownerOf returns the API URL of the server whose generation the state
// records at lower/<name>; unrecorded: the server in use.
func (a *Agent) ownerOf(name string) string {
	st := a.State()
	for _, l := range append(st.Lowers, st.Next...) {
		if l.name() == name && l.Server != "" {
			return l.Server
		}
	}
	return a.Current().API
}

// lowerPath is where lower l is mounted.
func (a *Agent) lowerPath(l Lower) string { return filepath.Join(a.cfg.lowerRoot(), l.name()) }

// layers are the overlay's layers for lowers ls: the generations top
// first, then the local store (state_dir/local), then the upper.
func (a *Agent) layers(ls []Lower, work string) overlay.Layers {
	a.mu.Lock()
	meta := !a.cfg.NoMetacopy && !a.noMetacopy
	a.mu.Unlock()
	l := overlay.Layers{Upper: a.cfg.upperDir(), Work: work, Metacopy: meta}
	for _, x := range ls {
		l.Lower = append(l.Lower, a.lowerPath(x))
	}
	l.Lower = append(l.Lower, a.cfg.localDir())
	return l
}

// mayBeMetacopy reports whether err (mounting l) may be the kernel
// refusing metacopy=on (a layer filesystem or kernel without support: a
// bare EINVAL). The caller then tries once without it and, if that works,
// calls metacopyOff.
func mayBeMetacopy(err error, l overlay.Layers) bool {
	return l.Metacopy && errors.Is(err, unix.EINVAL)
}

// swapLayers swaps the overlay on the store dir for one of ol, as a
// rotation and a failover do. When the kernel refuses metacopy=on before
// anything switched, it tries once without and, if that works, records
// metacopyOff.
func (a *Agent) swapLayers(ctx context.Context, ol overlay.Layers) (overlay.SwapResult, error) {
	res, err := a.m.Swap(ctx, a.cfg.StoreDir, ol)
	if err != nil && !res.Switched && mayBeMetacopy(err, ol) {
		ol.Metacopy = false
		if res2, err2 := a.m.Swap(ctx, a.cfg.StoreDir, ol); err2 == nil || res2.Switched {
			a.metacopyOff(err)
			res, err = res2, err2
		}
	}
	return res, err
}

// metacopyOff records that the kernel refused metacopy=on (the same
// overlay mounted without it): later overlays are mounted without it and
// hard links to generation files copy them into the upper. Logged as an
// error once per agent; status shows metacopy false.
func (a *Agent) metacopyOff(err error) {
	a.mu.Lock()
	first := !a.noMetacopy
	a.noMetacopy = true
	a.mu.Unlock()
	if first {
		a.log.Error("the kernel refused the overlay with metacopy=on and took it without; sandboxed builds and nix-store --optimise will copy generation files into the upper",
			"err", err)
	}
}

// ensureLocal makes sure state_dir/local shows the local store: what the
// store dir held before the agent covered it (the running system, Nix
// itself, paths built or added before strata). It is bound there once,
// before the first overlay covers the store dir, and serves as the
// overlay's bottom lower layer, so every path that was valid locally stays
// readable at every instant, with the same files, and is never copied. An
// overlay of an older agent without it gets it at the next rotation (then
// the local store is reached through the store dir's parent mount).
func (a *Agent) ensureLocal(ctx context.Context) error {
	ms, err := a.m.Mounts()
	if err != nil {
		return err
	}
	dir := a.cfg.localDir()
	if len(mountinfo.At(ms, dir)) > 0 {
		return nil
	}
	if err := mkdirs(a.cfg.StoreDir, dir); err != nil {
		return fmt.Errorf("local store layer: %w", err)
	}
	if err := a.m.BindLocal(ctx, a.cfg.StoreDir, dir, a.isOurs); err != nil {
		return fmt.Errorf("local store layer: %w", err)
	}
	a.log.Info("bound the local store as the bottom layer", "store", a.cfg.StoreDir, "dir", dir)
	return nil
}

// ensureLower mounts generation g of server e under lower/ unless it is
// mounted there already, and returns the lower. Its mountpoint is
// lower/<g>, or lower/<g>@<server> when lower/<g> holds generation g of
// another server (a failover mounts the same generation twice, for a
// moment).
func (a *Agent) ensureLower(ctx context.Context, e Endpoint, g uint64) (Lower, error) {
	ms, err := a.m.Mounts()
	if err != nil {
		return Lower{}, err
	}
	l := Lower{Gen: g, Server: e.API}
	if len(mountinfo.At(ms, a.lowerPath(l))) > 0 && normAPI(a.ownerOf(l.name())) != normAPI(e.API) {
		l.Dir = fmt.Sprintf("%d@%s", g, e.slug())
	}
	dir := a.lowerPath(l)
	if len(mountinfo.At(ms, dir)) > 0 {
		return l, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return l, fmt.Errorf("mount generation %d: %w", g, err)
	}
	if err := a.checkNFSAccess(ctx, e); err != nil {
		return l, fmt.Errorf("mount generation %d: %w", g, err)
	}
	// Without an address (none configured or advertised) the mounter
	// is given "": the NFS one refuses it, with nerr's words.
	nfs, nerr := a.nfsAddress(e)
	if err := a.m.MountGeneration(ctx, nfs, g, dir); err != nil {
		if nerr != nil {
			err = nerr
		}
		return l, fmt.Errorf("mount generation %d of %s at %s: %w", g, e, dir, err)
	}
	a.log.Info("mounted generation", "generation", g, "server", e.String(), "nfs", nfs, "dir", dir)
	if st := a.State(); slices.Contains(st.ForceRelease, l.name()) {
		// A live server's mount now: never to be forced.
		if err := a.transition(func(s *State) {
			s.ForceRelease = slices.DeleteFunc(slices.Clone(s.ForceRelease), func(n string) bool { return n == l.name() })
		}); err != nil {
			return l, err
		}
	}
	return l, nil
}

// NFSAccessChecker is asked before a generation is mounted whether the
// server's NFS export admits this builder. *api.Client is one; a Server
// without it is not asked.
type NFSAccessChecker interface {
	NFSAccess(ctx context.Context) (api.NFSAccess, error)
}

// checkNFSAccess asks the server (GET /v1/nfs/access) whether its export
// admits the address this builder calls from, and returns a clear error
// if not: a refused NFS connection otherwise shows as a mount that hangs
// or fails with "connection refused" or "input/output error". A server
// that cannot answer (older, unreachable) is not an error here; the mount
// then tells.
func (a *Agent) checkNFSAccess(ctx context.Context, e Endpoint) error {
	c, ok := a.dir.Client(e).(NFSAccessChecker)
	if !ok {
		return nil
	}
	acc, err := c.NFSAccess(ctx)
	if err != nil {
		a.log.Debug("nfs access check", "err", err)
		return nil
	}
	if acc.NFS != "" && acc.Address != "" && !acc.Allowed {
		return fmt.Errorf("the strata server refuses NFS connections from this builder: it sees this builder as %s, which is not in its nfs.allow %v (add this builder's network to nfs.allow on the server)",
			acc.Address, acc.Allow)
	}
	return nil
}

// releaseLowers detaches every mount under lower/ that is not one of keep,
// and all but one mount stacked on a kept one, then removes empty
// mountpoints of released generations. Detach never touches the NFS
// server, so it works while the server is down; the kernel frees a lower
// once the last overlay (even a detached one still in use) lets go. A
// released mountpoint for which force says so is force-unmounted instead
// (Mounter.ForceUnmount: a dead server's lower, after a failover).
func (a *Agent) releaseLowers(ctx context.Context, keep []Lower, force func(name string) bool) error {
	ms, err := a.m.Mounts()
	if err != nil {
		return err
	}
	root := filepath.Clean(a.cfg.lowerRoot())
	count := map[string]int{}
	for _, m := range mountinfo.Under(ms, root) {
		count[m.Mountpoint]++
	}
	var errs []error
	for dir, n := range count {
		if filepath.Dir(dir) != root {
			continue
		}
		name := filepath.Base(dir)
		want := 0
		if slices.ContainsFunc(keep, func(l Lower) bool { return l.name() == name }) {
			want = 1
		}
		for ; n > want; n-- {
			if want == 0 && force != nil && force(name) {
				if err := a.m.ForceUnmount(ctx, dir); err != nil {
					errs = append(errs, err)
					break
				}
				a.log.Info("force-unmounted generation mount of a dead server", "dir", dir)
				continue
			}
			if err := a.m.Detach(ctx, dir); err != nil {
				errs = append(errs, err)
				break
			}
			a.log.Info("released generation mount", "dir", dir)
		}
		if want == 0 {
			_ = os.Remove(dir)
		}
	}
	return errors.Join(errs...)
}

// pruneWorkdirs removes workdirs no visible overlay uses, except keep and
// those of retired overlays still in use (State.Retired).
func (a *Agent) pruneWorkdirs(keep ...string) {
	for _, r := range a.State().Retired {
		keep = append(keep, r.Overlay.Work)
	}
	ms, err := a.m.Mounts()
	if err != nil {
		a.log.Warn("prune workdirs", "err", err)
		return
	}
	used := map[string]bool{}
	for _, k := range keep {
		if k != "" {
			used[filepath.Clean(k)] = true
		}
	}
	for _, m := range ms {
		if w, ok := m.Option("workdir"); ok && m.FSType == "overlay" {
			used[filepath.Clean(w)] = true
		}
	}
	ents, err := os.ReadDir(a.cfg.workRoot())
	if err != nil {
		a.log.Warn("prune workdirs", "err", err)
		return
	}
	for _, e := range ents {
		p := filepath.Join(a.cfg.workRoot(), e.Name())
		if used[p] || !e.IsDir() {
			continue
		}
		if err := overlay.RemoveWorkdir(p); err != nil {
			a.log.Warn("prune workdir", "dir", p, "err", err)
		}
	}
}
