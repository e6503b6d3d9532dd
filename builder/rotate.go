package builder

import (
	"context"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/mountinfo"
	"github.com/strata-nix/strata/nixstore"
)

// hasGeneration reports whether l lists generation id (with registration
// sha256 sha, unless sha is empty).
func hasGeneration(l api.GenerationList, id uint64, sha string) bool {
	return slices.ContainsFunc(l.Generations, func(g api.Generation) bool {
		return g.ID == id && (sha == "" || g.RegistrationSHA256 == sha)
	})
}

// registrationSHA returns the registration sha256 l lists for generation
// id ("" if none).
func registrationSHA(l api.GenerationList, id uint64) string {
	for _, g := range l.Generations {
		if g.ID == id {
			return g.RegistrationSHA256
		}
	}
	return ""
}

// endpointOf is the server lower x is mounted from (the server in use
// when the state does not say).
func (a *Agent) endpointOf(x Lower) Endpoint {
	cur := a.Current()
	if x.Server == "" || normAPI(x.Server) == normAPI(cur.API) {
		return cur
	}
	for _, c := range a.dir.Candidates() {
		if normAPI(c.API) == normAPI(x.Server) {
			return c.Endpoint
		}
	}
	return Endpoint{Name: x.Server, API: x.Server}
}

// Rotate moves the store dir from the current generation N to gen:
//
//  1. Mounting(gen): fetch the delta N→gen, mount gen at lower/<gen>.
//  2. Invalidating(gen): decide for every path leaving (the delta's removed
//     paths, and paths kept by older lowers that gen does not bring back):
//     invalidate it in the local DB, unless the upper holds it, or a path
//     that stays valid refers to it — then its generation stays mounted as
//     an extra lower below gen (planRemoval). Invalidation happens while
//     the paths are still readable.
//  3. Swapping(gen): overlay.Swap to lowers [gen, kept...] with the same
//     upper and a fresh workdir. The old overlay is recorded first as
//     retired (State.Retired): detached, it lives on for sandboxed builds
//     and processes inside it, and stays held while they use it.
//  4. Importing(gen): register the delta's added paths (their rows
//     written into the Nix DB, see NixStore.Load; only those not valid
//     yet), now that they are readable.
//  5. Releasing(gen): detach lowers no longer used (N's NFS mount, once
//     the old overlay is detached; a detached overlay still in use keeps
//     it alive in the kernel), release retired overlays nothing uses any
//     more, prune workdirs but the current, the previous and those of
//     retired overlays still in use.
//
// An error before the swap leaves the old overlay in place: the new lower
// is detached again and the error is recorded in the state (LastError).
// Paths invalidated before a failed swap stay invalid (they were leaving,
// and the DB stays closed under references). An error while importing
// leaves the new overlay with the state at Importing; the next Check
// imports the full registration again.
//
// Rotate goes through the server in use; rotateVia through another one,
// which becomes the server in use once the new overlay serves.
func (a *Agent) Rotate(ctx context.Context, gen uint64) error {
	e := a.Current()
	l, err := a.list(ctx, e)
	if err != nil {
		return fmt.Errorf("rotate to generation %d: %w", gen, err)
	}
	return a.rotateVia(ctx, e, l, gen, false)
}

// rotateVia rotates to generation gen of server e, whose live generations
// are l. When e does not have the mounted generation (a failover to a
// server without it), the delta is worked out here: the paths leaving are
// the mounted generation's (its GC root lists them) that gen does not
// have, and gen's whole path rows are imported (only paths not valid yet
// are registered).
//
// Every lower of the new overlay comes from e: an older generation kept
// for local paths that refer to it (planRemoval) and mounted from another
// server is mounted again from e, which must serve it with the same
// registration. When e does not, and the server it was mounted from is
// alive, the rotation is refused before anything changes. When that
// server is dead (dead: a failover), its files cannot be read, kept or
// copied any more: the kept paths are invalidated with every local path
// that refers to them, directly or not (logged), so that no valid path
// needs the dead server and no lower of the new overlay is on it. With
// dead set, the old server's lowers are force-unmounted once released
// (State.ForceRelease, honoured by a restart too).
func (a *Agent) rotateVia(ctx context.Context, e Endpoint, l api.GenerationList, gen uint64, dead bool) (err error) {
	st := a.State()
	if st.Phase != PhaseIdle {
		return fmt.Errorf("rotate to generation %d: agent is %s, not idle", gen, st)
	}
	if gen <= st.Generation {
		return fmt.Errorf("rotate to generation %d: not newer than the mounted generation %d", gen, st.Generation)
	}
	began := time.Now()
	cur := st.Generation
	swapped := false
	var force []string  // the old server's lowers, when it is dead
	var retired Retired // the overlay the swap detaches
	hasRetired := false
	defer func() {
		a.met.rotated(err)
		if err == nil {
			return
		}
		err = fmt.Errorf("rotate %d -> %d: %w", cur, gen, err)
		a.log.Error("rotation failed", "from", cur, "to", gen, "err", err)
		if !swapped {
			if terr := a.transition(func(s *State) {
				s.Phase, s.Target, s.Next, s.LastError = PhaseReleasing, 0, nil, err.Error()
				s.ForceRelease = without(s.ForceRelease, without(force, st.ForceRelease))
				if hasRetired {
					s.Retired = withoutRetired(s.Retired, retired.Overlay.Work)
				}
			}); terr != nil {
				a.log.Error("persist state", "err", terr)
				return
			}
			if rerr := a.release(context.WithoutCancel(ctx)); rerr != nil {
				a.log.Error("release after failed rotation", "err", rerr)
			}
		} else {
			a.setError(err)
		}
	}()

	srv := a.dir.Client(e)
	var d api.Delta
	var addedRows, wholeRows *nixstore.Rows
	if hasGeneration(l, cur, "") {
		dctx, _, stop := stallGuard(ctx, a.stall())
		d, err = srv.Delta(dctx, cur, gen)
		if err != nil {
			err = stalled(dctx, err)
		}
		stop()
		if err != nil {
			return fmt.Errorf("fetch delta: %w", err)
		}
		if addedRows, err = a.rowsFrom(ctx, srv, gen, cur); err != nil {
			return err
		}
	} else {
		if wholeRows, err = a.rowsFrom(ctx, srv, gen, 0); err != nil {
			return err
		}
		removed, err := a.leavingFromRoot(ctx, wholeRows)
		if err != nil {
			return fmt.Errorf("server %s does not have generation %d: %w", e, cur, err)
		}
		addedRows = wholeRows
		d = api.Delta{From: cur, To: gen, Removed: removed}
		a.log.Info("server does not have the mounted generation; importing the new one whole", "server", e.String(),
			"mounted", cur, "generation", gen, "leaving", len(d.Removed))
	}
	added := addedRows.Paths
	if err := a.transition(func(s *State) { s.Phase, s.Target = PhaseMounting, gen }); err != nil {
		return err
	}
	top, err := a.ensureLower(ctx, e, gen)
	if err != nil {
		return err
	}
	top.SHA256 = registrationSHA(l, gen)

	old := a.Current()
	plan, extra, remount, err := a.planLeaving(ctx, e, l, st, d.Removed, added, dead)
	if err != nil {
		return err
	}
	next := append([]Lower{top}, extra...)
	keptGens := gens(extra)
	// The old server's lowers are forced off once released when it is
	// dead; recorded before the swap, so a restart honours it.
	if dead {
		for _, x := range st.Lowers {
			if normAPI(a.endpointOf(x).API) != normAPI(e.API) {
				force = append(force, x.name())
			}
		}
	}
	// No garbage collection from here until the new paths are registered
	// and rooted (see gcroot.go): the current root goes with the paths
	// that leave, the next one comes after the import.
	unlock, err := a.gcLock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	rooted := a.rooted(ctx)
	if err := a.transition(func(s *State) { s.Phase, s.Next = PhaseInvalidating, next }); err != nil {
		return err
	}
	// Invalidate drops the root's references to these paths with them.
	if err := a.nix.Invalidate(ctx, plan.Invalidate); err != nil {
		return err
	}
	if len(plan.Invalidate)+len(plan.InUpper)+len(keptGens) > 0 {
		a.log.Info("paths left the central store", "invalidated", len(plan.Invalidate),
			"kept_in_upper", len(plan.InUpper), "kept_through_old_lowers", keptGens)
	}
	for i, x := range next[1:] {
		if !remount[x.Gen] && normAPI(a.endpointOf(x).API) == normAPI(e.API) && a.isMounted(x) {
			next[i+1].Server = e.API
			continue
		}
		k, err := a.ensureLower(ctx, e, x.Gen)
		if err != nil {
			return err
		}
		next[i+1].Server, next[i+1].Dir = k.Server, k.Dir
	}
	if err := a.ensureLocal(ctx); err != nil {
		return err
	}
	repaired, err := a.repairHidden(a.lowerPath(top))
	if err != nil {
		return err
	}
	work, err := newWorkdir(a.cfg, gen)
	if err != nil {
		return err
	}
	// The old overlay lives on, detached, for whatever still uses it
	// (sandboxed builds, a cwd in it): recorded before the swap, so its
	// generations stay held through a restart too.
	retired, hasRetired = a.retiring(st.Lowers, next)
	if err := a.transition(func(s *State) {
		s.Phase, s.PathsInvalidated, s.Next, s.ForceRelease = PhaseSwapping, len(plan.Invalidate), next, union(s.ForceRelease, force)
		if hasRetired {
			s.Retired = withRetired(s.Retired, retired)
		}
	}); err != nil {
		os.Remove(work)
		return err
	}
	ol := a.layers(next, work)
	res, err := a.swapLayers(ctx, ol)
	if err != nil && !res.Switched {
		return err
	}
	swapped = true
	if err != nil {
		// The new overlay serves the store dir: carry on as after a swap
		// (import, release), or its new paths would never be registered.
		a.log.Warn("the swap switched to the new overlay, then failed; continuing the rotation", "err", err)
	}
	method := res.Method
	swapTook := time.Since(began)
	a.mu.Lock()
	a.method = method
	a.cur = e
	a.mu.Unlock()
	a.log.Info("swapped overlay", "from", cur, "to", gen, "method", method.String(), "lowers", gens(next))
	if normAPI(old.API) != normAPI(e.API) {
		a.log.Info("the store dir now serves generations of another server", "from", old.String(), "to", e.String(), "generation", gen)
	}
	if err := a.transition(func(s *State) {
		s.Phase, s.Generation, s.Lowers, s.PrevWork, s.Work, s.Server = PhaseImporting, gen, next, s.Work, work, e
	}); err != nil {
		return err
	}
	// The new paths, with the generation's GC root updated in the same
	// transaction: the previous root minus the removed plus the added; or
	// every path of the generation when there is no previous root or
	// hidden paths were repaired (then all of them are imported again;
	// only paths not valid are registered), or when the server did not
	// have the mounted generation (the rows are the whole generation).
	toLoad, full := addedRows, wholeRows != nil || len(repaired) > 0 || !rooted
	if full && wholeRows == nil {
		if toLoad, err = a.rowsFrom(ctx, srv, gen, 0); err != nil {
			return fmt.Errorf("import: %w", err)
		}
	}
	n, _, msg, err := a.importRooted(ctx, gen, toLoad, full, d.Removed)
	if err != nil {
		return fmt.Errorf("import: %w", err)
	}
	if err := a.transition(func(s *State) {
		s.Phase, s.Target, s.Next, s.PathsImported, s.LastError = PhaseReleasing, 0, nil, n, msg
		s.LastRotation, s.LastRotationDuration = time.Now(), time.Since(began)
	}); err != nil {
		return err
	}
	if err := a.release(ctx); err != nil {
		return err
	}
	a.notify(fmt.Sprintf("STATUS=serving generation %d", gen))
	a.log.Info("rotated", "from", cur, "to", gen, "imported", n, "invalidated", len(plan.Invalidate),
		"until_swap", swapTook.Round(time.Millisecond), "took", time.Since(began).Round(time.Millisecond))
	return nil
}

// dropKept returns the paths plan keeps through generations gs (which no
// live server in reach serves) with every valid local path that refers to
// them, directly or not, generation roots aside: the set to invalidate so
// that the local DB stays closed under references without them.
func (a *Agent) dropKept(ctx context.Context, plan removal, gs []uint64) ([]string, error) {
	in := map[string]bool{}
	var frontier []string
	for _, g := range gs {
		for _, p := range plan.Keep[g] {
			if !in[p] {
				in[p] = true
				frontier = append(frontier, p)
			}
		}
	}
	for len(frontier) > 0 {
		slices.Sort(frontier)
		_, refs, err := a.nix.Referrers(ctx, frontier)
		if err != nil {
			return nil, err
		}
		frontier = nil
		for _, rs := range refs {
			for _, r := range rs {
				if !isRootPath(r) && !in[r] {
					in[r] = true
					frontier = append(frontier, r)
				}
			}
		}
	}
	out := make([]string, 0, len(in))
	for p := range in {
		out = append(out, p)
	}
	slices.Sort(out)
	return out, nil
}

// isMounted reports whether lower x's mountpoint has a mount.
func (a *Agent) isMounted(x Lower) bool {
	ms, err := a.m.Mounts()
	return err == nil && len(mountinfo.At(ms, a.lowerPath(x))) > 0
}

// leavingFromRoot returns the paths of the mounted generation that a
// generation whose whole path rows are rows does not have: those the
// generation's GC root refers to (the root path aside), minus rows'. It
// works out what leaves when no server has the mounted generation any more
// to ask for a delta (a failover to a server without it, a restart after
// it was retired). An error when the root does not list them.
func (a *Agent) leavingFromRoot(ctx context.Context, rows *nixstore.Rows) ([]string, error) {
	var prev []string
	root, err := os.Readlink(a.cfg.gcRootLink())
	if err == nil && a.rooted(ctx) {
		prev, err = a.nix.References(ctx, root)
	}
	if err != nil || len(prev) == 0 {
		return nil, fmt.Errorf("this builder's GC root does not list the mounted generation's paths (%v): cannot tell which paths leave", err)
	}
	return without(without(prev, []string{root}), rowPaths(rows)), nil
}

// planLeaving decides what a move of the store dir from the lowers of st
// to generation gen of server e (whose live generations are l) does with
// the paths that leave: removed (paths of st's top generation that gen
// does not have: the delta's, or leavingFromRoot's) and the paths st's
// older lowers are kept for, minus added (gen's new paths). Each is
// invalidated, kept valid because the upper or the local store holds it,
// or kept valid through its generation's lower below gen because a path
// that stays valid refers to it (planRemoval).
//
// A kept generation must come from e, with the registration it had: one
// mounted from another server is mounted again from e (remount). When e
// does not serve it and the server it was mounted from is another one
// that is alive (!dead), the move is refused. Otherwise (that server is
// dead, or e no longer serves it: retired) its files cannot be read any
// more: the paths kept through it are invalidated with every local path
// that refers to them, directly or not (dropKept, logged), so that no
// valid path needs them.
//
// It returns the plan (Invalidate includes those), the lowers to keep
// below gen (top first) and which of them to mount again from e.
func (a *Agent) planLeaving(ctx context.Context, e Endpoint, l api.GenerationList, st State, removed []string,
	added []nixstore.Row, dead bool) (removal, []Lower, map[uint64]bool, error) {
	// Paths leaving, each with the generation whose lower holds it.
	cands := map[string]uint64{}
	for _, p := range removed {
		cands[p] = st.Generation
	}
	if len(st.Lowers) > 0 {
		for _, l := range st.Lowers[1:] {
			for _, p := range l.Kept {
				cands[p] = l.Gen
			}
		}
	}
	for _, in := range added {
		delete(cands, in.Path)
	}
	paths := make([]string, 0, len(cands))
	for p := range cands {
		paths = append(paths, p)
	}
	slices.Sort(paths)
	valid, refs, err := a.nix.Referrers(ctx, paths)
	if err != nil {
		return removal{}, nil, nil, err
	}
	// The generation's GC root refers to every path of it; it is no
	// reason to keep one. It is replaced under the GC lock.
	for p, rs := range refs {
		refs[p] = slices.DeleteFunc(rs, isRootPath)
	}
	plan := planRemoval(cands, valid, refs, func(p string) bool { return localHolds(a.cfg.upperDir(), a.cfg.localDir(), p) })
	var extra []Lower
	var keptGens, dropGens []uint64
	for g := range plan.Keep {
		keptGens = append(keptGens, g)
	}
	slices.Sort(keptGens)
	slices.Reverse(keptGens)
	old := a.Current()
	remount := map[uint64]bool{} // kept generations mounted again from e
	for _, g := range keptGens {
		x := Lower{Gen: g, Server: e.API}
		if i := slices.IndexFunc(st.Lowers, func(l Lower) bool { return l.Gen == g }); i >= 0 {
			x = st.Lowers[i]
		}
		x.Kept = plan.Keep[g]
		from := a.endpointOf(x)
		other := normAPI(from.API) != normAPI(e.API)
		if !hasGeneration(l, g, x.SHA256) {
			if other && !dead {
				return removal{}, nil, nil, fmt.Errorf("server %s does not serve generation %d (registration %.12s), which %d local paths still need (e.g. %s) through server %s: rotate through %s, or once nothing refers to them",
					e, g, x.SHA256, len(x.Kept), x.Kept[0], from, from)
			}
			dropGens = append(dropGens, g)
			continue
		}
		if other {
			// No lower stays on a server that is not the one in use.
			x = Lower{Gen: g, Kept: x.Kept, Server: e.API, SHA256: registrationSHA(l, g)}
			remount[g] = true
		}
		extra = append(extra, x)
	}
	if len(dropGens) > 0 {
		drop, err := a.dropKept(ctx, plan, dropGens)
		if err != nil {
			return removal{}, nil, nil, err
		}
		var rest []Lower
		for _, x := range extra {
			x.Kept = slices.DeleteFunc(slices.Clone(x.Kept), func(p string) bool { return slices.Contains(drop, p) })
			if len(x.Kept) > 0 {
				rest = append(rest, x)
			}
		}
		extra = rest
		for _, p := range drop {
			if !slices.Contains(plan.Invalidate, p) {
				plan.Invalidate = append(plan.Invalidate, p)
			}
		}
		slices.Sort(plan.Invalidate)
		a.log.Warn("generations that local paths need are served no more (retired, or only on a dead server): invalidating those paths and every local path that refers to them (their files cannot be read)",
			"server", e.String(), "was", old.String(), "generations", dropGens, "invalidated", len(drop), "paths", drop)
	}
	return plan, extra, remount, nil
}

// leavingRetired works out what leaves when a start mounts generation gen
// of server e (whose live generations are l) because e no longer has the
// generation st names (it was retired while the builder was stopped): the
// mounted generation's paths that gen does not have (leavingFromRoot) and
// the paths st's older lowers were kept for, planned as a rotation plans
// them (planLeaving: a retired generation's files cannot be read any more,
// so the paths kept through it go with every local path that refers to
// them). It returns the paths to invalidate and the older lowers to keep
// below gen. When the GC root does not list the old generation's paths it
// logs an error and returns nothing: which paths left cannot be told.
func (a *Agent) leavingRetired(ctx context.Context, e Endpoint, l api.GenerationList, st State, gen uint64) ([]string, []Lower, error) {
	rows, err := a.rowsFrom(ctx, a.dir.Client(e), gen, 0)
	if err != nil {
		return nil, nil, err
	}
	removed, err := a.leavingFromRoot(ctx, rows)
	if err != nil {
		a.log.Error("the generation this builder had mounted is gone, and which of its paths left cannot be told: paths only it had may stay valid but unreadable",
			"generation", st.Generation, "err", err)
		return nil, nil, nil
	}
	plan, extra, _, err := a.planLeaving(ctx, e, l, st, removed, rows.Paths, true)
	if err != nil {
		return nil, nil, err
	}
	return plan.Invalidate, extra, nil
}
