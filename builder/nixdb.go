package builder

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"

	_ "modernc.org/sqlite" // the cgo-free "sqlite" driver

	"github.com/strata-nix/strata/nixstore"
)

// Nix is what the agent needs from the local Nix store. NixStore is the
// real one.
type Nix interface {
	// Load registers the rows whose paths are not valid yet and returns
	// how many it registered; with root set, it points that GC root path
	// at the rows in the same transaction (see nixstore.RootUpdate).
	Load(ctx context.Context, rows *nixstore.Rows, root *nixstore.RootUpdate) (int, error)
	// Referrers reports, for each of paths, whether it is valid and which
	// valid paths (other than itself) refer to it.
	Referrers(ctx context.Context, paths []string) (valid map[string]bool, referrers map[string][]string, err error)
	// Invalidate removes paths from the local DB without touching files.
	// No valid path outside paths may refer to any of them, except a
	// generation's root path, whose references to them go with them.
	Invalidate(ctx context.Context, paths []string) error
	// References returns the references of valid path p (nil when p is
	// not valid).
	References(ctx context.Context, p string) ([]string, error)
}

// NixStore is the local Nix store: registration with the nix-store CLI,
// invalidation directly in its SQLite database.
//
// Why invalidation does not use Nix: `nix-store --delete` removes the files
// too, which on the overlay writes whiteouts into the upper, hiding the
// path in every later generation that brings it back; `nix-store --verify`
// only invalidates paths whose files are already gone, which would mean
// swapping first and leaving valid-but-unreadable paths until it runs
// (invariant 2). So the agent does what Nix's own invalidatePath does: in
// one SQLite transaction with foreign keys on, DELETE FROM ValidPaths for
// each path, referrers before the paths they refer to (Refs rows of a
// deleted referrer and DerivationOutputs rows of a deleted .drv go by ON
// DELETE CASCADE; a reference from a surviving path is refused by ON DELETE
// RESTRICT, so the DB cannot lose closure). SQLite's own locking makes this
// safe next to a running nix-daemon; Nix keeps no cache of validity across
// operations that this would invalidate, except for an in-process path-info
// cache of a long-lived nix-daemon worker, which only lives for one client
// connection.
type NixStore struct {
	CLI nixstore.CLI
	// DB is the path of db.sqlite (<nix.state_dir>/db/db.sqlite).
	DB  string
	Log *slog.Logger
}

// NewNixStore returns the store of cfg.
func NewNixStore(cfg Config, log *slog.Logger) *NixStore {
	cli := nixstore.CLI{Bin: cfg.NixBin}
	if cfg.NixStore != "" {
		cli.Args = []string{"--store", cfg.NixStore}
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &NixStore{CLI: cli, DB: filepath.Join(cfg.NixStateDir, "db", "db.sqlite"), Log: log}
}

// Load imports rows into the Nix DB with nixstore.ImportDB: one SQLite
// transaction, only paths not valid yet, keeping signatures, content
// addresses, derivation outputs and (when this Nix has the ca-derivations
// tables) realisations; a floating content-addressed .drv is registered as
// a path whatever this Nix supports, since nothing parses it. When the DB's
// schema is not one ImportDB knows (or there is no DB yet), it falls back
// to `nix-store --load-db` of the registration fields, which keeps
// neither signatures nor content addresses, and logs that it did (the root
// then gets a fresh row with all its references, in a second --load-db).
// A store without a DB yet (Nix never ran) is first initialised by Nix
// itself.
func (n *NixStore) Load(ctx context.Context, rows *nixstore.Rows, root *nixstore.RootUpdate) (int, error) {
	if err := n.ensureDB(ctx); err != nil {
		return 0, err
	}
	res, err := nixstore.ImportDB(ctx, filepath.Dir(n.DB), rows, root)
	if errors.Is(err, nixstore.ErrUnknownSchema) {
		n.Log.Warn("nix db schema unknown: importing with nix-store --load-db instead (signatures, ca and realisations are not kept)",
			"db", n.DB, "reason", err)
		c, err := n.CLI.LoadDB(ctx, rows.Infos())
		if err != nil || root == nil {
			return c, err
		}
		return c, n.loadRoot(ctx, rows, root)
	}
	if err != nil {
		return 0, err
	}
	if len(rows.Realisations) > 0 {
		n.Log.Info("imported realisations", "imported", res.Realisations, "skipped", res.RealisationsSkipped,
			"nix_has_ca_derivations", res.HasRealisations)
	}
	return res.Imported, nil
}

// ensureDB lets a Nix that never ran on this machine create its DB (any
// query does), with its own schema and settings (the ca-derivations
// tables when that feature is on).
func (n *NixStore) ensureDB(ctx context.Context) error {
	if _, err := os.Stat(n.DB); errors.Is(err, os.ErrNotExist) {
		return n.CLI.Init(ctx)
	}
	return nil
}

// loadRoot registers root with `nix-store --load-db` (a DB whose schema
// ImportDB does not know): a new row referring to every path it must
// keep, read from the previous root unless root.Full. The previous root
// is left for the caller to drop.
func (n *NixStore) loadRoot(ctx context.Context, rows *nixstore.Rows, root *nixstore.RootUpdate) error {
	var refs []string
	if !root.Full && root.Prev != "" {
		old, err := n.References(ctx, root.Prev)
		if err != nil {
			return fmt.Errorf("register root %s: %w", root.Path, err)
		}
		refs = without(old, root.Remove)
	}
	refs = append(refs, rowPaths(rows)...)
	slices.Sort(refs)
	refs = slices.Compact(refs)
	if _, err := n.CLI.LoadDB(ctx, []nixstore.PathInfo{{Path: root.Path, NarHash: root.NarHash, NarSize: root.NarSize, References: refs}}); err != nil {
		return fmt.Errorf("register root %s: %w", root.Path, err)
	}
	return nil
}

func (n *NixStore) open(ctx context.Context) (*sql.Conn, func(), error) {
	// Nix opens its DB in WAL mode with foreign keys on; match it.
	dsn := "file:" + (&url.URL{Path: n.DB}).EscapedPath() +
		"?_pragma=foreign_keys(1)&_pragma=busy_timeout(60000)"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, nil, fmt.Errorf("open nix db %s: %w", n.DB, err)
	}
	conn, err := db.Conn(ctx)
	if err != nil {
		db.Close()
		return nil, nil, fmt.Errorf("open nix db %s: %w", n.DB, err)
	}
	return conn, func() { conn.Close(); db.Close() }, nil
}

func (n *NixStore) Referrers(ctx context.Context, paths []string) (map[string]bool, map[string][]string, error) {
	valid := map[string]bool{}
	refs := map[string][]string{}
	if len(paths) == 0 {
		return valid, refs, nil
	}
	conn, done, err := n.open(ctx)
	if err != nil {
		return nil, nil, err
	}
	defer done()
	for _, p := range paths {
		var id int64
		err := conn.QueryRowContext(ctx, "SELECT id FROM ValidPaths WHERE path = ?", p).Scan(&id)
		if err == sql.ErrNoRows {
			continue
		}
		if err != nil {
			return nil, nil, fmt.Errorf("query nix db %s: %w", n.DB, err)
		}
		valid[p] = true
		rows, err := conn.QueryContext(ctx,
			"SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.referrer WHERE r.reference = ? AND r.referrer != ?", id, id)
		if err != nil {
			return nil, nil, fmt.Errorf("query nix db %s: %w", n.DB, err)
		}
		for rows.Next() {
			var r string
			if err := rows.Scan(&r); err != nil {
				rows.Close()
				return nil, nil, fmt.Errorf("query nix db %s: %w", n.DB, err)
			}
			refs[p] = append(refs[p], r)
		}
		if err := rows.Close(); err != nil {
			return nil, nil, fmt.Errorf("query nix db %s: %w", n.DB, err)
		}
	}
	return valid, refs, nil
}

func (n *NixStore) Invalidate(ctx context.Context, paths []string) error {
	if len(paths) == 0 {
		return nil
	}
	conn, done, err := n.open(ctx)
	if err != nil {
		return err
	}
	defer done()
	_, refs, err := n.Referrers(ctx, paths)
	if err != nil {
		return err
	}
	// A generation's root path refers to them: its references to them
	// go with them (the root stays).
	type ref struct{ root, p string }
	var unroot []ref
	in := make(map[string]bool, len(paths))
	for _, p := range paths {
		in[p] = true
	}
	for p, rs := range refs {
		refs[p] = slices.DeleteFunc(rs, func(r string) bool {
			if isRootPath(r) && !in[r] {
				unroot = append(unroot, ref{r, p})
				return true
			}
			return false
		})
	}
	order, err := referrersFirst(paths, refs)
	if err != nil {
		return fmt.Errorf("invalidate: %w", err)
	}
	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("invalidate: %w", err)
	}
	defer tx.Rollback()
	for _, u := range unroot {
		if _, err := tx.ExecContext(ctx, "DELETE FROM Refs WHERE referrer = (SELECT id FROM ValidPaths WHERE path = ?) AND reference = (SELECT id FROM ValidPaths WHERE path = ?)",
			u.root, u.p); err != nil {
			return fmt.Errorf("invalidate %s: drop reference from %s: %w", u.p, u.root, err)
		}
	}
	for _, p := range order {
		if _, err := tx.ExecContext(ctx, "DELETE FROM ValidPaths WHERE path = ?", p); err != nil {
			return fmt.Errorf("invalidate %s: %w", p, err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("invalidate: %w", err)
	}
	return nil
}

// referrersFirst orders paths so that every path comes after the paths of
// the set that refer to it. A referrer outside the set is an error (the
// DB would refuse it anyway); so is a reference cycle, which Nix stores
// cannot have apart from self-references.
func referrersFirst(paths []string, refs map[string][]string) ([]string, error) {
	in := map[string]bool{}
	for _, p := range paths {
		in[p] = true
	}
	for _, p := range paths {
		for _, r := range refs[p] {
			if !in[r] {
				return nil, fmt.Errorf("path %s is still referred to by %s", p, r)
			}
		}
	}
	var out []string
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(p string, stack []string) error
	visit = func(p string, stack []string) error {
		switch state[p] {
		case 1:
			return fmt.Errorf("reference cycle: %s", strings.Join(append(stack, p), " -> "))
		case 2:
			return nil
		}
		state[p] = 1
		for _, r := range refs[p] {
			if err := visit(r, append(stack, p)); err != nil {
				return err
			}
		}
		state[p] = 2
		out = append(out, p)
		return nil
	}
	for _, p := range paths {
		if err := visit(p, nil); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func (n *NixStore) References(ctx context.Context, p string) ([]string, error) {
	conn, done, err := n.open(ctx)
	if err != nil {
		return nil, err
	}
	defer done()
	rows, err := conn.QueryContext(ctx,
		"SELECT v2.path FROM ValidPaths v1 JOIN Refs r ON r.referrer = v1.id JOIN ValidPaths v2 ON v2.id = r.reference WHERE v1.path = ?", p)
	if err != nil {
		return nil, fmt.Errorf("query nix db %s: %w", n.DB, err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var r string
		if err := rows.Scan(&r); err != nil {
			return nil, fmt.Errorf("query nix db %s: %w", n.DB, err)
		}
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("query nix db %s: %w", n.DB, err)
	}
	return out, nil
}
