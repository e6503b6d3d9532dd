package nixstore

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"

	_ "modernc.org/sqlite" // registers the cgo-free "sqlite" driver
)

// DB file names inside a Nix database directory (…/var/nix/db).
const (
	dbFile    = "db.sqlite"
	walSuffix = "-wal"
)

// sqliteFiles returns the SQLite database file p and the files SQLite
// keeps beside it: its write-ahead log, WAL index and rollback journal.
func sqliteFiles(p string) []string {
	return []string{p, p + walSuffix, p + "-shm", p + "-journal"}
}

// ReadDB returns the valid paths of the Nix database in dbDir (a store's
// var/nix/db, typically inside a read-only snapshot), sorted by path, each
// with sorted references and a base16 NAR hash — the records
// `nix-store --dump-db` would print, without running Nix.
//
// dbDir must not change while ReadDB runs (a snapshot never does). When
// dbDir holds a non-empty write-ahead log (db.sqlite-wal), ReadDB copies
// db.sqlite and the log into a private temporary directory and reads the
// copy: SQLite must write a WAL index to replay the log, which a read-only
// snapshot does not allow, and a -shm left behind by the live store means
// nothing to another reader. Without a log it reads db.sqlite in place as
// an immutable file. It reads each table with one query, the two in
// parallel. A missing or corrupt database, or one whose tables lack the
// columns of Nix's schema, is an error.
func ReadDB(ctx context.Context, dbDir string) ([]PathInfo, error) {
	rs, err := readDB(ctx, dbDir, false)
	if err != nil {
		return nil, fmt.Errorf("read nix db %s: %w", dbDir, err)
	}
	return rs.Infos(), nil
}

// ReadDBRows is ReadDB with everything else Nix's database holds about each
// path: registration time, ultimate, signatures, content address and, for
// derivations, their outputs (DerivationOutputs); and the Realisations of
// content-addressed derivations when the database has that table (Nix with
// the ca-derivations feature). The result is sorted (see SortRows).
func ReadDBRows(ctx context.Context, dbDir string) (*Rows, error) {
	rs, err := readDB(ctx, dbDir, true)
	if err != nil {
		return nil, fmt.Errorf("read nix db %s: %w", dbDir, err)
	}
	return rs, nil
}

// openSnapshotDB opens the database in dbDir for reading (see ReadDB); the
// returned function closes it and removes any private copy.
func openSnapshotDB(dbDir string) (*sql.DB, func(), error) {
	src := filepath.Join(dbDir, dbFile)
	if _, err := os.Stat(src); err != nil {
		return nil, nil, err
	}
	var dsn string
	cleanup := func() {}
	wal, err := os.Stat(src + walSuffix)
	switch {
	case errors.Is(err, fs.ErrNotExist) || err == nil && wal.Size() == 0:
		// No log to replay: read the file where it is. immutable=1 tells
		// SQLite that nothing changes it, so it takes no locks and needs
		// no -shm (a read-only snapshot could not hold one).
		dsn = sqliteURI(src, "mode=ro&immutable=1")
	case err != nil:
		return nil, nil, err
	default:
		tmp, err := os.MkdirTemp("", "strata-nixdb-")
		if err != nil {
			return nil, nil, err
		}
		cleanup = func() { os.RemoveAll(tmp) }
		dst := filepath.Join(tmp, dbFile)
		if err := copyFile(src, dst); err != nil {
			cleanup()
			return nil, nil, err
		}
		if err := copyFile(src+walSuffix, dst+walSuffix); err != nil {
			cleanup()
			return nil, nil, err
		}
		// The copy is private, so SQLite may build its WAL index (-shm)
		// next to it; query_only keeps it from writing anything else.
		dsn = sqliteURI(dst, "_pragma=query_only(1)")
	}
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		cleanup()
		return nil, nil, err
	}
	return db, func() { db.Close(); cleanup() }, nil
}

func readDB(ctx context.Context, dbDir string, full bool) (*Rows, error) {
	db, done, err := openSnapshotDB(dbDir)
	if err != nil {
		return nil, err
	}
	defer done()
	return readOpenDB(ctx, db, full)
}

// readOpenDB is readDB of a database openSnapshotDB opened.
func readOpenDB(ctx context.Context, db *sql.DB, full bool) (*Rows, error) {
	db.SetMaxOpenConns(2)
	paths, err := db.Conn(ctx)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dbFile, err)
	}
	defer paths.Close()
	if err := checkSchema(ctx, paths, full); err != nil {
		return nil, err
	}
	refsConn, err := db.Conn(ctx)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dbFile, err)
	}
	defer refsConn.Close()

	// One query per table, each on its own connection, in parallel; then
	// join the reference ids to paths in memory.
	var (
		refs    []int64
		refsErr error
		done2   = make(chan struct{})
	)
	go func() {
		defer close(done2)
		refs, refsErr = readRefs(ctx, refsConn)
	}()
	rows, ids, err := readValidPaths(ctx, paths, full)
	<-done2
	if err != nil {
		return nil, err
	}
	if refsErr != nil {
		return nil, refsErr
	}
	if err := joinRefs(rows, ids, refs); err != nil {
		return nil, err
	}
	rs := &Rows{Paths: rows}
	if full {
		if err := readOutputs(ctx, paths, rows, ids); err != nil {
			return nil, err
		}
		if rs.Realisations, err = readRealisations(ctx, paths, rows, ids); err != nil {
			return nil, err
		}
	}
	SortRows(rs)
	return rs, nil
}

func sqliteURI(path, query string) string {
	return "file:" + (&url.URL{Path: path}).EscapedPath() + "?" + query
}

// rawQuery runs query on conn through the driver directly, calling row for
// each row: database/sql's per-row locking and conversions cost more than
// SQLite's own work on tables of 10^5–10^6 rows.
func rawQuery(ctx context.Context, conn *sql.Conn, query string, ncol int, row func([]driver.Value) error) error {
	return conn.Raw(func(dc any) error {
		q, ok := dc.(driver.QueryerContext)
		if !ok {
			return fmt.Errorf("sqlite driver cannot query directly")
		}
		rows, err := q.QueryContext(ctx, query, nil)
		if err != nil {
			return err
		}
		defer rows.Close()
		if n := len(rows.Columns()); n != ncol {
			return fmt.Errorf("query returned %d columns, want %d", n, ncol)
		}
		vals := make([]driver.Value, ncol)
		for {
			err := rows.Next(vals)
			if errors.Is(err, io.EOF) {
				return nil
			}
			if err != nil {
				return err
			}
			if err := row(vals); err != nil {
				return err
			}
		}
	})
}

// schemaColumns are the columns ReadDB needs, per table. Nix has kept them
// since schema 7 (Nix 1.x); later columns (ultimate, sigs, ca) and tables
// are ignored.
type tableColumns struct {
	table   string
	columns []string
}

var schemaColumns = []tableColumns{
	{"ValidPaths", []string{"id", "path", "hash", "deriver", "narSize"}},
	{"Refs", []string{"referrer", "reference"}},
}

// fullSchemaColumns are the further columns ReadDBRows needs: Nix's schema
// 10 (every Nix since 2.0; 2.8 and 2.26 verified).
var fullSchemaColumns = []tableColumns{
	{"ValidPaths", []string{"registrationTime", "ultimate", "sigs", "ca"}},
	{"DerivationOutputs", []string{"drv", "id", "path"}},
}

// realisationColumns are the ca-derivations tables (Nix's ca-schema).
var realisationColumns = []tableColumns{
	{"Realisations", []string{"id", "drvPath", "outputName", "outputPath", "signatures"}},
	{"RealisationsRefs", []string{"referrer", "realisationReference"}},
}

// columnsOf returns the column names of table ("" map when the table
// does not exist).
func columnsOf(ctx context.Context, conn *sql.Conn, table string) (map[string]bool, error) {
	rows, err := conn.QueryContext(ctx, "SELECT name FROM pragma_table_info(?)", table)
	if err != nil {
		return nil, fmt.Errorf("read schema: %w", err)
	}
	defer rows.Close()
	have := map[string]bool{}
	for rows.Next() {
		var name string
		if err := rows.Scan(&name); err != nil {
			return nil, fmt.Errorf("read schema: %w", err)
		}
		have[name] = true
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read schema: %w", err)
	}
	return have, nil
}

// hasTables reports whether every table of want exists with its columns;
// a table that exists without a column is an error.
func hasTables(ctx context.Context, conn *sql.Conn, want []tableColumns) (bool, error) {
	for _, t := range want {
		have, err := columnsOf(ctx, conn, t.table)
		if err != nil {
			return false, err
		}
		if len(have) == 0 {
			return false, nil
		}
		for _, c := range t.columns {
			if !have[c] {
				return false, fmt.Errorf("unknown schema: table %s has no column %s", t.table, c)
			}
		}
	}
	return true, nil
}

func checkSchema(ctx context.Context, conn *sql.Conn, full bool) error {
	want := schemaColumns
	if full {
		want = append(slices.Clone(want), fullSchemaColumns...)
	}
	for _, t := range want {
		have, err := columnsOf(ctx, conn, t.table)
		if err != nil {
			return err
		}
		if len(have) == 0 {
			return fmt.Errorf("unknown schema: no table %s (not a Nix database?)", t.table)
		}
		for _, c := range t.columns {
			if !have[c] {
				return fmt.Errorf("unknown schema: table %s has no column %s", t.table, c)
			}
		}
	}
	return nil
}

// idIndex maps ValidPaths ids to indexes into the records.
type idIndex struct {
	dense []int32 // dense[id] = index+1, when ids are compact
	m     map[int64]int
}

func (x *idIndex) get(id int64) (int, bool) {
	if x.dense != nil {
		if id < 0 || id >= int64(len(x.dense)) || x.dense[id] == 0 {
			return 0, false
		}
		return int(x.dense[id]) - 1, true
	}
	i, ok := x.m[id]
	return i, ok
}

func readValidPaths(ctx context.Context, conn *sql.Conn, full bool) ([]Row, *idIndex, error) {
	var (
		infos []Row
		ids   []int64
	)
	query, ncol := "SELECT id, path, hash, deriver, narSize FROM ValidPaths", 5
	if full {
		query, ncol = "SELECT id, path, hash, deriver, narSize, registrationTime, ultimate, sigs, ca FROM ValidPaths", 9
	}
	err := rawQuery(ctx, conn, query, ncol, func(v []driver.Value) error {
		id, ok := v[0].(int64)
		if !ok {
			return fmt.Errorf("id %v is not an integer", v[0])
		}
		var in Row
		if in.Path, ok = text(v[1]); !ok || in.Path == "" {
			return fmt.Errorf("id %d: path %v is not text", id, v[1])
		}
		hash, ok := text(v[2])
		if !ok {
			return fmt.Errorf("path %s: hash %v is not text", in.Path, v[2])
		}
		var err error
		if in.NarHash, err = dbHash(hash); err != nil {
			return fmt.Errorf("path %s: %w", in.Path, err)
		}
		if v[3] != nil {
			if in.Deriver, ok = text(v[3]); !ok {
				return fmt.Errorf("path %s: deriver %v is not text", in.Path, v[3])
			}
		}
		if v[4] != nil {
			n, ok := v[4].(int64)
			if !ok || n < 0 {
				return fmt.Errorf("path %s: narSize %v is not a size", in.Path, v[4])
			}
			in.NarSize = uint64(n)
		}
		if full {
			if err := readExtra(&in, v[5:]); err != nil {
				return err
			}
		}
		ids = append(ids, id)
		infos = append(infos, in)
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("read ValidPaths: %w", err)
	}
	x := &idIndex{}
	maxID := int64(0)
	for _, id := range ids {
		maxID = max(maxID, id)
	}
	if maxID < int64(4*len(ids)+1024) && len(ids) < 1<<31-1 {
		x.dense = make([]int32, maxID+1)
		for i, id := range ids {
			if id >= 0 {
				x.dense[id] = int32(i + 1)
			}
		}
	} else {
		x.m = make(map[int64]int, len(ids))
		for i, id := range ids {
			x.m[id] = i
		}
	}
	return infos, x, nil
}

// readRefs returns the Refs table as referrer, reference id pairs.
func readRefs(ctx context.Context, conn *sql.Conn) ([]int64, error) {
	var pairs []int64
	err := rawQuery(ctx, conn, "SELECT referrer, reference FROM Refs", 2, func(v []driver.Value) error {
		from, ok1 := v[0].(int64)
		to, ok2 := v[1].(int64)
		if !ok1 || !ok2 {
			return fmt.Errorf("row (%v, %v) is not a pair of ids", v[0], v[1])
		}
		pairs = append(pairs, from, to)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read Refs: %w", err)
	}
	return pairs, nil
}

// readExtra fills registrationTime, ultimate, sigs and ca.
func readExtra(in *Row, v []driver.Value) error {
	if v[0] != nil {
		t, ok := v[0].(int64)
		if !ok {
			return fmt.Errorf("path %s: registrationTime %v is not an integer", in.Path, v[0])
		}
		in.RegistrationTime = t
	}
	if v[1] != nil {
		u, ok := v[1].(int64)
		if !ok {
			return fmt.Errorf("path %s: ultimate %v is not an integer", in.Path, v[1])
		}
		in.Ultimate = u != 0
	}
	if v[2] != nil {
		s, ok := text(v[2])
		if !ok {
			return fmt.Errorf("path %s: sigs %v is not text", in.Path, v[2])
		}
		in.Sigs = fields(s)
	}
	if v[3] != nil {
		s, ok := text(v[3])
		if !ok {
			return fmt.Errorf("path %s: ca %v is not text", in.Path, v[3])
		}
		in.CA = s
	}
	return nil
}

// readOutputs fills the Outputs of .drv rows from DerivationOutputs.
func readOutputs(ctx context.Context, conn *sql.Conn, rows []Row, ids *idIndex) error {
	err := rawQuery(ctx, conn, "SELECT drv, id, path FROM DerivationOutputs", 3, func(v []driver.Value) error {
		drv, ok := v[0].(int64)
		if !ok {
			return fmt.Errorf("drv %v is not an integer", v[0])
		}
		i, ok := ids.get(drv)
		if !ok {
			return fmt.Errorf("drv id %d is not in ValidPaths", drv)
		}
		name, ok1 := text(v[1])
		out, ok2 := text(v[2])
		if !ok1 || !ok2 {
			return fmt.Errorf("drv %s: output (%v, %v) is not text", rows[i].Path, v[1], v[2])
		}
		if rows[i].Outputs == nil {
			rows[i].Outputs = map[string]string{}
		}
		rows[i].Outputs[name] = out
		return nil
	})
	if err != nil {
		return fmt.Errorf("read DerivationOutputs: %w", err)
	}
	return nil
}

// readRealisations reads Realisations and RealisationsRefs when the
// database has them.
func readRealisations(ctx context.Context, conn *sql.Conn, rows []Row, ids *idIndex) ([]Realisation, error) {
	ok, err := hasTables(ctx, conn, realisationColumns)
	if err != nil || !ok {
		return nil, err
	}
	var out []Realisation
	byID := map[int64]int{}
	err = rawQuery(ctx, conn, "SELECT id, drvPath, outputName, outputPath, signatures FROM Realisations", 5, func(v []driver.Value) error {
		id, ok := v[0].(int64)
		if !ok {
			return fmt.Errorf("id %v is not an integer", v[0])
		}
		drv, ok1 := text(v[1])
		name, ok2 := text(v[2])
		outID, ok3 := v[3].(int64)
		if !ok1 || !ok2 || !ok3 {
			return fmt.Errorf("realisation %d: row (%v, %v, %v) has wrong types", id, v[1], v[2], v[3])
		}
		i, ok := ids.get(outID)
		if !ok {
			return fmt.Errorf("realisation %s!%s: output path id %d is not in ValidPaths", drv, name, outID)
		}
		r := Realisation{DrvHash: drv, OutputName: name, OutPath: rows[i].Path}
		if v[4] != nil {
			s, ok := text(v[4])
			if !ok {
				return fmt.Errorf("realisation %s: signatures %v is not text", r.ID(), v[4])
			}
			r.Sigs = fields(s)
		}
		byID[id] = len(out)
		out = append(out, r)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read Realisations: %w", err)
	}
	err = rawQuery(ctx, conn, "SELECT referrer, realisationReference FROM RealisationsRefs", 2, func(v []driver.Value) error {
		from, ok1 := v[0].(int64)
		to, ok2 := v[1].(int64)
		if !ok1 || !ok2 {
			return fmt.Errorf("row (%v, %v) is not a pair of ids", v[0], v[1])
		}
		i, ok1 := byID[from]
		j, ok2 := byID[to]
		if !ok1 || !ok2 {
			return fmt.Errorf("row (%d, %d) names a realisation that does not exist", from, to)
		}
		out[i].Refs = append(out[i].Refs, out[j].ID())
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read RealisationsRefs: %w", err)
	}
	return out, nil
}

func joinRefs(infos []Row, ids *idIndex, pairs []int64) error {
	for k := 0; k < len(pairs); k += 2 {
		i, ok := ids.get(pairs[k])
		if !ok {
			return fmt.Errorf("read Refs: referrer id %d is not in ValidPaths", pairs[k])
		}
		j, ok := ids.get(pairs[k+1])
		if !ok {
			return fmt.Errorf("read Refs: path %s refers to id %d, which is not in ValidPaths", infos[i].Path, pairs[k+1])
		}
		infos[i].References = append(infos[i].References, infos[j].Path)
	}
	for i := range infos {
		slices.Sort(infos[i].References)
	}
	return nil
}

// fields splits a space-separated list; empty gives nil.
func fields(s string) []string {
	f := strings.Fields(s)
	if len(f) == 0 {
		return nil
	}
	return f
}

func text(v driver.Value) (string, bool) {
	switch t := v.(type) {
	case string:
		return t, true
	case []byte:
		return string(t), true
	}
	return "", false
}

// dbHash converts ValidPaths.hash ("sha256:<base16>" as Nix writes it, or
// an older base-32 form) to base16.
func dbHash(s string) (string, error) {
	if rest, ok := strings.CutPrefix(s, "sha256:"); ok && isBase16SHA256(rest) {
		return rest, nil
	}
	return NormalizeSHA256(s)
}

// copyFile copies src to dst (a new file), syncing nothing: dst is a
// throwaway private copy.
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("copy %s: %w", src, err)
	}
	return out.Close()
}
