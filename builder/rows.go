package builder

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/nixstore"
)

// rows fetches generation gen's path rows from the server (all of them, or
// with from > 0 those added or changed since generation from). A
// generation published before the server wrote rows answers 404: then the
// registration text (or the delta's added part) stands in, without
// signatures or content addresses, and the log says so.
func (a *Agent) rows(ctx context.Context, gen, from uint64) (*nixstore.Rows, error) {
	return a.rowsFrom(ctx, a.client(), gen, from)
}

// rowsFrom is rows from server srv. The transfer is given up when it
// makes no progress (no byte) for the stall time (see Agent.stall), so a
// server that dies in the middle does not hold the agent up.
func (a *Agent) rowsFrom(ctx context.Context, srv Server, gen, from uint64) (*nixstore.Rows, error) {
	ctx, touch, stop := stallGuard(ctx, a.stall())
	defer stop()
	body, err := srv.Paths(ctx, gen, from)
	var se *api.StatusError
	if errors.As(err, &se) && se.Code == http.StatusNotFound {
		a.log.Warn("server has no path rows for this generation; importing its registration (no signatures or ca)",
			"generation", gen, "from", from, "reason", se.Message)
		rs, err := a.registrationRows(ctx, srv, gen, from)
		return rs, stalled(ctx, err)
	}
	if err != nil {
		return nil, fmt.Errorf("fetch path rows of generation %d: %w", gen, stalled(ctx, err))
	}
	defer body.Close()
	h, rs, err := nixstore.ReadRows(progressReader{r: body, touch: touch})
	if err != nil {
		return nil, fmt.Errorf("path rows of generation %d: %w", gen, stalled(ctx, err))
	}
	if h.Generation != gen || h.From != from {
		return nil, fmt.Errorf("path rows: asked for generation %d from %d, got %d from %d", gen, from, h.Generation, h.From)
	}
	// A server too old to say its store dir in its generation list says
	// it here, before a rotation mounts anything.
	if err := a.checkStoreDir(h.StoreDir, fmt.Sprintf("the path rows of generation %d are of", gen)); err != nil {
		return nil, err
	}
	return rs, nil
}

func (a *Agent) registrationRows(ctx context.Context, srv Server, gen, from uint64) (*nixstore.Rows, error) {
	if from == 0 {
		infos, err := a.registration(ctx, srv, gen)
		if err != nil {
			return nil, err
		}
		if len(infos) > 0 {
			if err := a.checkStoreDir(path.Dir(infos[0].Path), fmt.Sprintf("the registration of generation %d is of", gen)); err != nil {
				return nil, err
			}
		}
		return nixstore.RowsFromInfos(infos), nil
	}
	d, err := srv.Delta(ctx, from, gen)
	if err != nil {
		return nil, fmt.Errorf("fetch delta: %w", err)
	}
	infos, err := nixstore.ParseRegistration(bytes.NewReader([]byte(d.Added)))
	if err != nil {
		return nil, fmt.Errorf("delta: %w", err)
	}
	if len(infos) > 0 {
		if err := a.checkStoreDir(path.Dir(infos[0].Path), fmt.Sprintf("the registration of generation %d is of", gen)); err != nil {
			return nil, err
		}
	}
	return nixstore.RowsFromInfos(infos), nil
}

// errStalled is the cause of a context stallGuard cancelled.
var errStalled = errors.New("the server made no progress")

// stall is how long a call to a server may make no progress before it is
// given up: failover.after, at least 10 s (so that a server that dies in
// the middle of a rotation leaves the agent free to fail over); 0 (no
// bound but the API client's) without failover.
func (a *Agent) stall() time.Duration {
	if a.cfg.FailoverAfter <= 0 {
		return 0
	}
	return max(a.cfg.FailoverAfter, a.minStall)
}

// stallGuard returns a context of ctx that is cancelled (cause
// errStalled) when touch has not been called for d, touch, and a stop
// that must be called when the call is over. d 0: no bound.
func stallGuard(ctx context.Context, d time.Duration) (context.Context, func(), func()) {
	c, cancel := context.WithCancelCause(ctx)
	if d <= 0 {
		return c, func() {}, func() { cancel(context.Canceled) }
	}
	t := time.AfterFunc(d, func() { cancel(fmt.Errorf("%w for %s", errStalled, d)) })
	return c, func() { t.Reset(d) }, func() { t.Stop(); cancel(context.Canceled) }
}

// stalled returns err, or the stall that cancelled ctx when that is why
// it failed.
func stalled(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	if c := context.Cause(ctx); c != nil && errors.Is(c, errStalled) && !errors.Is(err, errStalled) {
		return fmt.Errorf("%w (%v)", c, err)
	}
	return err
}

// progressReader calls touch after every read that returned bytes.
type progressReader struct {
	r     io.Reader
	touch func()
}

func (p progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	if n > 0 {
		p.touch()
	}
	return n, err
}
