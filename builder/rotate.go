package builder

import (
	"context"
	"fmt"
	"os"
	"slices"
	"time"
)

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
//     upper and a fresh workdir.
//  4. Importing(gen): register the delta's added paths (nix-store
//     --load-db, only those not valid yet), now that they are readable.
//  5. Releasing(gen): detach lowers no longer used (N's NFS mount, once
//     the old overlay is detached; a detached overlay still in use keeps
//     it alive in the kernel), prune workdirs but the current and previous.
//
// An error before the swap leaves the old overlay in place: the new lower
// is detached again and the error is recorded in the state (LastError).
// Paths invalidated before a failed swap stay invalid (they were leaving,
// and the DB stays closed under references). An error while importing
// leaves the new overlay with the state at Importing; the next Check
// imports the full registration again.
func (a *Agent) Rotate(ctx context.Context, gen uint64) (err error) {
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
	defer func() {
		if err == nil {
			return
		}
		err = fmt.Errorf("rotate %d -> %d: %w", cur, gen, err)
		a.log.Error("rotation failed", "from", cur, "to", gen, "err", err)
		if !swapped {
			if terr := a.transition(func(s *State) {
				s.Phase, s.Target, s.Next, s.LastError = PhaseReleasing, 0, nil, err.Error()
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

	d, err := a.srv.Delta(ctx, cur, gen)
	if err != nil {
		return fmt.Errorf("fetch delta: %w", err)
	}
	addedRows, err := a.rows(ctx, gen, cur)
	if err != nil {
		return err
	}
	added := addedRows.Paths
	if err := a.transition(func(s *State) { s.Phase, s.Target = PhaseMounting, gen }); err != nil {
		return err
	}
	if err := a.ensureLower(ctx, gen); err != nil {
		return err
	}

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
	next := []Lower{{Gen: gen}}
	var keptGens []uint64
	for g := range plan.Keep {
		keptGens = append(keptGens, g)
	}
	slices.Sort(keptGens)
	slices.Reverse(keptGens)
	for _, g := range keptGens {
		next = append(next, Lower{Gen: g, Kept: plan.Keep[g]})
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
	for _, x := range next[1:] {
		if err := a.ensureLower(ctx, x.Gen); err != nil {
			return err
		}
	}
	if err := a.ensureLocal(ctx); err != nil {
		return err
	}
	repaired, err := a.repairHidden(a.cfg.lowerDir(gen))
	if err != nil {
		return err
	}
	work, err := newWorkdir(a.cfg, gen)
	if err != nil {
		return err
	}
	if err := a.transition(func(s *State) { s.Phase, s.PathsInvalidated = PhaseSwapping, len(plan.Invalidate) }); err != nil {
		os.Remove(work)
		return err
	}
	l := a.layers(next, work)
	res, err := a.m.Swap(ctx, a.cfg.StoreDir, l)
	if err != nil && !res.Switched && mayBeMetacopy(err, l) {
		l.Metacopy = false
		if res2, err2 := a.m.Swap(ctx, a.cfg.StoreDir, l); err2 == nil || res2.Switched {
			a.metacopyOff(err)
			res, err = res2, err2
		}
	}
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
	a.mu.Unlock()
	a.log.Info("swapped overlay", "from", cur, "to", gen, "method", method.String(), "lowers", gens(next))
	if err := a.transition(func(s *State) {
		s.Phase, s.Generation, s.Lowers, s.PrevWork, s.Work = PhaseImporting, gen, next, s.Work, work
	}); err != nil {
		return err
	}
	// The new paths, with the generation's GC root updated in the same
	// transaction: the previous root minus the removed plus the added; or
	// every path of the generation when there is no previous root or
	// hidden paths were repaired (then all of them are imported again;
	// only paths not valid are registered).
	toLoad, full := addedRows, len(repaired) > 0 || !rooted
	if full {
		if toLoad, err = a.rows(ctx, gen, 0); err != nil {
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
