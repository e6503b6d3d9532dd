package builder

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/overlay"
)

// Start brings the store dir to a consistent, served generation, once:
//
//   - It reconciles the state file with the mount table. An overlay of the
//     agent's (its upperdir is state_dir/upper) visible at the store dir is
//     re-adopted as it is, without remounting. If a rotation was cut short
//     after its swap began, and the new overlay is mounted beneath the old
//     one, the old one is detached, which completes the swap atomically.
//     A rotation cut short before its swap is abandoned: the overlay stays,
//     the new generation's lower is detached (the next check starts the
//     rotation again; invalidation already done is not redone).
//   - With no overlay of its own at the store dir (first start, or a
//     reboot), it mounts the generation the state names (or the server's
//     newest on first start) with a fresh workdir and the same upper. When
//     the server no longer has the generation the state names (retired
//     while the builder was stopped), it mounts the newest, and first
//     invalidates what leaves, as a rotation would (leavingRetired): the
//     old generation's paths the newest lacks (its GC root lists them) and
//     every local path that refers to them, so that every valid path is
//     readable.
//   - The registration is imported (only paths not valid yet) on first
//     start, after a reboot, and when a cut-short rotation had swapped but
//     not finished importing.
//   - Lowers the overlay does not use are detached, unused workdirs pruned.
//
// Until the overlay is mounted the store dir is untouched. Start needs the
// server only when it must mount or import; an error leaves everything
// mounted so far in place for the next attempt.
func (a *Agent) Start(ctx context.Context) error {
	ms, err := a.m.Mounts()
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	st := a.State()
	// A swap may have happened iff the rotation reached Swapping.
	forward := st.Target != 0 && (st.Phase == PhaseSwapping || st.Phase == PhaseImporting ||
		(st.Phase == PhaseMounting && st.Generation == 0))

	// isTarget: l is the top lower of the overlay the rotation (or
	// failover: same generation, another server) was swapping to.
	isTarget := func(l Lower) bool {
		if len(st.Next) > 0 {
			return l.name() == st.Next[0].name()
		}
		return l.Gen == st.Target
	}
	all, top, hasTop := a.ourOverlays(ms)
	if hasTop && forward {
		if g, _, err := a.lowersOf(top); err == nil && !isTarget(g[0]) {
			for _, m := range all {
				if mg, _, err := a.lowersOf(m); err == nil && m.ID != top.ID && isTarget(mg[0]) {
					a.log.Warn("completing an interrupted swap: detaching the old overlay above the new one",
						"old", g[0].name(), "new", mg[0].name())
					if err := a.m.Detach(ctx, a.cfg.StoreDir); err != nil {
						return fmt.Errorf("start: complete interrupted swap: %w", err)
					}
					if ms, err = a.m.Mounts(); err != nil {
						return fmt.Errorf("start: %w", err)
					}
					all, top, hasTop = a.ourOverlays(ms)
					break
				}
			}
		}
	}
	if len(all) > 1 {
		a.log.Warn("more than one strata overlay at the store dir; only the visible one is used", "count", len(all))
	}

	if hasTop {
		lg, work, err := a.lowersOf(top)
		if err != nil {
			return fmt.Errorf("start: adopt overlay at %s: %w", a.cfg.StoreDir, err)
		}
		lowers := lowersFor(lg, st)
		// The overlay serves the generation the state names and no
		// rotation to it is unfinished (a failover cut short, before or
		// after its swap, is Swapping with Target the same generation:
		// nothing to import): adopt it with the server its top lower
		// comes from.
		failover := st.Phase == PhaseSwapping && st.Target == st.Generation
		if st.Generation != 0 && lg[0].Gen == st.Generation && (lg[0].Gen != st.Target || failover) {
			e := a.endpointOf(lg[0])
			a.mu.Lock()
			a.cur = e
			a.mu.Unlock()
			if st.Phase == PhaseIdle || st.Phase == PhaseReleasing {
				a.log.Info("re-adopted mounted overlay", "generation", lg[0].Gen, "lowers", gens(lg), "mount_id", top.ID)
			} else {
				a.log.Warn("re-adopted mounted overlay; abandoning the interrupted rotation", "generation", lg[0].Gen,
					"state", st.String())
			}
			if err := a.transition(func(s *State) {
				s.Phase, s.Lowers, s.Work, s.Target, s.Next, s.Server = PhaseReleasing, lowers, work, 0, nil, e
			}); err != nil {
				return err
			}
			if !a.rooted(ctx) {
				// A rotation cut short after it dropped the old root.
				a.log.Warn("the mounted generation has no valid GC root; importing and rooting it again", "generation", lg[0].Gen)
				unlock, err := a.gcLock(ctx)
				if err != nil {
					return fmt.Errorf("start: %w", err)
				}
				err = a.importFull(ctx, lg[0].Gen)
				unlock()
				if err != nil {
					return fmt.Errorf("start: %w", err)
				}
			}
		} else {
			// The swap to Target happened (or the state file does not know
			// this overlay): finish importing.
			a.log.Warn("re-adopted mounted overlay; finishing its import", "generation", lg[0].Gen, "state", st.String())
			prev := st.Work
			if prev == work {
				prev = st.PrevWork
			}
			// The rotation may have gone through another server (a
			// failover, rotate --server): its top lower's is in use now.
			e := a.endpointOf(lg[0])
			a.mu.Lock()
			a.cur = e
			a.mu.Unlock()
			if err := a.transition(func(s *State) {
				s.Phase, s.Generation, s.Lowers, s.Work, s.PrevWork, s.Target, s.Server = PhaseImporting, lg[0].Gen, lowers, work, prev, lg[0].Gen, e
			}); err != nil {
				return err
			}
			unlock, err := a.gcLock(ctx)
			if err != nil {
				return fmt.Errorf("start: %w", err)
			}
			err = a.importFull(ctx, lg[0].Gen)
			unlock()
			if err != nil {
				return fmt.Errorf("start: %w", err)
			}
		}
		if err := a.release(ctx); err != nil {
			return err
		}
		a.setReady()
		return nil
	}

	// Nothing of ours is mounted: first start or reboot. Mount.
	var want []Lower
	switch {
	case forward && len(st.Next) > 0:
		want = st.Next
	case st.Generation != 0 && len(st.Lowers) > 0:
		want = st.Lowers
	}
	l, err := a.generations(ctx)
	if err != nil && len(a.dir.Candidates()) > 1 {
		// Nothing is mounted: any server that answers will do.
		a.log.Warn("the server in use does not answer; trying the others", "server", a.Current().String(), "err", err)
		if l2, err2 := a.pickServer(ctx); err2 == nil {
			l, err = l2, nil
		}
	}
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	gone := false // the generation the state names was retired
	if len(want) > 0 && !slices.ContainsFunc(l.Generations, func(g api.Generation) bool { return g.ID == want[0].Gen }) {
		a.log.Warn("the generation this builder had mounted is no longer live on the server; mounting the newest",
			"generation", want[0].Gen)
		want, gone = nil, true
	}
	if len(want) == 0 {
		if len(l.Generations) == 0 {
			return errors.New("start: the server has no generation yet")
		}
		want = []Lower{{Gen: l.Generations[len(l.Generations)-1].ID}}
	}
	g := want[0].Gen
	began := time.Now()
	// The retired generation's paths that g does not have, and the local
	// paths that need them, are invalidated before the overlay is mounted
	// (they are unreadable already: nothing mounts it any more).
	var leaving []string
	if gone {
		inv, extra, err := a.leavingRetired(ctx, a.Current(), l, st, g)
		if err != nil {
			return fmt.Errorf("start: %w", err)
		}
		leaving, want = inv, append(want, extra...)
	}
	if err := a.transition(func(s *State) { s.Phase, s.Target, s.Next = PhaseMounting, g, want }); err != nil {
		return err
	}
	// Every lower comes from the server in use (it may differ from the
	// one the state names after a restart while that one was down).
	e := a.Current()
	for i := range want {
		want[i].Server, want[i].Dir, want[i].SHA256 = e.API, "", registrationSHA(l, want[i].Gen)
	}
	if err := a.releaseLowers(ctx, want, a.forced(st)); err != nil {
		a.log.Warn("release stale lowers", "err", err)
	}
	for i, x := range want {
		k, err := a.ensureLower(ctx, e, x.Gen)
		if err != nil {
			return fmt.Errorf("start: %w", err)
		}
		want[i].Dir = k.Dir
	}
	// No garbage collection from before the overlay is mounted until its
	// paths are registered and rooted: it would delete them as invalid.
	unlock, err := a.gcLock(ctx)
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	defer unlock()
	if len(leaving) > 0 {
		if err := a.nix.Invalidate(ctx, leaving); err != nil {
			return fmt.Errorf("start: %w", err)
		}
		a.log.Info("paths of the retired generation left", "generation", st.Generation, "invalidated", len(leaving))
	}
	if _, err := a.repairHidden(a.lowerPath(want[0])); err != nil {
		return fmt.Errorf("start: %w", err)
	}
	work, err := newWorkdir(a.cfg, g)
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	if err := a.ensureLocal(ctx); err != nil {
		return fmt.Errorf("start: %w", err)
	}
	ol := a.layers(want, work)
	err = a.m.MountOverlay(ctx, a.cfg.StoreDir, ol)
	if err != nil && mayBeMetacopy(err, ol) {
		ol.Metacopy = false
		if a.m.MountOverlay(ctx, a.cfg.StoreDir, ol) == nil {
			a.metacopyOff(err)
			err = nil
		}
	}
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	a.log.Info("mounted overlay", "store", a.cfg.StoreDir, "generation", g, "lowers", gens(want), "server", e.String())
	if err := a.transition(func(s *State) {
		s.Phase, s.Generation, s.Lowers, s.PrevWork, s.Work, s.Server = PhaseImporting, g, want, "", work, e
	}); err != nil {
		return err
	}
	if err := a.importFull(ctx, g); err != nil {
		return fmt.Errorf("start: %w", err)
	}
	if err := a.transition(func(s *State) {
		s.LastRotation, s.LastRotationDuration = time.Now(), time.Since(began)
	}); err != nil {
		return err
	}
	if err := a.release(ctx); err != nil {
		return err
	}
	a.setReady()
	return nil
}

// lowersFor pairs the lowers of a mounted overlay with what the state
// knows of their mountpoints (kept paths, registration sha256).
func lowersFor(ls []Lower, st State) []Lower {
	known := map[string]Lower{}
	for _, l := range append(slices.Clone(st.Lowers), st.Next...) {
		known[l.name()] = l
	}
	out := slices.Clone(ls)
	for i := range out {
		k := known[out[i].name()]
		out[i].SHA256 = k.SHA256
		if i > 0 {
			out[i].Kept = k.Kept
		}
	}
	return out
}

// importFull registers generation g's whole registration (into an empty
// DB by installing the generation's DB, see installDB; else only paths
// not valid yet are loaded; unreadable ones are skipped, see load), roots the
// generation for garbage collection, then marks the state Releasing. The
// caller holds the GC lock.
func (a *Agent) importFull(ctx context.Context, g uint64) error {
	// A DB without valid paths takes the generation's whole DB instead
	// of its rows (installdb.go).
	if n, msg, ok := a.installDB(ctx, g); ok {
		return a.transition(func(s *State) {
			s.Phase, s.Target, s.Next, s.PathsImported, s.LastError = PhaseReleasing, 0, nil, n, msg
		})
	}
	rows, err := a.rows(ctx, g, 0)
	if err != nil {
		return err
	}
	began := time.Now()
	n, _, msg, err := a.importRooted(ctx, g, rows, true, nil)
	if err != nil {
		return fmt.Errorf("import generation %d: %w", g, err)
	}
	a.log.Info("imported generation", "generation", g, "paths", len(rows.Paths), "new", n, "took", time.Since(began).Round(time.Millisecond))
	return a.transition(func(s *State) {
		s.Phase, s.Target, s.Next, s.PathsImported, s.LastError = PhaseReleasing, 0, nil, n, msg
	})
}

// without returns ps minus the paths in drop.
func without(ps, drop []string) []string {
	if len(drop) == 0 {
		return ps
	}
	d := make(map[string]bool, len(drop))
	for _, p := range drop {
		d[p] = true
	}
	out := make([]string, 0, len(ps))
	for _, p := range ps {
		if !d[p] {
			out = append(out, p)
		}
	}
	return out
}

// release detaches lowers the overlay no longer uses, drops retired
// overlays nothing uses any more, prunes workdirs and marks the state Idle.
func (a *Agent) release(ctx context.Context) error {
	st := a.State()
	if err := a.releaseLowers(ctx, st.Lowers, a.forced(st)); err != nil {
		a.log.Warn("release old lowers", "err", err)
	}
	a.sweepRetired()
	a.pruneWorkdirs(st.Work, st.PrevWork)
	left := a.stillForced(st)
	return a.transition(func(s *State) { s.Phase, s.Target, s.Next, s.ForceRelease = PhaseIdle, 0, nil, left })
}

// forced is the releaseLowers force predicate of st: the lowers of a dead
// server a failover moved off (State.ForceRelease).
func (a *Agent) forced(st State) func(string) bool {
	if len(st.ForceRelease) == 0 {
		return nil
	}
	return func(name string) bool { return slices.Contains(st.ForceRelease, name) }
}

// union returns a with the names of b it lacks.
func union(a, b []string) []string {
	out := slices.Clone(a)
	for _, n := range b {
		if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}

// stillForced returns the names of st.ForceRelease still mounted under
// lower/ and not in use (a release that failed): the next release forces
// them again.
func (a *Agent) stillForced(st State) []string {
	var left []string
	for _, n := range st.ForceRelease {
		x := Lower{Dir: n}
		if !slices.ContainsFunc(st.Lowers, func(l Lower) bool { return l.name() == n }) && a.isMounted(x) {
			left = append(left, n)
		}
	}
	return left
}

func (a *Agent) setReady() {
	a.mu.Lock()
	first := !a.ready
	a.ready = true
	g := a.st.Generation
	a.mu.Unlock()
	if first {
		a.notify("READY=1")
	}
	a.notify(fmt.Sprintf("STATUS=serving generation %d", g))
}

func newWorkdir(cfg Config, g uint64) (string, error) {
	return overlay.NewWorkdir(cfg.workRoot(), fmt.Sprintf("gen%d-", g))
}
