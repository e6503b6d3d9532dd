package builder

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/strata-nix/strata/api"
	"golang.org/x/sys/unix"
)

// Failover. The agent watches the server in use (monitor): its API
// (GET /v1/generations) and its NFS export as this builder's kernel sees
// it (statfs of every lower of the overlay, which always asks the server,
// each in a goroutine of its own: the mount is hard, so a call to a dead
// server blocks until the server returns or the mount is forced off). When both have answered
// nothing else is done. When either has gone unanswered for failover.after
// without a break, or at once when gossip declares the server dead and its
// API does not answer, the agent fails over (Failover):
//
//  1. It asks the other servers, best first (server.prefer, then gossip
//     RTT), for their generations, and takes the first one that serves
//     every generation of the overlay's lowers with the same registration
//     sha256.
//  2. It mounts those generations from that server (lower/<N>@<server>)
//     and swaps the overlay to them exactly as a rotation does (same upper,
//     fresh workdir, overlay.Swap): no import, the registration is the
//     same. Path lookups see the new overlay at once.
//  3. It force-unmounts the dead server's lowers (Mounter.ForceUnmount), so
//     that nothing waits on them for ever; what processes holding files
//     open on them see is in the README (Failover).
//
// When no other server serves the mounted generation, the agent rotates to
// the newest generation of the first other server that answers (a normal
// rotation through it, the delta worked out locally) and says so. The
// server in use then stays the one in use, even when the old one comes
// back (no flapping), until a rotation finds a more preferred server with
// the new generation, or `strata builder rotate --server X`.

// health is the server in use as the monitor last saw it.
type health struct {
	// Since is when the current run of unanswered probes began (zero:
	// the last probe was answered).
	Since time.Time
	// Reason describes the last failed probe.
	Reason string
	// Attempts counts the failovers tried in this outage that failed;
	// AttemptError is the last one's error. An outage is logged once when
	// it begins, once when its first failover attempt fails, and once
	// when it ends, however long it lasts.
	Attempts     int
	AttemptError string
}

type failoverRequest struct {
	reason string
	reply  chan error
}

type rotateRequest struct {
	server string // rotate --server: move to this server
	reply  chan error
}

// probeInterval is how often the monitor probes the server in use:
// failover.after / 5, between 200 ms and 5 s.
func probeInterval(after time.Duration) time.Duration {
	return min(max(after/5, 200*time.Millisecond), 5*time.Second)
}

// shouldFailover decides from one probe: the run of failures began at
// since (zero: none), apiErr and nfsErr are this probe's failures, dead
// whether gossip declares the server dead. It returns whether to fail
// over now and the reason.
func shouldFailover(now, since time.Time, after time.Duration, apiErr, nfsErr error, dead bool, deadWhy string) (bool, string) {
	if apiErr == nil && nfsErr == nil {
		return false, ""
	}
	var why []string
	if dead {
		why = append(why, deadWhy)
	}
	if apiErr != nil {
		why = append(why, "api: "+apiErr.Error())
	}
	if nfsErr != nil {
		why = append(why, "nfs: "+nfsErr.Error())
	}
	reason := strings.Join(why, "; ")
	if dead && apiErr != nil {
		return true, reason
	}
	if after > 0 && !since.IsZero() && now.Sub(since) >= after {
		return true, fmt.Sprintf("unanswered for %s: %s", now.Sub(since).Round(100*time.Millisecond), reason)
	}
	return false, reason
}

// lowerProbe is one statfs of a lower, in its own goroutine (it may block
// until the mount is forced off).
type lowerProbe struct {
	dir   string
	began time.Time
	done  chan error
}

// statfsLower asks the NFS server of the mount at dir for its file system
// statistics (NFSv3 FSSTAT: never answered from the client's cache).
func statfsLower(dir string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fmt.Errorf("statfs %s: %w", dir, err)
	}
	return nil
}

// monitor probes the server in use every probeInterval and asks the
// agent's loop to fail over when shouldFailover says so, until ctx ends.
func (a *Agent) monitor(ctx context.Context) {
	every := probeInterval(a.cfg.FailoverAfter)
	t := time.NewTicker(every)
	defer t.Stop()
	probes := map[string]*lowerProbe{} // pending statfs by lower dir
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		st := a.State()
		// Probed in every phase: a rotation under way gives up a call that
		// makes no progress (stall), and the failover request waits for it.
		if !a.Ready() || len(st.Lowers) == 0 {
			continue
		}
		e := a.Current()
		// Every lower of the overlay, each on its own server (all the
		// server in use's, unless a state from an older agent says
		// otherwise): a hung one hangs lookups that reach it.
		var nfsErrs []error
		var oldest time.Time
		wait := time.After(min(every, time.Second))
		servers := []Endpoint{e}
		for _, x := range st.Lowers {
			dir := a.lowerPath(x)
			p := probes[dir]
			if p == nil {
				p = &lowerProbe{dir: dir, began: time.Now(), done: make(chan error, 1)}
				probes[dir] = p
				go func(p *lowerProbe) { p.done <- a.probeLower(p.dir) }(p)
			}
			select {
			case err := <-p.done:
				delete(probes, dir)
				if err != nil {
					nfsErrs = append(nfsErrs, err)
				}
			case <-wait:
				wait = closedChan
				nfsErrs = append(nfsErrs, fmt.Errorf("statfs %s unanswered for %s", dir, time.Since(p.began).Round(100*time.Millisecond)))
				if oldest.IsZero() || p.began.Before(oldest) {
					oldest = p.began
				}
			}
			if xe := a.endpointOf(x); !slices.ContainsFunc(servers, func(s Endpoint) bool { return normAPI(s.API) == normAPI(xe.API) }) {
				servers = append(servers, xe)
			}
		}
		for dir := range probes { // lowers no longer in the overlay
			if !slices.ContainsFunc(st.Lowers, func(x Lower) bool { return a.lowerPath(x) == dir }) {
				delete(probes, dir)
			}
		}
		nfsErr := errors.Join(nfsErrs...)
		var apiErrs []error
		for _, s := range servers {
			pctx, cancel := context.WithTimeout(ctx, max(every, time.Second))
			_, err := a.dir.Client(s).Generations(pctx)
			cancel()
			if err != nil {
				if normAPI(s.API) != normAPI(e.API) {
					err = fmt.Errorf("%s (of a lower): %w", s, err)
				}
				apiErrs = append(apiErrs, err)
			}
		}
		apiErr := errors.Join(apiErrs...)
		if ctx.Err() != nil {
			return
		}
		dead, deadWhy := a.dir.Dead(e)
		now := time.Now()
		a.mu.Lock()
		h := a.health
		if apiErr == nil && nfsErr == nil {
			a.health = health{}
		} else if h.Since.IsZero() {
			a.health.Since = now
			if !oldest.IsZero() && oldest.Before(now) {
				a.health.Since = oldest
			}
		}
		since := a.health.Since
		a.mu.Unlock()
		if apiErr == nil && nfsErr == nil {
			if !h.Since.IsZero() {
				a.log.Info("server answers again", "server", e.String(), "after", now.Sub(h.Since).Round(100*time.Millisecond),
					"failed_failovers", h.Attempts)
			}
			continue
		}
		if apiErr != nil && errors.Is(apiErr, context.Canceled) {
			continue
		}
		do, reason := shouldFailover(now, since, a.cfg.FailoverAfter, apiErr, nfsErr, dead, deadWhy)
		a.mu.Lock()
		a.health.Reason = reason
		a.mu.Unlock()
		if h.Since.IsZero() {
			a.log.Warn("server does not answer", "server", e.String(), "reason", reason, "failover_after", a.cfg.FailoverAfter)
		}
		if !do {
			continue
		}
		reply := make(chan error, 1)
		select {
		case a.failover <- failoverRequest{reason: reason, reply: reply}:
		case <-ctx.Done():
			return
		}
		var err error
		select {
		case err = <-reply:
		case <-ctx.Done():
			return
		}
		a.mu.Lock()
		if err == nil {
			a.health = health{}
		} else {
			a.health.Attempts++
			a.health.AttemptError = err.Error()
		}
		n := a.health.Attempts
		a.mu.Unlock()
		if n == 1 {
			a.log.Error("failover failed; still on the server that does not answer, retrying every probe (logged once per outage; status shows the attempts)",
				"server", e.String(), "err", err)
		} else if err != nil {
			a.log.Debug("failover failed again", "server", e.String(), "attempts", n, "err", err)
		}
	}
}

// closedChan is ready at once: once one probe waited its time, the
// others of the same round are not waited for again.
var closedChan = func() <-chan time.Time {
	c := make(chan time.Time)
	close(c)
	return c
}()

func (a *Agent) probeLower(dir string) error {
	if a.probe != nil {
		return a.probe(dir)
	}
	return statfsLower(dir)
}

// Failover moves the store dir off the server in use, which does not
// answer (reason says how), to another live server (see the comment at
// the top of this file). On error nothing changed: the store dir still
// serves the old server's lowers.
func (a *Agent) Failover(ctx context.Context, reason string) error {
	st := a.State()
	old := a.Current()
	if st.Phase != PhaseIdle && st.Phase != PhaseImporting {
		return fmt.Errorf("fail over from %s: agent is %s", old, st)
	}
	a.mu.Lock()
	retry := a.health.Attempts > 0
	a.mu.Unlock()
	lvl := slog.LevelWarn
	if retry {
		lvl = slog.LevelDebug // logged at the outage's first attempt
	}
	a.log.Log(ctx, lvl, "failing over: the server in use does not answer", "server", old.String(), "reason", reason,
		"generation", st.Generation)
	var answered []Endpoint
	var lists []api.GenerationList
	var errs []error
	for _, c := range a.dir.Candidates() {
		if normAPI(c.API) == normAPI(old.API) {
			continue
		}
		l, err := a.list(ctx, c.Endpoint)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if a.servesLowers(l, st.Lowers) {
			return a.moveTo(ctx, c.Endpoint, l, reason, true)
		}
		answered = append(answered, c.Endpoint)
		lists = append(lists, l)
	}
	for i, e := range answered {
		n := len(lists[i].Generations)
		if n == 0 || lists[i].Generations[n-1].ID <= st.Generation {
			errs = append(errs, fmt.Errorf("server %s does not serve generation %d or a newer one", e, st.Generation))
			continue
		}
		newest := lists[i].Generations[n-1].ID
		a.log.Warn("no other server serves the mounted generation; rotating to the newest generation of another server",
			"generation", st.Generation, "server", e.String(), "to", newest)
		began := time.Now()
		if err := a.rotateVia(ctx, e, lists[i], newest, true); err != nil {
			errs = append(errs, err)
			continue
		}
		rec := Failover{At: time.Now(), From: old.String(), To: e.String(), Reason: reason, Generation: newest, Rotated: true,
			Took: time.Since(began)}
		a.log.Warn("failed over by rotating", "from", old.String(), "to", e.String(), "generation", newest, "reason", reason)
		return a.transition(func(s *State) { s.Failovers++; s.LastFailover = &rec })
	}
	if len(errs) == 0 {
		return fmt.Errorf("fail over from %s: no other server known", old)
	}
	return fmt.Errorf("fail over from %s: %w", old, errors.Join(errs...))
}

// servesLowers reports whether l lists every generation of lowers, each
// with the registration sha256 the state recorded (when it did).
func (a *Agent) servesLowers(l api.GenerationList, lowers []Lower) bool {
	for _, x := range lowers {
		if !hasGeneration(l, x.Gen, x.SHA256) {
			return false
		}
	}
	return len(lowers) > 0
}

// SwitchServer makes the store dir serve server name's generations now
// (`strata builder rotate --server X`): a rotation through it when it has
// a newer generation than the mounted one, else the mounted generation
// from it (the same swap as a failover, the old server's lowers detached,
// not forced: it is alive). name is a gossip member name or an API URL.
func (a *Agent) SwitchServer(ctx context.Context, name string) error {
	cs := a.dir.Candidates()
	i := slices.IndexFunc(cs, func(c Candidate) bool { return c.Is(name) })
	if i < 0 {
		var known []string
		for _, c := range cs {
			known = append(known, c.String())
		}
		return fmt.Errorf("rotate to server %q: not a live server this builder knows (it knows %s)", name, strings.Join(known, ", "))
	}
	e := cs[i].Endpoint
	l, err := a.list(ctx, e)
	if err != nil {
		return fmt.Errorf("rotate to server %s: %w", e, err)
	}
	st := a.State()
	if n := len(l.Generations); n > 0 && l.Generations[n-1].ID > st.Generation {
		return a.rotateVia(ctx, e, l, l.Generations[n-1].ID, false)
	}
	if normAPI(e.API) == normAPI(a.Current().API) {
		return nil // in use, nothing newer
	}
	if !a.servesLowers(l, st.Lowers) {
		return fmt.Errorf("rotate to server %s: it does not serve generation %d (lowers %v) with the same registration, nor a newer one",
			e, st.Generation, gens(st.Lowers))
	}
	return a.moveTo(ctx, e, l, "requested (strata builder rotate --server)", false)
}

// moveTo swaps the store dir's overlay to the same lowers mounted from
// server e (whose generations are l), then releases the old server's
// lowers: forced when auto (a failover from a dead server), detached
// otherwise. An error before the swap leaves everything as it was.
func (a *Agent) moveTo(ctx context.Context, e Endpoint, l api.GenerationList, reason string, auto bool) (err error) {
	st := a.State()
	old := a.Current()
	began := time.Now()
	phase := st.Phase
	var next []Lower
	defer func() {
		if err != nil {
			err = fmt.Errorf("move generation %d from %s to %s: %w", st.Generation, old, e, err)
			a.setError(err)
		}
	}()
	undo := func() {
		if rerr := a.releaseLowers(context.WithoutCancel(ctx), st.Lowers, nil); rerr != nil {
			a.log.Warn("release lowers after a failed move", "err", rerr)
		}
	}
	for _, x := range st.Lowers {
		n, err := a.ensureLower(ctx, e, x.Gen)
		if err != nil {
			undo()
			return err
		}
		n.Kept, n.SHA256 = x.Kept, registrationSHA(l, x.Gen)
		next = append(next, n)
	}
	// A dead server's lowers are forced off once released; recorded
	// before the swap, so a restart honours it.
	var force []string
	if auto {
		for _, x := range st.Lowers {
			force = append(force, x.name())
		}
	}
	retired, hasRetired := a.retiring(st.Lowers, next)
	if err := a.transition(func(s *State) {
		s.Phase, s.Target, s.Next, s.ForceRelease = PhaseSwapping, st.Generation, next, union(s.ForceRelease, force)
		if hasRetired {
			s.Retired = withRetired(s.Retired, retired)
		}
	}); err != nil {
		undo()
		return err
	}
	back := func(err error) error {
		if terr := a.transition(func(s *State) {
			s.Phase, s.Target, s.Next, s.ForceRelease = phase, 0, nil, without(s.ForceRelease, without(force, st.ForceRelease))
			if hasRetired {
				s.Retired = withoutRetired(s.Retired, retired.Overlay.Work)
			}
		}); terr != nil {
			a.log.Error("persist state", "err", terr)
		}
		undo()
		return err
	}
	work, err := newWorkdir(a.cfg, st.Generation)
	if err != nil {
		return back(err)
	}
	ol := a.layers(next, work)
	res, err := a.swapLayers(ctx, ol)
	if err != nil && !res.Switched {
		return back(err)
	}
	if err != nil {
		a.log.Warn("the swap switched to the new overlay, then failed; carrying on with the move", "err", err)
	}
	swapTook := time.Since(began)
	a.mu.Lock()
	a.cur = e
	a.method = res.Method
	a.health = health{}
	a.mu.Unlock()
	rec := Failover{At: time.Now(), From: old.String(), To: e.String(), Reason: reason, Generation: st.Generation, Took: swapTook}
	after := PhaseReleasing
	if phase == PhaseImporting {
		after = PhaseImporting
	}
	if terr := a.transition(func(s *State) {
		s.Phase, s.Lowers, s.PrevWork, s.Work, s.Target, s.Next, s.Server = after, next, s.Work, work, 0, nil, e
		s.LastFailover, s.LastError = &rec, ""
		if auto {
			s.Failovers++
		}
	}); terr != nil {
		return terr
	}
	if rerr := a.releaseLowers(ctx, next, a.forced(a.State())); rerr != nil {
		a.log.Warn("release the old server's lowers", "err", rerr)
	}
	a.sweepRetired()
	a.pruneWorkdirs(work, st.Work)
	left := a.stillForced(a.State())
	if err := a.transition(func(s *State) {
		s.ForceRelease = left
		if phase == PhaseIdle {
			s.Phase = PhaseIdle
		}
	}); err != nil {
		return err
	}
	a.notify(fmt.Sprintf("STATUS=serving generation %d from %s", st.Generation, e))
	if auto {
		a.log.Warn("failed over", "from", old.String(), "to", e.String(), "generation", st.Generation, "reason", reason,
			"until_swap", swapTook.Round(time.Millisecond), "took", time.Since(began).Round(time.Millisecond))
	} else {
		a.log.Info("moved to another server", "from", old.String(), "to", e.String(), "generation", st.Generation,
			"took", time.Since(began).Round(time.Millisecond))
	}
	return nil
}
