package builder

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"

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

// rowsFrom is rows from server srv.
func (a *Agent) rowsFrom(ctx context.Context, srv Server, gen, from uint64) (*nixstore.Rows, error) {
	body, err := srv.Paths(ctx, gen, from)
	var se *api.StatusError
	if errors.As(err, &se) && se.Code == http.StatusNotFound {
		a.log.Warn("server has no path rows for this generation; importing its registration (no signatures or ca)",
			"generation", gen, "from", from, "reason", se.Message)
		return a.registrationRows(ctx, srv, gen, from)
	}
	if err != nil {
		return nil, fmt.Errorf("fetch path rows of generation %d: %w", gen, err)
	}
	defer body.Close()
	h, rs, err := nixstore.ReadRows(body)
	if err != nil {
		return nil, fmt.Errorf("path rows of generation %d: %w", gen, err)
	}
	if h.Generation != gen || h.From != from {
		return nil, fmt.Errorf("path rows: asked for generation %d from %d, got %d from %d", gen, from, h.Generation, h.From)
	}
	return rs, nil
}

func (a *Agent) registrationRows(ctx context.Context, srv Server, gen, from uint64) (*nixstore.Rows, error) {
	if from == 0 {
		infos, err := a.registration(ctx, srv, gen)
		if err != nil {
			return nil, err
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
	return nixstore.RowsFromInfos(infos), nil
}
