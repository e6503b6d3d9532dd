package builder

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Run starts the agent (Start, retried with exponential backoff from 1 s to
// 1 min while the server is unreachable or a mount fails; the agent is not
// READY meanwhile), sends READY=1, then checks for a newer generation every
// rotate.check_interval, on Wake (gossip) and on RequestRotation until ctx
// ends. Once ready, with failover.after set, a monitor watches the server
// in use and the loop fails over when it asks (see Failover). It returns
// nil when ctx is cancelled: mounts stay for the next start.
func (a *Agent) Run(ctx context.Context) error {
	backoff := time.Second
	for {
		a.step.Begin()
		err := a.Start(ctx)
		a.step.End()
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return nil
		}
		a.setError(err)
		a.log.Error("builder not ready; retrying", "err", err, "retry_in", backoff)
		a.notify("STATUS=not ready: " + err.Error())
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		case <-a.wake:
		}
		backoff = min(2*backoff, time.Minute)
	}
	a.log.Info("ready", "generation", a.State().Generation, "store", a.cfg.StoreDir, "server", a.Current().String())
	if a.cfg.FailoverAfter > 0 {
		mctx, stop := context.WithCancel(ctx)
		defer stop()
		go a.monitor(mctx)
	}

	t := time.NewTicker(a.cfg.CheckInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			a.step.Begin()
			err := a.Check(ctx, false)
			a.step.End()
			if err != nil && ctx.Err() == nil {
				a.log.Warn("check for a newer generation", "err", err)
			}
		case <-a.wake:
			a.step.Begin()
			err := a.Check(ctx, false)
			a.step.End()
			if err != nil && ctx.Err() == nil && !errors.Is(err, ErrBusy) {
				a.log.Warn("check for a newer generation (announced by gossip)", "err", err)
			}
		case r := <-a.rotateReq:
			a.step.Begin()
			if r.server != "" {
				r.reply <- a.SwitchServer(ctx, r.server)
			} else {
				r.reply <- a.Check(ctx, true)
			}
			a.step.End()
		case r := <-a.failover:
			a.step.Begin()
			r.reply <- a.Failover(ctx, r.reason)
			a.step.End()
		}
	}
}

// ErrBusy is returned by Check when the idle policy defers a rotation.
var ErrBusy = errors.New("a build is running; rotation deferred")

// Check first drops retired overlays nothing uses any more (see Retired),
// then asks the server for its newest generation and rotates to it when
// it is newer than the mounted one. With the idle policy it first waits
// for no build to run (Busy), at most rotate.max_wait from the first time
// it deferred; force skips the policy. An import left unfinished by an
// earlier failure is retried first. When a server ranked above the one in
// use (server.prefer, RTT) has a generation newer than the mounted one and
// at least as new as the one in use has, and it serves every mounted
// generation with the same registration (so no lower stays on the old
// server), the rotation goes through it, and it becomes the server in
// use: that is the only time the agent goes back to a preferred server by
// itself.
func (a *Agent) Check(ctx context.Context, force bool) error {
	if st := a.State(); a.sweepRetired() {
		a.pruneWorkdirs(st.Work, st.PrevWork)
	}
	// Left by a failed step: an unfinished import (Importing); a rotation
	// whose end could not be recorded (Releasing: the state dir was full);
	// or, after an error, a mounted generation without a valid GC root
	// (its root could not be written into a full upper). Each is finished
	// here, as Start finishes it after a restart: the generation's rows
	// are imported again (only paths not valid yet) and rooted, then the
	// unused lowers released.
	if st := a.State(); st.Phase == PhaseImporting || st.Phase == PhaseReleasing ||
		(st.Generation != 0 && st.LastError != "" && !a.rooted(ctx)) {
		if st.Phase != PhaseImporting {
			a.log.Warn("finishing the last rotation or start: importing and rooting the mounted generation again, then releasing",
				"generation", st.Generation, "state", st.String(), "last_error", st.LastError)
		}
		unlock, err := a.gcLock(ctx)
		if err != nil {
			return err
		}
		err = a.importFull(ctx, st.Generation)
		unlock()
		if err != nil {
			a.setError(err)
			return err
		}
		if err := a.release(ctx); err != nil {
			return err
		}
	}
	l, err := a.generations(ctx)
	if err != nil {
		a.setError(err)
		return err
	}
	if len(l.Generations) == 0 {
		return nil
	}
	via, vl := a.Current(), l
	newest := l.Generations[len(l.Generations)-1].ID
	if cs := a.dir.Candidates(); len(cs) > 0 && normAPI(cs[0].API) != normAPI(via.API) {
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		bl, err := a.dir.Client(cs[0].Endpoint).Generations(pctx)
		cancel()
		// Only through a server that serves every mounted generation: no
		// lower, kept ones included, may stay on another server.
		if n := len(bl.Generations); err == nil && n > 0 && bl.Generations[n-1].ID >= newest && bl.Generations[n-1].ID > a.State().Generation &&
			a.servesLowers(bl, a.State().Lowers) && (bl.StoreDir == "" || a.checkStoreDir(bl.StoreDir, "") == nil) {
			via, vl, newest = cs[0].Endpoint, bl, bl.Generations[n-1].ID
		}
	}
	if newest <= a.State().Generation {
		return nil
	}
	if !force && a.cfg.Policy == PolicyIdle {
		busy, why, err := a.busy()
		if err != nil {
			return err
		}
		a.mu.Lock()
		if a.waitSince.IsZero() {
			a.waitSince = time.Now()
		}
		waited := time.Since(a.waitSince)
		a.mu.Unlock()
		if busy && waited < a.cfg.MaxWait {
			a.log.Info("newer generation waits for builds to end", "generation", newest, "lock", why,
				"waited", waited.Round(time.Second), "max_wait", a.cfg.MaxWait)
			return fmt.Errorf("rotate to generation %d: %w (%s)", newest, ErrBusy, why)
		}
		if busy {
			a.log.Warn("rotating although a build runs: rotate.max_wait reached", "generation", newest, "lock", why)
		}
	}
	a.mu.Lock()
	a.waitSince = time.Time{}
	a.mu.Unlock()
	return a.rotateVia(ctx, via, vl, newest, false)
}

// RequestRotation asks the running agent to check for a newer generation
// now and rotate to it regardless of the policy, and waits for the result.
// With server set (a gossip member name or an API URL) it moves to that
// server instead (SwitchServer).
func (a *Agent) RequestRotation(ctx context.Context, server string) error {
	reply := make(chan error, 1)
	select {
	case a.rotateReq <- rotateRequest{server: server, reply: reply}:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-reply:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}
