package nixstore

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
)

// A generation's Nix DB is the whole answer to a builder's first start:
// instead of inserting a generation's rows one by one (ImportDB; SQLite's
// own B-tree work alone is over a second per 100,000 paths), an empty
// builder installs a ready SQLite file, built once per generation on the
// server from the snapshot's own db.sqlite (BuildGenerationDB), by
// rename(2) under Nix's big-lock (InstallDB). What Nix reports about every
// path is then the central store's own, byte for byte: signatures, content
// addresses, derivers, registration times, derivation outputs.

// DBFile describes a generation's Nix DB file.
type DBFile struct {
	// SHA256 (base 16) and Size are the file's.
	SHA256 string
	Size   int64
	// Paths is how many valid paths it holds, the generation's root
	// included.
	Paths int
	// Schema is the schema version (<db dir>/schema) of the store it was
	// made from.
	Schema int
	// Root is the generation's root path (RootOf), registered in it.
	Root string
}

// BuildGenerationDB writes to dst a self-contained copy of the Nix DB in
// dbDir (a snapshot's var/nix/db; a write-ahead log is replayed, see
// ReadDB) with root registered as a valid path that refers to every other
// valid path (what the builder's import does in the same transaction; see
// RootUpdate), registered at regTime (the generation's creation time: the
// same generation gives the same rows on every server). The copy is made
// with VACUUM INTO, so it has no free pages and no log; it is left in WAL
// mode, as Nix keeps its DB. It passes PRAGMA integrity_check and
// foreign_key_check before it is renamed to dst. The schema version must
// be one ImportDB knows. The valid paths copied must be the generation's:
// their registration (WriteRegistration) must have the sha256
// registration, the one its manifest records (on a replica, the one
// checked against the primary's manifest); otherwise ErrNotRegistration,
// and no file.
func BuildGenerationDB(ctx context.Context, dbDir, dst string, root GenerationRoot, regTime int64, registration string) (DBFile, error) {
	f, err := buildGenerationDB(ctx, dbDir, dst, root, regTime, registration)
	if err != nil {
		return f, fmt.Errorf("build generation db from %s: %w", dbDir, err)
	}
	return f, nil
}

// ErrNotRegistration is BuildGenerationDB's error for a DB whose valid
// paths are not those of the generation's registration.
var ErrNotRegistration = errors.New("the nix db's valid paths are not the generation's registration")

func buildGenerationDB(ctx context.Context, dbDir, dst string, root GenerationRoot, regTime int64, registration string) (DBFile, error) {
	var out DBFile
	v, err := SchemaVersion(dbDir)
	if err != nil {
		return out, err
	}
	if !slices.Contains(KnownSchemaVersions, v) {
		return out, fmt.Errorf("%w: schema version %d (known: %v)", ErrUnknownSchema, v, KnownSchemaVersions)
	}
	if !isBase16SHA256(root.NarHash) {
		return out, fmt.Errorf("root %s: NAR hash %q is not 64 lowercase hex digits", root.Path, clip(root.NarHash))
	}
	tmp := dst + ".tmp"
	for _, p := range sqliteFiles(tmp) {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return out, err
		}
	}
	defer func() {
		for _, p := range sqliteFiles(tmp) {
			os.Remove(p)
		}
	}()
	src, done, err := openSnapshotDB(dbDir)
	if err != nil {
		return out, err
	}
	// The rows checked are the rows copied: one open database (read-only
	// and immutable, or a private copy), read and then vacuumed.
	rs, err := readOpenDB(ctx, src, false)
	if err != nil {
		done()
		return out, err
	}
	sum, err := RegistrationSHA256(rs.Infos())
	if err != nil {
		done()
		return out, err
	}
	if sum != registration {
		done()
		return out, fmt.Errorf("%w: its %d valid paths give registration sha256 %s, the generation's is %s", ErrNotRegistration, len(rs.Paths), sum, registration)
	}
	rs = nil
	_, err = src.ExecContext(ctx, "VACUUM INTO ?", tmp)
	done()
	if err != nil {
		return out, fmt.Errorf("copy: %w", err)
	}
	db, err := sql.Open("sqlite", sqliteURI(tmp, "_pragma=foreign_keys(1)&_pragma=synchronous(full)&_txlock=immediate"))
	if err != nil {
		return out, err
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	if err := checkColumns(ctx, db); err != nil {
		return out, err
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return out, err
	}
	defer tx.Rollback()
	var n int
	if err := tx.QueryRowContext(ctx, "SELECT count(*) FROM ValidPaths WHERE path = ?", root.Path).Scan(&n); err != nil {
		return out, err
	}
	if n != 0 {
		return out, fmt.Errorf("the store already has a path named like the root %s", root.Path)
	}
	r, err := tx.ExecContext(ctx, "INSERT INTO ValidPaths (path, hash, registrationTime, narSize) VALUES (?, ?, ?, ?)",
		root.Path, "sha256:"+root.NarHash, regTime, int64(root.NarSize))
	if err != nil {
		return out, fmt.Errorf("register root %s: %w", root.Path, err)
	}
	id, err := r.LastInsertId()
	if err != nil {
		return out, err
	}
	if _, err := tx.ExecContext(ctx, "INSERT INTO Refs (referrer, reference) SELECT ?, id FROM ValidPaths WHERE id != ? ORDER BY id", id, id); err != nil {
		return out, fmt.Errorf("register root %s: %w", root.Path, err)
	}
	if err := tx.QueryRowContext(ctx, "SELECT count(*) FROM ValidPaths").Scan(&out.Paths); err != nil {
		return out, err
	}
	if err := tx.Commit(); err != nil {
		return out, fmt.Errorf("register root %s: %w", root.Path, err)
	}
	if err := checkIntegrity(ctx, db); err != nil {
		return out, err
	}
	// WAL, as Nix sets it: the file header says so, and closing the last
	// connection checkpoints and removes the log.
	if _, err := db.ExecContext(ctx, "PRAGMA journal_mode=WAL"); err != nil {
		return out, err
	}
	if err := db.Close(); err != nil {
		return out, err
	}
	if _, err := os.Stat(tmp + "-wal"); err == nil {
		return out, fmt.Errorf("%s-wal left after close", tmp)
	}
	fh, err := os.Open(tmp)
	if err != nil {
		return out, err
	}
	h := sha256.New()
	out.Size, err = io.Copy(h, fh)
	if err == nil {
		err = fh.Sync()
	}
	fh.Close()
	if err != nil {
		return out, err
	}
	out.SHA256, out.Schema, out.Root = hex.EncodeToString(h.Sum(nil)), v, root.Path
	if err := os.Rename(tmp, dst); err != nil {
		return out, err
	}
	return out, syncDir(filepath.Dir(dst))
}

// checkColumns fails unless the tables ImportDB knows have the columns
// it knows (schemaTables).
func checkColumns(ctx context.Context, db *sql.DB) error {
	conn, err := db.Conn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	for _, t := range schemaTables {
		have, err := columnsOf(ctx, conn, t.table)
		if err != nil {
			return err
		}
		if len(have) != len(t.columns) {
			return fmt.Errorf("%w: table %s has columns %v, want %v", ErrUnknownSchema, t.table, slicesSortedKeys(boolMap(have)), t.columns)
		}
		for _, c := range t.columns {
			if !have[c] {
				return fmt.Errorf("%w: table %s has no column %s", ErrUnknownSchema, t.table, c)
			}
		}
	}
	return nil
}

func boolMap(m map[string]bool) map[string]string {
	out := make(map[string]string, len(m))
	for k := range m {
		out[k] = ""
	}
	return out
}

// checkIntegrity runs PRAGMA integrity_check and foreign_key_check.
func checkIntegrity(ctx context.Context, db *sql.DB) error {
	var res string
	if err := db.QueryRowContext(ctx, "PRAGMA integrity_check(1)").Scan(&res); err != nil {
		return fmt.Errorf("integrity check: %w", err)
	}
	if res != "ok" {
		return fmt.Errorf("integrity check: %s", res)
	}
	rows, err := db.QueryContext(ctx, "PRAGMA foreign_key_check")
	if err != nil {
		return fmt.Errorf("foreign key check: %w", err)
	}
	defer rows.Close()
	if rows.Next() {
		return errors.New("foreign key check: a reference to a path that is not valid")
	}
	return rows.Err()
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}
