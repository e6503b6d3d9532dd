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
	infos, err := readDB(ctx, dbDir)
	if err != nil {
		return nil, fmt.Errorf("read nix db %s: %w", dbDir, err)
	}
	return infos, nil
}

func readDB(ctx context.Context, dbDir string) ([]PathInfo, error) {
	src := filepath.Join(dbDir, dbFile)
	if _, err := os.Stat(src); err != nil {
		return nil, err
	}
	var dsn string
	wal, err := os.Stat(src + walSuffix)
	switch {
	case errors.Is(err, fs.ErrNotExist) || err == nil && wal.Size() == 0:
		// No log to replay: read the file where it is. immutable=1 tells
		// SQLite that nothing changes it, so it takes no locks and needs
		// no -shm (a read-only snapshot could not hold one).
		dsn = sqliteURI(src, "mode=ro&immutable=1")
	case err != nil:
		return nil, err
	default:
		tmp, err := os.MkdirTemp("", "strata-nixdb-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(tmp)
		dst := filepath.Join(tmp, dbFile)
		if err := copyFile(src, dst); err != nil {
			return nil, err
		}
		if err := copyFile(src+walSuffix, dst+walSuffix); err != nil {
			return nil, err
		}
		// The copy is private, so SQLite may build its WAL index (-shm)
		// next to it; query_only keeps it from writing anything else.
		dsn = sqliteURI(dst, "_pragma=query_only(1)")
	}

	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, err
	}
	defer db.Close()
	db.SetMaxOpenConns(2)
	paths, err := db.Conn(ctx)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dbFile, err)
	}
	defer paths.Close()
	if err := checkSchema(ctx, paths); err != nil {
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
		done    = make(chan struct{})
	)
	go func() {
		defer close(done)
		refs, refsErr = readRefs(ctx, refsConn)
	}()
	infos, ids, err := readValidPaths(ctx, paths)
	<-done
	if err != nil {
		return nil, err
	}
	if refsErr != nil {
		return nil, refsErr
	}
	if err := joinRefs(infos, ids, refs); err != nil {
		return nil, err
	}
	slices.SortFunc(infos, func(a, b PathInfo) int { return strings.Compare(a.Path, b.Path) })
	return infos, nil
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
var schemaColumns = []struct {
	table   string
	columns []string
}{
	{"ValidPaths", []string{"id", "path", "hash", "deriver", "narSize"}},
	{"Refs", []string{"referrer", "reference"}},
}

func checkSchema(ctx context.Context, conn *sql.Conn) error {
	for _, t := range schemaColumns {
		rows, err := conn.QueryContext(ctx, "SELECT name FROM pragma_table_info(?)", t.table)
		if err != nil {
			return fmt.Errorf("read schema: %w", err)
		}
		have := map[string]bool{}
		for rows.Next() {
			var name string
			if err := rows.Scan(&name); err != nil {
				rows.Close()
				return fmt.Errorf("read schema: %w", err)
			}
			have[name] = true
		}
		err = rows.Err()
		rows.Close()
		if err != nil {
			return fmt.Errorf("read schema: %w", err)
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

func readValidPaths(ctx context.Context, conn *sql.Conn) ([]PathInfo, *idIndex, error) {
	var (
		infos []PathInfo
		ids   []int64
	)
	err := rawQuery(ctx, conn, "SELECT id, path, hash, deriver, narSize FROM ValidPaths", 5, func(v []driver.Value) error {
		id, ok := v[0].(int64)
		if !ok {
			return fmt.Errorf("id %v is not an integer", v[0])
		}
		var in PathInfo
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

func joinRefs(infos []PathInfo, ids *idIndex, pairs []int64) error {
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
