package nixstore

import (
	"context"
	"database/sql"
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
// dbDir must not change while ReadDB runs (a snapshot never does). ReadDB
// copies db.sqlite and its write-ahead log db.sqlite-wal, if present, into a
// private temporary directory and reads the copy: SQLite must write the WAL
// index to replay the log, which a read-only snapshot does not allow, and a
// -shm left behind by the live store means nothing to another reader. It
// reads each table with one query. A missing or corrupt database, or one
// whose tables lack the columns of Nix's schema, is an error.
func ReadDB(ctx context.Context, dbDir string) ([]PathInfo, error) {
	infos, err := readDB(ctx, dbDir)
	if err != nil {
		return nil, fmt.Errorf("read nix db %s: %w", dbDir, err)
	}
	return infos, nil
}

func readDB(ctx context.Context, dbDir string) ([]PathInfo, error) {
	tmp, err := os.MkdirTemp("", "strata-nixdb-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	if err := copyFile(filepath.Join(dbDir, dbFile), filepath.Join(tmp, dbFile)); err != nil {
		return nil, err
	}
	err = copyFile(filepath.Join(dbDir, dbFile+walSuffix), filepath.Join(tmp, dbFile+walSuffix))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}

	// The copy is private, so SQLite may build its WAL index (-shm) next to
	// it; query_only keeps the reader from changing anything else.
	dsn := "file:" + (&url.URL{Path: filepath.Join(tmp, dbFile)}).EscapedPath() +
		"?_pragma=query_only(1)&_pragma=busy_timeout(5000)"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, err
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	conn, err := db.Conn(ctx)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dbFile, err)
	}
	defer conn.Close()

	if err := checkSchema(ctx, conn); err != nil {
		return nil, err
	}
	infos, byID, err := readValidPaths(ctx, conn)
	if err != nil {
		return nil, err
	}
	if err := readRefs(ctx, conn, infos, byID); err != nil {
		return nil, err
	}
	slices.SortFunc(infos, func(a, b PathInfo) int { return strings.Compare(a.Path, b.Path) })
	return infos, nil
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

func readValidPaths(ctx context.Context, conn *sql.Conn) ([]PathInfo, map[int64]int, error) {
	rows, err := conn.QueryContext(ctx, "SELECT id, path, hash, deriver, narSize FROM ValidPaths")
	if err != nil {
		return nil, nil, fmt.Errorf("read ValidPaths: %w", err)
	}
	defer rows.Close()
	var (
		infos []PathInfo
		byID  = make(map[int64]int)
	)
	for rows.Next() {
		var (
			id      int64
			in      PathInfo
			hash    string
			deriver sql.NullString
			narSize sql.NullInt64
		)
		if err := rows.Scan(&id, &in.Path, &hash, &deriver, &narSize); err != nil {
			return nil, nil, fmt.Errorf("read ValidPaths: %w", err)
		}
		if in.NarHash, err = dbHash(hash); err != nil {
			return nil, nil, fmt.Errorf("read ValidPaths: path %s: %w", in.Path, err)
		}
		if narSize.Int64 < 0 {
			return nil, nil, fmt.Errorf("read ValidPaths: path %s: negative narSize %d", in.Path, narSize.Int64)
		}
		in.NarSize = uint64(narSize.Int64)
		in.Deriver = deriver.String
		byID[id] = len(infos)
		infos = append(infos, in)
	}
	if err := rows.Err(); err != nil {
		return nil, nil, fmt.Errorf("read ValidPaths: %w", err)
	}
	return infos, byID, nil
}

func readRefs(ctx context.Context, conn *sql.Conn, infos []PathInfo, byID map[int64]int) error {
	rows, err := conn.QueryContext(ctx, "SELECT referrer, reference FROM Refs")
	if err != nil {
		return fmt.Errorf("read Refs: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var from, to int64
		if err := rows.Scan(&from, &to); err != nil {
			return fmt.Errorf("read Refs: %w", err)
		}
		i, ok := byID[from]
		if !ok {
			return fmt.Errorf("read Refs: referrer id %d is not in ValidPaths", from)
		}
		j, ok := byID[to]
		if !ok {
			return fmt.Errorf("read Refs: path %s refers to id %d, which is not in ValidPaths", infos[i].Path, to)
		}
		infos[i].References = append(infos[i].References, infos[j].Path)
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("read Refs: %w", err)
	}
	for i := range infos {
		slices.Sort(infos[i].References)
	}
	return nil
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
