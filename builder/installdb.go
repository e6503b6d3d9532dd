package builder

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/nixstore"
)

// A builder whose Nix DB has no valid path yet (a first start on a
// machine whose store is empty) does not import rows: it installs the
// generation's whole Nix DB, made once on the server from the snapshot's
// own (GET /v1/generations/N/nixdb, nixstore.InstallDB), by rename(2)
// under Nix's big-lock. Row inserts into SQLite cost over a second per
// 100,000 paths; the rename costs nothing, the download and checks a
// fraction of that. Everything else takes the row import: a DB with local
// paths (NixOS, a store installed by Nix's installer), a Nix process
// holding the store open (it holds the big-lock), a server that serves no
// DB (older strata), a DB that fails a check. The log says which and why.

// nixDBSource is a server that serves generations' Nix DBs (api.Client).
type nixDBSource interface {
	NixDB(ctx context.Context, id uint64) (io.ReadCloser, api.NixDB, error)
}

// dbInstaller is a Nix store that can take a generation's whole DB in
// place of an empty one (NixStore).
type dbInstaller interface {
	// Empty reports whether the local DB has no valid paths (a DB is
	// made first when Nix never ran).
	Empty(ctx context.Context) (bool, error)
	// InstallDB replaces the empty DB by the one read from r, which
	// must be want (see nixstore.InstallDB).
	InstallDB(ctx context.Context, r io.Reader, want nixstore.DBFile) error
}

// Empty implements dbInstaller.
func (n *NixStore) Empty(ctx context.Context) (bool, error) {
	if err := n.ensureDB(ctx); err != nil {
		return false, err
	}
	return nixstore.DBEmpty(ctx, filepath.Dir(n.DB))
}

// InstallDB implements dbInstaller.
func (n *NixStore) InstallDB(ctx context.Context, r io.Reader, want nixstore.DBFile) error {
	return nixstore.InstallDB(ctx, filepath.Dir(n.DB), r, want, nixstore.InstallOptions{})
}

// installDB installs generation g's Nix DB when the local one has no
// valid paths, then roots the generation as importRooted does, and
// returns how many paths it registered and what status should say; ok
// false: nothing was changed, import rows instead (the log says why).
// The caller holds the GC lock.
func (a *Agent) installDB(ctx context.Context, g uint64) (n int, msg string, ok bool) {
	inst, isInst := a.nix.(dbInstaller)
	src, isSrc := a.client().(nixDBSource)
	if !isInst || !isSrc {
		return 0, "", false
	}
	empty, err := inst.Empty(ctx)
	if err != nil {
		a.log.Warn("cannot tell whether the local nix db is empty; importing rows", "err", err)
		return 0, "", false
	}
	if !empty {
		a.log.Info("the local nix db has valid paths; importing the generation's rows into it", "generation", g)
		return 0, "", false
	}
	root, err := a.writeRoot(g)
	if err != nil {
		a.log.Warn("installing the generation's nix db: importing rows instead", "generation", g, "err", err)
		return 0, "", false
	}
	began := time.Now()
	c, touch, stop := stallGuard(ctx, a.stall())
	defer stop()
	body, d, err := src.NixDB(c, g)
	if err != nil {
		var se *api.StatusError
		if errors.As(err, &se) && se.Code == http.StatusNotFound {
			a.log.Info("the server serves no nix db for this generation (older strata?); importing rows", "generation", g, "reason", se.Message)
		} else {
			a.log.Warn("fetching the generation's nix db failed; importing rows instead", "generation", g, "err", stalled(c, err))
		}
		return 0, "", false
	}
	defer body.Close()
	want := nixstore.DBFile{SHA256: d.SHA256, Size: d.Size, Paths: d.Paths, Schema: d.Schema, Root: d.Root}
	err = a.checkNixDB(ctx, g, d, root.Path)
	if err == nil {
		err = inst.InstallDB(c, progressReader{r: body, touch: touch}, want)
	}
	if err != nil {
		if errors.Is(err, nixstore.ErrDBInUse) {
			a.log.Info("a Nix process has the store open; importing the generation's rows instead of installing its nix db", "generation", g)
		} else if errors.Is(err, nixstore.ErrDBReplaced) {
			a.log.Warn("the generation's nix db is in place, but its install did not finish; importing the generation's rows into it",
				"generation", g, "err", stalled(c, err))
		} else {
			a.log.Warn("installing the generation's nix db failed, the local db is unchanged; importing rows instead",
				"generation", g, "err", stalled(c, err))
		}
		return 0, "", false
	}
	a.met.imported(importNixDB, time.Since(began))
	a.log.Info("installed the generation's nix db", "generation", g, "paths", d.Paths-1, "bytes", d.Compressed,
		"took", time.Since(began).Round(time.Millisecond))
	if err := a.linkRoot(ctx, g, root.Path); err != nil {
		a.log.Error("generation not rooted: a garbage collection may delete its paths", "generation", g, "err", err)
		msg = err.Error()
	}
	return d.Paths - 1, msg, true
}

// checkNixDB checks what the server says of generation g's DB against
// what this builder knows: the root path it would register, and the
// generation's path count in its manifest.
func (a *Agent) checkNixDB(ctx context.Context, g uint64, d api.NixDB, root string) error {
	if d.Root != root {
		return fmt.Errorf("the server's DB registers the root %s, this builder's root is %s (store dirs differ?)", d.Root, root)
	}
	l, err := a.client().Generations(ctx)
	if err != nil {
		return err
	}
	for _, x := range l.Generations {
		if x.ID == g {
			if x.Paths+1 != d.Paths {
				return fmt.Errorf("the server's DB has %d valid paths, generation %d has %d and its root", d.Paths, g, x.Paths)
			}
			return nil
		}
	}
	return fmt.Errorf("generation %d is not live on the server", g)
}
