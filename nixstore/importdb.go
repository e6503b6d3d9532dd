package nixstore

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ErrUnknownSchema is returned by ImportDB when the database is not one
// whose layout this package knows (or does not exist yet): the caller falls
// back to `nix-store --load-db`, which lets Nix itself create or migrate it.
var ErrUnknownSchema = errors.New("unknown nix db schema")

// KnownSchemaVersions are the values of <db dir>/schema that ImportDB
// writes into. Nix has been at schema 10 since 2.0 (2.8 and 2.26 checked
// against Debian's nix-bin); the tables' columns are checked as well.
var KnownSchemaVersions = []int{10}

// schemaTables are the tables ImportDB writes, with exactly these columns:
// a column it does not know (a future NOT NULL one) makes the schema
// unknown.
var schemaTables = []tableColumns{
	{"ValidPaths", []string{"id", "path", "hash", "registrationTime", "deriver", "narSize", "ultimate", "sigs", "ca"}},
	{"Refs", []string{"referrer", "reference"}},
	{"DerivationOutputs", []string{"drv", "id", "path"}},
}

// ImportResult says what ImportDB did.
type ImportResult struct {
	// Imported paths were registered; Skipped were valid already.
	Imported, Skipped int
	// Realisations were registered; RealisationsSkipped were not: the
	// database has no Realisations table (Nix without ca-derivations), or
	// they were there already, or their output is not valid.
	Realisations, RealisationsSkipped int
	// SchemaVersion is the database's schema version.
	SchemaVersion int
	// HasRealisations reports whether the database has the ca-derivations
	// tables.
	HasRealisations bool
}

// MissingRefsError is returned when rows refer to paths that are neither
// valid in the database nor among the rows: importing them would break
// the closure, so nothing is imported.
type MissingRefsError struct {
	// Missing maps each missing path to one path referring to it.
	Missing map[string]string
}

func (e *MissingRefsError) Error() string {
	ps := slicesSortedKeys(e.Missing)
	shown := ps
	if len(shown) > maxListed {
		shown = shown[:maxListed]
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%d referenced paths are neither valid nor imported:", len(ps))
	for _, p := range shown {
		fmt.Fprintf(&b, " %s (referred to by %s)", p, e.Missing[p])
	}
	if len(ps) > len(shown) {
		fmt.Fprintf(&b, " and %d more", len(ps)-len(shown))
	}
	return b.String()
}

func slicesSortedKeys(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// ImportDB registers rs in the Nix database in dbDir (<nix state dir>/db)
// as Nix's own registerValidPaths would, without running Nix: one SQLite
// transaction that adds every row whose path is not valid yet (ValidPaths
// with hash, registration time, deriver, NAR size, ultimate, signatures and
// content address as the rows carry them; Refs; DerivationOutputs) and the
// realisations whose output is valid, when the database has the
// ca-derivations tables. Paths already valid are left alone:
// re-registering would reset their signatures. A reference that is neither
// valid nor among rs is a *MissingRefsError and nothing is imported.
//
// It keeps Nix's locking conventions: it holds a shared lock on
// <dbDir>/big-lock for the whole import (Nix takes it exclusively only to
// migrate the schema), opens the database with a busy timeout and
// synchronous=normal as Nix does, leaves the journal mode as
// Nix set it (WAL), and takes SQLite's write lock at BEGIN (IMMEDIATE), so
// a nix-daemon writing at the same time waits for the commit, or makes
// ImportDB wait, never sees half of it.
//
// With root set, the same transaction also points a garbage-collector root
// path at the rows (see RootUpdate), so no collection can see them
// registered and unrooted.
//
// Before touching anything it checks <dbDir>/schema against
// KnownSchemaVersions and the tables' columns; an unknown, missing or
// unreadable schema is an error wrapping ErrUnknownSchema.
func ImportDB(ctx context.Context, dbDir string, rs *Rows, root *RootUpdate) (ImportResult, error) {
	res, err := importDB(ctx, dbDir, rs, root)
	if err != nil {
		return res, fmt.Errorf("import rows into %s: %w", dbDir, err)
	}
	return res, nil
}

// SchemaVersion reads <dbDir>/schema.
func SchemaVersion(dbDir string) (int, error) {
	b, err := os.ReadFile(filepath.Join(dbDir, "schema"))
	if err != nil {
		return 0, fmt.Errorf("%w: %w", ErrUnknownSchema, err)
	}
	v, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, fmt.Errorf("%w: schema file holds %q", ErrUnknownSchema, clip(string(b)))
	}
	return v, nil
}

func importDB(ctx context.Context, dbDir string, rs *Rows, root *RootUpdate) (ImportResult, error) {
	var res ImportResult
	v, err := SchemaVersion(dbDir)
	if err != nil {
		return res, err
	}
	res.SchemaVersion = v
	if !slices.Contains(KnownSchemaVersions, v) {
		return res, fmt.Errorf("%w: schema version %d (known: %v)", ErrUnknownSchema, v, KnownSchemaVersions)
	}
	if _, err := os.Stat(filepath.Join(dbDir, dbFile)); err != nil {
		return res, fmt.Errorf("%w: %w", ErrUnknownSchema, err)
	}
	unlock, err := lockShared(ctx, filepath.Join(dbDir, "big-lock"))
	if err != nil {
		return res, err
	}
	defer unlock()

	// Foreign keys are off on this connection (Nix turns them on for its
	// own): every id the import writes was read or returned in this same
	// IMMEDIATE transaction, so no check can fail, and skipping them
	// saves two index lookups per reference (a third of the CPU). The
	// integration tests run PRAGMA foreign_key_check after imports. A
	// large page cache keeps the transaction's pages in memory instead of
	// spilling them to the WAL before the commit.
	dsn := sqliteURI(filepath.Join(dbDir, dbFile),
		"_pragma=foreign_keys(0)&_pragma=busy_timeout(60000)&_pragma=synchronous(normal)&_pragma=cache_size(-262144)&_pragma=temp_store(memory)&_pragma=threads(2)&_txlock=immediate")
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return res, err
	}
	defer db.Close()
	conn, err := db.Conn(ctx)
	if err != nil {
		return res, fmt.Errorf("open %s: %w", dbFile, err)
	}
	defer conn.Close()
	for _, t := range schemaTables {
		have, err := columnsOf(ctx, conn, t.table)
		if err != nil {
			return res, err
		}
		want := map[string]bool{}
		for _, c := range t.columns {
			want[c] = true
		}
		for c := range have {
			if !want[c] {
				return res, fmt.Errorf("%w: table %s has column %s", ErrUnknownSchema, t.table, c)
			}
		}
		for c := range want {
			if !have[c] {
				return res, fmt.Errorf("%w: table %s has no column %s", ErrUnknownSchema, t.table, c)
			}
		}
	}
	hasReal, err := hasTables(ctx, conn, realisationColumns)
	if err != nil {
		// Realisations tables of a layout we do not know: import the
		// paths, leave realisations to Nix.
		hasReal = false
	}
	res.HasRealisations = hasReal

	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		return res, fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback()
	if root != nil {
		if err := checkStorePath(root.Path, path.Dir(root.Path)); err != nil {
			return res, fmt.Errorf("root: %w", err)
		}
		if !isBase16SHA256(root.NarHash) {
			return res, fmt.Errorf("root %s: NAR hash %q is not 64 lowercase hex digits", root.Path, clip(root.NarHash))
		}
	}
	im := importer{ctx: ctx, tx: tx, rs: rs, root: root}
	if err := im.run(&res); err != nil {
		return res, err
	}
	if hasReal {
		if err := im.realisations(&res); err != nil {
			return res, err
		}
	} else {
		res.RealisationsSkipped = len(rs.Realisations)
	}
	if err := tx.Commit(); err != nil {
		return res, fmt.Errorf("commit: %w", err)
	}
	return res, nil
}

// lockShared takes a shared flock on path (created if missing, as Nix
// does), waiting while someone holds it exclusively, until ctx ends.
func lockShared(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open nix big-lock: %w", err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lock nix big-lock: %w", err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("lock nix big-lock (held exclusively by Nix): %w", ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

type importer struct {
	ctx  context.Context
	tx   *sql.Tx
	rs   *Rows
	root *RootUpdate
	// ids are the valid paths asked about (rows, references, roots) and
	// a root inserted now; index finds a row by path, rowID is its id.
	ids   map[string]int64
	index map[string]int32
	rowID []int64
}

// RootUpdate is a garbage-collector root path that ImportDB points at the
// rows it imports: a small file the caller wrote under the store dir,
// registered as a valid path whose references are the paths to keep
// (Nix's collector keeps a root's closure).
//
// A rotation changes a few paths of a big generation, so the root is
// updated in place rather than replaced: when Prev (the root path it
// replaces) is valid and Path is not, Prev's row is renamed to Path,
// keeping its id and its references, and only the difference is written.
// Nix never derives an input-addressed path's name from its references,
// and nothing else refers to a root, so the rename is invisible to it
// beyond the new name.
type RootUpdate struct {
	// Path, NarHash (base-16 SHA-256) and NarSize describe the root path
	// as it is registered.
	Path    string
	NarHash string
	NarSize uint64
	// Prev is the root path this one replaces, or "".
	Prev string
	// Full makes the root's references exactly the rows' paths. Without
	// it they are the root's (or Prev's) references, minus Remove, plus
	// every path of the rows (imported now or valid already).
	Full   bool
	Remove []string
}

// batchRows is how many rows one multi-row INSERT carries (9 parameters a
// row stays far under SQLite's 32766 variables).
const batchRows = 256

func (im *importer) run(res *ImportResult) (err error) {
	rs := im.rs
	// Which paths (rows and their references) are valid already: read
	// every valid path when the DB is not much bigger than what we ask
	// about (a cold import), else join the asked paths against the unique
	// index through a temporary table (a rotation into a big store).
	var local int64
	if err := im.tx.QueryRowContext(im.ctx, "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'ValidPaths'), 0)").Scan(&local); err != nil {
		return fmt.Errorf("read ValidPaths size: %w", err)
	}
	im.ids = make(map[string]int64, len(rs.Paths))
	if local <= 4*int64(len(rs.Paths)) {
		if err := im.scan("SELECT id, path FROM ValidPaths", nil); err != nil {
			return fmt.Errorf("read ValidPaths: %w", err)
		}
	} else {
		if _, err := im.tx.ExecContext(im.ctx, "CREATE TEMP TABLE IF NOT EXISTS strataWanted (path TEXT PRIMARY KEY) WITHOUT ROWID"); err != nil {
			return fmt.Errorf("temp table: %w", err)
		}
		if _, err := im.tx.ExecContext(im.ctx, "DELETE FROM strataWanted"); err != nil {
			return fmt.Errorf("temp table: %w", err)
		}
		want := make(map[string]struct{}, len(rs.Paths))
		if im.root != nil {
			for _, p := range append([]string{im.root.Path, im.root.Prev}, im.root.Remove...) {
				if p != "" {
					want[p] = struct{}{}
				}
			}
		}
		for i := range rs.Paths {
			want[rs.Paths[i].Path] = struct{}{}
			for _, r := range rs.Paths[i].References {
				want[r] = struct{}{}
			}
		}
		paths := make([]string, 0, len(want))
		for p := range want {
			paths = append(paths, p)
		}
		if err := batches(im, len(paths), 1, "INSERT OR IGNORE INTO strataWanted (path) VALUES ", "(?)", "",
			func(i int, args []any) []any { return append(args, paths[i]) }); err != nil {
			return fmt.Errorf("temp table: %w", err)
		}
		// CROSS JOIN keeps the asked paths the outer loop: one index
		// probe each, never a scan of ValidPaths (which SQLite's planner,
		// without statistics, otherwise picks).
		if err := im.scan("SELECT v.id, v.path FROM strataWanted w CROSS JOIN ValidPaths v ON v.path = w.path", nil); err != nil {
			return fmt.Errorf("read ValidPaths: %w", err)
		}
		if _, err := im.tx.ExecContext(im.ctx, "DROP TABLE strataWanted"); err != nil {
			return fmt.Errorf("temp table: %w", err)
		}
	}
	// Rows are found by path through one map built once; each row's id
	// is the one it has (valid already) or the one assigned below.
	im.index = make(map[string]int32, len(rs.Paths))
	for i := range rs.Paths {
		im.index[rs.Paths[i].Path] = int32(i)
	}
	im.rowID = make([]int64, len(rs.Paths))
	fresh := make([]int32, 0, len(rs.Paths))
	for i := range rs.Paths {
		if id := im.ids[rs.Paths[i].Path]; id != 0 {
			im.rowID[i] = id
			res.Skipped++
			continue
		}
		fresh = append(fresh, int32(i))
	}
	missing := map[string]string{}
	for _, i := range fresh {
		for _, ref := range rs.Paths[i].References {
			if _, ok := im.index[ref]; !ok && im.ids[ref] == 0 {
				missing[ref] = rs.Paths[i].Path
			}
		}
	}
	if len(missing) > 0 {
		return &MissingRefsError{Missing: missing}
	}
	newRoot, err := im.prepareRoot()
	if err != nil {
		return err
	}
	if len(fresh) == 0 && im.root == nil {
		return nil
	}

	// Ids are assigned here, above every id the table has had (the
	// transaction holds the write lock, so nobody else takes one):
	// nothing is read back per row, and the AUTOINCREMENT counter
	// follows the explicit ids as it follows its own.
	var base int64
	if err := im.tx.QueryRowContext(im.ctx,
		"SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'ValidPaths'), 0), coalesce((SELECT max(id) FROM ValidPaths), 0))").Scan(&base); err != nil {
		return fmt.Errorf("read ValidPaths ids: %w", err)
	}
	for k, i := range fresh {
		im.rowID[i] = base + 1 + int64(k)
	}
	inserts := make([]*Row, len(fresh), len(fresh)+1)
	ids := make([]int64, len(fresh), len(fresh)+1)
	for k, i := range fresh {
		inserts[k], ids[k] = &rs.Paths[i], im.rowID[i]
	}
	if newRoot != nil {
		id := base + 1 + int64(len(fresh))
		inserts, ids = append(inserts, newRoot), append(ids, id)
		im.ids[newRoot.Path] = id
	}
	now := time.Now().Unix()
	err = batches(im, len(inserts), 9,
		"INSERT INTO ValidPaths (id, path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca) VALUES ",
		"(?, ?, ?, ?, ?, ?, ?, ?, ?)", "", func(i int, args []any) []any {
			r := inserts[i]
			t := r.RegistrationTime
			if t == 0 {
				t = now
			}
			// NULLs where Nix writes NULL: no deriver, size 0, not
			// ultimate, no sigs, no ca.
			return append(args, ids[i], r.Path, "sha256:"+r.NarHash, t, nullStr(r.Deriver), nullSize(r.NarSize),
				nullTrue(r.Ultimate), nullSigs(r.Sigs), nullStr(r.CA))
		})
	if err != nil {
		return fmt.Errorf("insert ValidPaths: %w", err)
	}
	res.Imported = len(fresh)

	// A bulk import (more new paths than the DB holds, e.g. a builder's
	// first start) rebuilds Refs' index on reference after the insert
	// instead of updating it per row: SQLite builds an index by sorting,
	// cheaper than a random insert per reference. They are
	// recreated with their own SQL in the same transaction, so the schema
	// Nix sees after the commit is the one it made.
	if len(fresh) >= bulkRows && int64(len(fresh)) > local {
		recreate, err := im.dropIndexes("Refs", "referrer")
		if err != nil {
			return err
		}
		defer func() {
			if ierr := im.recreate(recreate); ierr != nil && err == nil {
				err = ierr
			}
		}()
	}
	nrefs := 0
	for _, i := range fresh {
		nrefs += len(rs.Paths[i].References)
	}
	refs := make([]pair, 0, nrefs)
	for _, i := range fresh {
		a := im.rowID[i]
		for _, ref := range rs.Paths[i].References {
			refs = append(refs, pair{a, im.id(ref)})
		}
	}
	if im.root != nil {
		root := im.ids[im.root.Path]
		add, err := im.rootRefs(root)
		if err != nil {
			return err
		}
		for _, id := range add {
			refs = append(refs, pair{root, id})
		}
	}
	// In primary-key order: the B-tree takes appends. Fresh rows come in
	// id order with sorted references, so this is mostly sorted already.
	if !slices.IsSortedFunc(refs, comparePairs) {
		slices.SortFunc(refs, comparePairs)
	}
	if err := batches(im, len(refs), 2, "INSERT OR IGNORE INTO Refs (referrer, reference) VALUES ", "(?, ?)", "",
		func(i int, args []any) []any { return append(args, refs[i].a, refs[i].b) }); err != nil {
		return fmt.Errorf("insert Refs: %w", err)
	}
	type output struct {
		drv        int64
		name, path string
	}
	var outs []output
	for _, i := range fresh {
		r := &rs.Paths[i]
		for _, name := range slicesSortedKeys(r.Outputs) {
			outs = append(outs, output{im.rowID[i], name, r.Outputs[name]})
		}
	}
	if err := batches(im, len(outs), 3, "INSERT OR REPLACE INTO DerivationOutputs (drv, id, path) VALUES ", "(?, ?, ?)", "",
		func(i int, args []any) []any { return append(args, outs[i].drv, outs[i].name, outs[i].path) }); err != nil {
		return fmt.Errorf("insert DerivationOutputs: %w", err)
	}
	return nil
}

type pair struct{ a, b int64 }

func comparePairs(x, y pair) int {
	if x.a != y.a {
		return cmp.Compare(x.a, y.a)
	}
	return cmp.Compare(x.b, y.b)
}

// id returns path p's id: a row's (valid or imported now), else a valid
// path's that was asked about, else 0.
func (im *importer) id(p string) int64 {
	if i, ok := im.index[p]; ok {
		return im.rowID[i]
	}
	return im.ids[p]
}

// prepareRoot renames Prev's row to the root path when the root is not
// valid and Prev is, and returns the root's row to insert with the new
// paths when neither is valid.
func (im *importer) prepareRoot() (*Row, error) {
	u := im.root
	if u == nil || im.ids[u.Path] != 0 {
		return nil, nil
	}
	if prev := im.ids[u.Prev]; u.Prev != "" && prev != 0 {
		if _, err := im.tx.ExecContext(im.ctx, "UPDATE ValidPaths SET path = ?, hash = ?, narSize = ?, registrationTime = ? WHERE id = ?",
			u.Path, "sha256:"+u.NarHash, nullSize(u.NarSize), time.Now().Unix(), prev); err != nil {
			return nil, fmt.Errorf("rename root %s to %s: %w", u.Prev, u.Path, err)
		}
		delete(im.ids, u.Prev)
		im.ids[u.Path] = prev
		return nil, nil
	}
	return &Row{PathInfo: PathInfo{Path: u.Path, NarHash: u.NarHash, NarSize: u.NarSize}}, nil
}

// rootRefs deletes the references of the root (id) that go (those not
// among the rows' paths with Full, else those in Remove) and returns the
// ids of the rows' paths, to which it must refer; with Full, only those
// it does not refer to yet.
func (im *importer) rootRefs(root int64) ([]int64, error) {
	u := im.root
	add := slices.Clone(im.rowID)
	if !u.Full {
		del, err := im.tx.PrepareContext(im.ctx, "DELETE FROM Refs WHERE referrer = ? AND reference = ?")
		if err != nil {
			return nil, fmt.Errorf("update root %s: %w", u.Path, err)
		}
		defer del.Close()
		for _, p := range u.Remove {
			if id := im.id(p); id != 0 && id != root {
				if _, err := del.ExecContext(im.ctx, root, id); err != nil {
					return nil, fmt.Errorf("update root %s: drop reference %s: %w", u.Path, p, err)
				}
			}
		}
		return add, nil
	}
	have := map[int64]bool{}
	rows, err := im.tx.QueryContext(im.ctx, "SELECT reference FROM Refs WHERE referrer = ?", root)
	if err != nil {
		return nil, fmt.Errorf("read references of root %s: %w", u.Path, err)
	}
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			rows.Close()
			return nil, fmt.Errorf("read references of root %s: %w", u.Path, err)
		}
		have[id] = true
	}
	if err := rows.Close(); err != nil {
		return nil, fmt.Errorf("read references of root %s: %w", u.Path, err)
	}
	if len(have) == 0 {
		return add, nil
	}
	keep := make(map[int64]bool, len(add))
	out := add[:0]
	for _, id := range add {
		keep[id] = true
		if !have[id] {
			out = append(out, id)
		}
	}
	var gone []int64
	for id := range have {
		if !keep[id] {
			gone = append(gone, id)
		}
	}
	slices.Sort(gone)
	if err := batches(im, len(gone), 1, "DELETE FROM Refs WHERE referrer = "+strconv.FormatInt(root, 10)+" AND reference IN (", "?", ")",
		func(i int, args []any) []any { return append(args, gone[i]) }); err != nil {
		return nil, fmt.Errorf("update root %s: %w", u.Path, err)
	}
	return out, nil
}

// bulkRows is the size from which a bulk import rebuilds indexes.
const bulkRows = 5000

// dropIndexes drops table's secondary indexes (those with their own SQL,
// not the primary key's) whose first column is not leadColumn, and returns
// their CREATE statements.
func (im *importer) dropIndexes(table, leadColumn string) ([]string, error) {
	rows, err := im.tx.QueryContext(im.ctx,
		"SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL ORDER BY name", table)
	if err != nil {
		return nil, fmt.Errorf("read indexes of %s: %w", table, err)
	}
	var names, sqls []string
	for rows.Next() {
		var n, q string
		if err := rows.Scan(&n, &q); err != nil {
			rows.Close()
			return nil, fmt.Errorf("read indexes of %s: %w", table, err)
		}
		names, sqls = append(names, n), append(sqls, q)
	}
	if err := rows.Close(); err != nil {
		return nil, fmt.Errorf("read indexes of %s: %w", table, err)
	}
	var dropped []string
	for i, n := range names {
		// Rows go in in (referrer, reference) order: an index led by
		// referrer takes appends and stays; the others are rebuilt.
		var first string
		if err := im.tx.QueryRowContext(im.ctx, "SELECT name FROM pragma_index_info(?) WHERE seqno = 0", n).Scan(&first); err != nil {
			return nil, fmt.Errorf("read index %s: %w", n, err)
		}
		if first == leadColumn {
			continue
		}
		if _, err := im.tx.ExecContext(im.ctx, `DROP INDEX "`+strings.ReplaceAll(n, `"`, `""`)+`"`); err != nil {
			return nil, fmt.Errorf("drop index %s: %w", n, err)
		}
		dropped = append(dropped, sqls[i])
	}
	return dropped, nil
}

func (im *importer) recreate(sqls []string) error {
	for _, q := range sqls {
		if _, err := im.tx.ExecContext(im.ctx, q); err != nil {
			return fmt.Errorf("recreate index (%s): %w", q, err)
		}
	}
	return nil
}

// scan records the (id, path) rows of query in im.ids.
func (im *importer) scan(query string, args []any) error {
	rows, err := im.tx.QueryContext(im.ctx, query, args...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var id int64
		var p string
		if err := rows.Scan(&id, &p); err != nil {
			return err
		}
		im.ids[p] = id
	}
	return rows.Err()
}

// batches runs prefix + n tuples + suffix in multi-row statements of at
// most batchRows tuples; arg appends tuple i's nargs values.
func batches(im *importer, n, nargs int, prefix, tuple, suffix string, arg func(i int, args []any) []any) error {
	stmts := map[int]*sql.Stmt{}
	defer func() {
		for _, s := range stmts {
			s.Close()
		}
	}()
	args := make([]any, 0, batchRows*nargs)
	for start := 0; start < n; start += batchRows {
		end := min(start+batchRows, n)
		k := end - start
		st, ok := stmts[k]
		if !ok {
			var b strings.Builder
			b.WriteString(prefix)
			for i := 0; i < k; i++ {
				if i > 0 {
					b.WriteString(", ")
				}
				b.WriteString(tuple)
			}
			b.WriteString(suffix)
			var err error
			if st, err = im.tx.PrepareContext(im.ctx, b.String()); err != nil {
				return err
			}
			stmts[k] = st
		}
		args = args[:0]
		for i := start; i < end; i++ {
			args = arg(i, args)
		}
		if _, err := st.ExecContext(im.ctx, args...); err != nil {
			return err
		}
	}
	return nil
}

// realisations registers the realisations whose output path is valid
// now and that the database does not have yet, then their references
// among realisations it has.
func (im *importer) realisations(res *ImportResult) error {
	if len(im.rs.Realisations) == 0 {
		return nil
	}
	find, err := im.tx.PrepareContext(im.ctx, "SELECT id FROM Realisations WHERE drvPath = ? AND outputName = ?")
	if err != nil {
		return fmt.Errorf("query Realisations: %w", err)
	}
	defer find.Close()
	pathID, err := im.tx.PrepareContext(im.ctx, "SELECT id FROM ValidPaths WHERE path = ?")
	if err != nil {
		return fmt.Errorf("query ValidPaths: %w", err)
	}
	defer pathID.Close()
	lookup := func(x Realisation) (int64, error) {
		var id int64
		err := find.QueryRowContext(im.ctx, x.DrvHash, x.OutputName).Scan(&id)
		if errors.Is(err, sql.ErrNoRows) {
			return 0, nil
		}
		return id, err
	}
	added := map[string]int64{}
	for _, x := range im.rs.Realisations {
		id, err := lookup(x)
		if err != nil {
			return fmt.Errorf("query Realisations: %w", err)
		}
		if id != 0 {
			res.RealisationsSkipped++
			continue
		}
		out := im.id(x.OutPath)
		if out == 0 {
			err := pathID.QueryRowContext(im.ctx, x.OutPath).Scan(&out)
			if errors.Is(err, sql.ErrNoRows) {
				res.RealisationsSkipped++
				continue
			}
			if err != nil {
				return fmt.Errorf("query ValidPaths: %w", err)
			}
		}
		r, err := im.tx.ExecContext(im.ctx,
			"INSERT INTO Realisations (drvPath, outputName, outputPath, signatures) VALUES (?, ?, ?, ?)",
			x.DrvHash, x.OutputName, out, strings.Join(x.Sigs, " ")) // Nix writes "" for none
		if err != nil {
			return fmt.Errorf("insert realisation %s: %w", x.ID(), err)
		}
		if added[x.ID()], err = r.LastInsertId(); err != nil {
			return fmt.Errorf("insert realisation %s: %w", x.ID(), err)
		}
		res.Realisations++
	}
	for _, x := range im.rs.Realisations {
		from, ok := added[x.ID()]
		if !ok {
			continue
		}
		for _, ref := range x.Refs {
			to, ok := added[ref]
			if !ok {
				drv, name, _ := strings.Cut(ref, "!")
				id, err := lookup(Realisation{DrvHash: drv, OutputName: name})
				if err != nil {
					return fmt.Errorf("query Realisations: %w", err)
				}
				if id == 0 {
					continue
				}
				to = id
			}
			if _, err := im.tx.ExecContext(im.ctx,
				"INSERT INTO RealisationsRefs (referrer, realisationReference) VALUES (?, ?)", from, to); err != nil {
				return fmt.Errorf("insert realisation reference %s -> %s: %w", x.ID(), ref, err)
			}
		}
	}
	return nil
}

func nullStr(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// nullSigs is ValidPaths.sigs: space-separated, NULL for none.
func nullSigs(sigs []string) any {
	switch len(sigs) {
	case 0:
		return nil
	case 1:
		return sigs[0]
	}
	return strings.Join(sigs, " ")
}

func nullSize(n uint64) any {
	if n == 0 {
		return nil
	}
	return int64(n)
}

func nullTrue(b bool) any {
	if b {
		return int64(1)
	}
	return nil
}
