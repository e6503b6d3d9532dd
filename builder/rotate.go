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
		var prev []string
		root, err := os.Readlink(a.cfg.gcRootLink())
		if err == nil && a.rooted(ctx) {
			prev, err = a.nix.References(ctx, root)
		}
		if err != nil || len(prev) == 0 {
			return fmt.Errorf("server %s does not have generation %d, and this builder's GC root does not list its paths (%v): cannot tell which paths leave", e, cur, err)
		}
		if wholeRows, err = a.rowsFrom(ctx, srv, gen, 0); err != nil {
			return err
		}
		addedRows = wholeRows
		d = api.Delta{From: cur, To: gen, Removed: without(without(prev, []string{root}), rowPaths(wholeRows))}
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

	// Paths leaving, each with the generation whose lower holds it.
	cands := map[string]uint64{}
	for _, p := range d.Removed {
		cands[p] = cur
	}
	for _, l := range st.Lowers[1:] {
		for _, p := range l.Kept {
			cands[p] = l.Gen
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
		return err
	}
	// The generation's GC root refers to every path of it; it is no
	// reason to keep one. It is replaced below, under the GC lock.
	for p, rs := range refs {
		refs[p] = slices.DeleteFunc(rs, isRootPath)
	}
	plan := planRemoval(cands, valid, refs, func(p string) bool { return localHolds(a.cfg.upperDir(), a.cfg.localDir(), p) })
	next := []Lower{top}
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
		if from := a.endpointOf(x); normAPI(from.API) != normAPI(e.API) {
			// No lower stays on a server that is not the one in use.
			if !hasGeneration(l, g, x.SHA256) {
				if !dead {
					return fmt.Errorf("server %s does not serve generation %d (registration %.12s), which %d local paths still need (e.g. %s) through server %s: rotate through %s, or once nothing refers to them",
						e, g, x.SHA256, len(x.Kept), x.Kept[0], from, from)
				}
				dropGens = append(dropGens, g)
				continue
			}
			x = Lower{Gen: g, Kept: x.Kept, Server: e.API, SHA256: registrationSHA(l, g)}
			remount[g] = true
		}
		next = append(next, x)
	}
	if len(dropGens) > 0 {
		drop, err := a.dropKept(ctx, plan, dropGens)
		if err != nil {
			return err
		}
		rest := next[:1]
		for _, x := range next[1:] {
			x.Kept = slices.DeleteFunc(slices.Clone(x.Kept), func(p string) bool { return slices.Contains(drop, p) })
			if len(x.Kept) > 0 {
				rest = append(rest, x)
			}
		}
		next = rest
		for _, p := range drop {
			if !slices.Contains(plan.Invalidate, p) {
				plan.Invalidate = append(plan.Invalidate, p)
			}
		}
		slices.Sort(plan.Invalidate)
		a.log.Warn("the new server does not serve generations that local paths needed from the dead one: invalidating those paths and every local path that refers to them (their files were on the dead server)",
			"server", e.String(), "dead", old.String(), "generations", dropGens, "invalidated", len(drop), "paths", drop)
		keptGens = gens(next[1:])
	}
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
