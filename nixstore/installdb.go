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
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

var (
	// ErrDBInUse is returned by InstallDB when a Nix process has the
	// store open (it holds the big-lock): the DB is left as it is.
	ErrDBInUse = errors.New("the nix db is in use: a Nix process holds the big-lock")
	// ErrDBNotEmpty is returned by InstallDB when the DB has valid paths.
	ErrDBNotEmpty = errors.New("the nix db has valid paths")
	// ErrDBReplaced wraps an InstallDB error that came after the new DB
	// was renamed over db.sqlite: the new DB is in place (a crash before
	// the directory reaches the disk may still bring the old one back).
	ErrDBReplaced = errors.New("the generation's nix db replaced the local one")
)

// newDBPrefix names InstallDB's temporary files in the DB dir.
const newDBPrefix = dbFile + ".strata-new-"

// The steps of InstallDB, in order, as InstallOptions.Step sees them.
const (
	StepDownload   = "download"   // the file is being written to a temporary file
	StepVerify     = "verify"     // it is complete, checked against want
	StepSchema     = "schema"     // its schema is being matched to the local one
	StepSync       = "sync"       // it is being written to disk (fsync)
	StepLock       = "lock"       // the big-lock is being taken
	StepCheckpoint = "checkpoint" // the old DB is checkpointed, its log removed
	StepRename     = "rename"     // the new file replaces db.sqlite
	StepDone       = "done"       // installed; the big-lock is still held
)

// InstallOptions are InstallDB's hooks.
type InstallOptions struct {
	// Step, when set, is called as each step begins; an error stops
	// InstallDB there (crash and failure tests).
	Step func(step string) error
}

// DBEmpty reports whether the Nix DB in dbDir has no valid paths (false
// with an error when it cannot tell, ErrUnknownSchema-wrapped when there
// is no DB).
func DBEmpty(ctx context.Context, dbDir string) (bool, error) {
	p := filepath.Join(dbDir, dbFile)
	if _, err := os.Stat(p); err != nil {
		return false, fmt.Errorf("%w: %w", ErrUnknownSchema, err)
	}
	db, err := sql.Open("sqlite", sqliteURI(p, "_pragma=busy_timeout(60000)&_pragma=query_only(1)"))
	if err != nil {
		return false, err
	}
	defer db.Close()
	var any int
	if err := db.QueryRowContext(ctx, "SELECT EXISTS (SELECT 1 FROM ValidPaths)").Scan(&any); err != nil {
		return false, fmt.Errorf("read %s: %w", p, err)
	}
	return any == 0, nil
}

// InstallDB replaces the Nix DB in dbDir, which must have no valid paths,
// with the generation DB read from r (see BuildGenerationDB), so that at
// every instant db.sqlite is either the old DB or the complete new one:
//
//  1. r is written to a temporary file in dbDir (same filesystem) while
//     its SHA-256 is computed; size and hash must be want's.
//  2. The file's schema is matched to the local DB's, the one this
//     builder's Nix made: the schema version (<dbDir>/schema) must be
//     want.Schema, every table both have must have the same columns,
//     indexes and triggers; tables only the new file has (the
//     ca-derivations tables of a central store whose builders' Nix lacks
//     the feature) are dropped, tables only the local DB has are created
//     with its own SQL, and indexes and triggers become the local DB's
//     (one both have whose SQL says something else, not merely spaced,
//     cased, quoted or commented otherwise, is made again with the local
//     SQL).
//     It must hold want.Paths valid paths, want.Root among them (the
//     server ran integrity and foreign key checks when it made the file;
//     the SHA-256 says this is that file). It is synced.
//  3. Nix's big-lock (<dbDir>/big-lock) is taken exclusively, without
//     waiting: every Nix process holds it shared for as long as it has
//     the store open, so holding it means nobody has the DB open. When a
//     Nix process holds it, ErrDBInUse, and the DB stays as it was.
//  4. Under the lock: the old DB still has no valid paths; it is
//     checkpointed and its -wal and -shm are removed (a log left by the
//     old DB must never be replayed into the new one).
//  5. rename(2) over db.sqlite, then the directory is synced.
//
// The new file gets the old db.sqlite's owner and mode (Nix's own DB:
// root's on a multi-user install, the user's on a single-user one, which
// that user's Nix must still be able to write). It is read from r up to
// want.Size bytes and one more: a server that sends more is refused
// without filling the disk.
//
// An error before the rename leaves the old DB in place and removes the
// temporary file; an error after it (syncing the directory) wraps
// ErrDBReplaced: the new DB is in place. A crash may leave a temporary
// file (db.sqlite.strata-new-*), which the next InstallDB removes.
func InstallDB(ctx context.Context, dbDir string, r io.Reader, want DBFile, opt InstallOptions) error {
	if err := installDB(ctx, dbDir, r, want, opt); err != nil {
		return fmt.Errorf("install nix db into %s: %w", dbDir, err)
	}
	return nil
}

func installDB(ctx context.Context, dbDir string, r io.Reader, want DBFile, opt InstallOptions) (err error) {
	step := func(s string) error {
		if opt.Step == nil {
			return nil
		}
		if err := opt.Step(s); err != nil {
			return fmt.Errorf("%s: %w", s, err)
		}
		return nil
	}
	removeStale(dbDir)
	v, err := SchemaVersion(dbDir)
	if err != nil {
		return err
	}
	if v != want.Schema {
		return fmt.Errorf("%w: local schema version %d, the generation's DB has %d", ErrUnknownSchema, v, want.Schema)
	}
	if empty, err := DBEmpty(ctx, dbDir); err != nil {
		return err
	} else if !empty {
		return ErrDBNotEmpty
	}
	old := filepath.Join(dbDir, dbFile)
	st, err := os.Stat(old)
	if err != nil {
		return err
	}

	if err := step(StepDownload); err != nil {
		return err
	}
	f, err := os.CreateTemp(dbDir, newDBPrefix+"*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			for _, p := range sqliteFiles(tmp) {
				os.Remove(p)
			}
		}
	}()
	h := sha256.New()
	if want.Size < 0 {
		return fmt.Errorf("the generation's DB is said to be %d bytes", want.Size)
	}
	// One byte more than want.Size tells a longer file from an exact one.
	n, err := io.Copy(io.MultiWriter(f, h), io.LimitReader(r, want.Size+1))
	if err != nil {
		return fmt.Errorf("download: %w", err)
	}
	if n > want.Size {
		return fmt.Errorf("download: the server sent more than the %d bytes it said the generation's DB has", want.Size)
	}
	if err := step(StepVerify); err != nil {
		return err
	}
	if sum := hex.EncodeToString(h.Sum(nil)); n != want.Size || sum != want.SHA256 {
		return fmt.Errorf("the generation's DB is %d bytes with sha256 %s, want %d bytes with %s", n, sum, want.Size, want.SHA256)
	}
	if err := keepOwner(f, st); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := step(StepSchema); err != nil {
		return err
	}
	if err := matchSchema(ctx, tmp, old, want); err != nil {
		return err
	}
	for _, s := range []string{"-wal", "-journal"} {
		if fi, err := os.Stat(tmp + s); err == nil && fi.Size() > 0 {
			return fmt.Errorf("%s%s left after close", tmp, s)
		}
	}
	if err := step(StepSync); err != nil {
		return err
	}
	if err := syncFile(tmp); err != nil {
		return err
	}

	if err := step(StepLock); err != nil {
		return err
	}
	unlock, err := lockExclusive(filepath.Join(dbDir, "big-lock"))
	if err != nil {
		return err
	}
	defer unlock()
	if err := step(StepCheckpoint); err != nil {
		return err
	}
	if err := retireOld(ctx, old); err != nil {
		return err
	}
	if err := step(StepRename); err != nil {
		return err
	}
	if err := os.Rename(tmp, old); err != nil {
		return err
	}
	for _, p := range sqliteFiles(tmp)[1:] { // tmp itself is db.sqlite now
		os.Remove(p)
	}
	if err := syncDir(dbDir); err != nil {
		return fmt.Errorf("%w, but %w", ErrDBReplaced, err)
	}
	if err := step(StepDone); err != nil {
		return fmt.Errorf("%w, but %w", ErrDBReplaced, err)
	}
	return nil
}

// keepOwner gives the new DB file f the owner and mode of the DB it
// replaces (old).
func keepOwner(f *os.File, old os.FileInfo) error {
	if st, ok := old.Sys().(*syscall.Stat_t); ok {
		if err := f.Chown(int(st.Uid), int(st.Gid)); err != nil {
			return fmt.Errorf("give the new db the owner of %s: %w", old.Name(), err)
		}
	}
	// After chown, which may clear set-id bits.
	if err := f.Chmod(old.Mode().Perm()); err != nil {
		return fmt.Errorf("give the new db the mode of %s: %w", old.Name(), err)
	}
	return nil
}

// removeStale removes temporary files of an earlier InstallDB that did
// not finish.
func removeStale(dbDir string) {
	ms, _ := filepath.Glob(filepath.Join(dbDir, newDBPrefix+"*"))
	for _, m := range ms {
		os.Remove(m)
	}
}

// lockExclusive takes an exclusive flock on path without waiting.
func lockExclusive(path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open nix big-lock: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if errors.Is(err, unix.EWOULDBLOCK) {
		f.Close()
		return nil, ErrDBInUse
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("lock nix big-lock: %w", err)
	}
	return func() { f.Close() }, nil
}

// retireOld makes the old DB at p self-contained, under the big-lock: it
// must still have no valid paths; its log is checkpointed into it, then
// -wal and -shm are removed.
func retireOld(ctx context.Context, p string) error {
	db, err := sql.Open("sqlite", sqliteURI(p, "_pragma=busy_timeout(10000)"))
	if err != nil {
		return err
	}
	defer db.Close()
	var any int
	if err := db.QueryRowContext(ctx, "SELECT EXISTS (SELECT 1 FROM ValidPaths)").Scan(&any); err != nil {
		return fmt.Errorf("read %s: %w", p, err)
	}
	if any != 0 {
		return ErrDBNotEmpty
	}
	var busy, logged, done int
	if err := db.QueryRowContext(ctx, "PRAGMA wal_checkpoint(TRUNCATE)").Scan(&busy, &logged, &done); err != nil {
		return fmt.Errorf("checkpoint %s: %w", p, err)
	}
	if busy != 0 {
		return fmt.Errorf("checkpoint %s: %w", p, ErrDBInUse)
	}
	if err := db.Close(); err != nil {
		return err
	}
	for _, s := range []string{"-wal", "-shm"} {
		if err := os.Remove(p + s); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return nil
}

// schemaMigrations is the table in which Nix (2.26) records the schema
// migrations it ran.
const schemaMigrations = "SchemaMigrations"

// schemaObject is one row of sqlite_master.
type schemaObject struct{ typ, name, table, sql string }

func readSchema(ctx context.Context, db *sql.DB) (map[string]schemaObject, error) {
	rows, err := db.QueryContext(ctx, "SELECT type, name, tbl_name, coalesce(sql, '') FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
	if err != nil {
		return nil, fmt.Errorf("read schema: %w", err)
	}
	defer rows.Close()
	out := map[string]schemaObject{}
	for rows.Next() {
		var o schemaObject
		if err := rows.Scan(&o.typ, &o.name, &o.table, &o.sql); err != nil {
			return nil, fmt.Errorf("read schema: %w", err)
		}
		out[o.typ+" "+o.name] = o
	}
	return out, rows.Err()
}

// matchSchema makes the schema of the new DB at p the local one's at
// local (see InstallDB) and checks its contents against want.
func matchSchema(ctx context.Context, p, local string, want DBFile) error {
	ldb, err := sql.Open("sqlite", sqliteURI(local, "_pragma=busy_timeout(60000)&_pragma=query_only(1)"))
	if err != nil {
		return err
	}
	defer ldb.Close()
	ls, err := readSchema(ctx, ldb)
	if err != nil {
		return fmt.Errorf("local db: %w", err)
	}
	lcols := map[string][]string{}
	for _, o := range ls {
		if o.typ == "table" {
			if lcols[o.name], err = columnList(ctx, ldb, o.name); err != nil {
				return err
			}
		}
	}
	// Nix 2.26 records the schema migrations it ran (the ca-derivations
	// tables) in SchemaMigrations: with the schema the local one, so is
	// that record.
	var migrations []string
	if _, ok := lcols[schemaMigrations]; ok {
		rows, err := ldb.QueryContext(ctx, "SELECT migration FROM "+schemaMigrations+" ORDER BY migration")
		if err != nil {
			return fmt.Errorf("local db: %w", err)
		}
		for rows.Next() {
			var m string
			if err := rows.Scan(&m); err != nil {
				rows.Close()
				return fmt.Errorf("local db: %w", err)
			}
			migrations = append(migrations, m)
		}
		if err := rows.Close(); err != nil {
			return fmt.Errorf("local db: %w", err)
		}
	}
	ldb.Close()

	db, err := sql.Open("sqlite", sqliteURI(p, "_pragma=foreign_keys(0)&_pragma=synchronous(full)"))
	if err != nil {
		return err
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	ns, err := readSchema(ctx, db)
	if err != nil {
		return fmt.Errorf("generation db: %w", err)
	}
	var drop, create []string
	for _, o := range ns {
		if o.typ != "table" {
			continue
		}
		lc, ok := lcols[o.name]
		if !ok {
			drop = append(drop, o.name)
			continue
		}
		nc, err := columnList(ctx, db, o.name)
		if err != nil {
			return err
		}
		if !slices.Equal(lc, nc) {
			return fmt.Errorf("%w: table %s has columns %v here, %v in the generation's DB", ErrUnknownSchema, o.name, lc, nc)
		}
	}
	for _, o := range ls {
		if o.typ == "table" {
			if _, ok := ns[o.typ+" "+o.name]; !ok {
				create = append(create, o.name)
			}
		}
	}
	// Indexes, triggers and views become the local DB's: those only the
	// new file has go (first, as they may name a dropped table), those
	// only the local DB has are made with its SQL (after the tables), and
	// those both have whose SQL says something else (sameSQL: not merely
	// spaced, cased, quoted or commented otherwise) are made again with
	// the local SQL.
	var dropObj, createObj []schemaObject
	for k, o := range ns {
		if o.typ == "table" || slices.Contains(drop, o.table) {
			continue
		}
		if l, ok := ls[k]; !ok || l.sql != "" && o.sql != "" && !sameSQL(l.sql, o.sql) {
			dropObj = append(dropObj, o)
		}
	}
	for k, o := range ls {
		if o.typ == "table" || o.sql == "" {
			continue
		}
		if n, ok := ns[k]; !ok || n.sql != "" && !sameSQL(o.sql, n.sql) {
			createObj = append(createObj, o)
		}
	}
	_, hasMigrations := lcols[schemaMigrations]
	if len(drop)+len(create)+len(dropObj)+len(createObj) > 0 || hasMigrations {
		slices.Sort(drop)
		slices.SortFunc(dropObj, func(a, b schemaObject) int { return strings.Compare(a.name, b.name) })
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		defer tx.Rollback()
		for _, o := range dropObj {
			if _, err := tx.ExecContext(ctx, "DROP "+strings.ToUpper(o.typ)+` "`+strings.ReplaceAll(o.name, `"`, `""`)+`"`); err != nil {
				return fmt.Errorf("drop %s %s: %w", o.typ, o.name, err)
			}
		}
		for _, t := range drop {
			if _, err := tx.ExecContext(ctx, `DROP TABLE "`+strings.ReplaceAll(t, `"`, `""`)+`"`); err != nil {
				return fmt.Errorf("drop table %s: %w", t, err)
			}
		}
		objs := sortedObjects(ls)
		for _, o := range objs {
			if o.typ == "table" && slices.Contains(create, o.name) {
				if _, err := tx.ExecContext(ctx, o.sql); err != nil {
					return fmt.Errorf("create table %s: %w", o.name, err)
				}
			}
		}
		slices.SortFunc(createObj, func(a, b schemaObject) int { return strings.Compare(a.typ+a.name, b.typ+b.name) })
		for _, o := range createObj {
			if _, err := tx.ExecContext(ctx, o.sql); err != nil {
				return fmt.Errorf("create %s %s: %w", o.typ, o.name, err)
			}
		}
		if hasMigrations {
			if _, err := tx.ExecContext(ctx, "DELETE FROM "+schemaMigrations); err != nil {
				return fmt.Errorf("schema migrations: %w", err)
			}
			for _, m := range migrations {
				if _, err := tx.ExecContext(ctx, "INSERT INTO "+schemaMigrations+" (migration) VALUES (?)", m); err != nil {
					return fmt.Errorf("schema migrations: %w", err)
				}
			}
		}
		if err := tx.Commit(); err != nil {
			return err
		}
	}
	// The server checked integrity and foreign keys when it made the
	// file (BuildGenerationDB), and the SHA-256 says this is that file;
	// what is left to check is that it is the generation's.
	var n, root int
	if err := db.QueryRowContext(ctx, "SELECT count(*), (SELECT count(*) FROM ValidPaths WHERE path = ?) FROM ValidPaths", want.Root).Scan(&n, &root); err != nil {
		return fmt.Errorf("generation db: %w", err)
	}
	if n != want.Paths || root != 1 {
		return fmt.Errorf("the generation's DB has %d valid paths (root %s: %d), want %d", n, want.Root, root, want.Paths)
	}
	return db.Close()
}

// sameSQL reports whether two CREATE statements from sqlite_master say
// the same: Nix versions (and SQLite, which keeps the text as written)
// may space, case, quote or comment one statement differently.
func sameSQL(a, b string) bool { return normSQL(a) == normSQL(b) }

// normSQL is sql with comments dropped, runs of white space made one space
// and none kept next to punctuation, keywords and plain identifiers lower
// case (SQL is case-insensitive there), and a quoted plain identifier
// ("Refs", `Refs`, [Refs]) written bare. String literals ('...') are kept
// as they are.
func normSQL(sql string) string {
	var b strings.Builder
	space := false
	punct := func(c byte) bool { return strings.IndexByte("(),;=<>+-*/.|", c) >= 0 }
	emit := func(s string) {
		if space && b.Len() > 0 && !punct(b.String()[b.Len()-1]) && !punct(s[0]) {
			b.WriteByte(' ')
		}
		space = false
		b.WriteString(s)
	}
	for i := 0; i < len(sql); {
		c := sql[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v':
			space = true
			i++
		case c == '-' && strings.HasPrefix(sql[i:], "--"):
			for i < len(sql) && sql[i] != '\n' {
				i++
			}
			space = true
		case c == '/' && strings.HasPrefix(sql[i:], "/*"):
			if j := strings.Index(sql[i+2:], "*/"); j >= 0 {
				i += j + 4
			} else {
				i = len(sql)
			}
			space = true
		case c == '\'' || c == '"' || c == '`' || c == '[':
			end := c
			if c == '[' {
				end = ']'
			}
			j := i + 1
			for j < len(sql) {
				if sql[j] == end {
					if end != ']' && j+1 < len(sql) && sql[j+1] == end { // doubled: a quote inside
						j += 2
						continue
					}
					break
				}
				j++
			}
			tok := sql[i:min(j+1, len(sql))]
			if c != '\'' && plainIdent(sql[i+1:min(j, len(sql))]) {
				tok = strings.ToLower(sql[i+1 : j])
			}
			emit(tok)
			i = j + 1
		default:
			j := i + 1
			if !punct(c) {
				for j < len(sql) && !punct(sql[j]) && strings.IndexByte(" \t\n\r\f\v'\"`[", sql[j]) < 0 {
					j++
				}
			}
			emit(strings.ToLower(sql[i:j]))
			i = j
		}
	}
	return b.String()
}

// plainIdent reports whether s is an identifier that needs no quotes.
func plainIdent(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c != '_' && (c < 'a' || c > 'z') && (c < 'A' || c > 'Z') && (i == 0 || c < '0' || c > '9') {
			return false
		}
	}
	return true
}

func sortedObjects(m map[string]schemaObject) []schemaObject {
	out := make([]schemaObject, 0, len(m))
	for _, o := range m {
		out = append(out, o)
	}
	slices.SortFunc(out, func(a, b schemaObject) int { return strings.Compare(a.name, b.name) })
	return out
}

// columnList returns the names and declared types of table's columns,
// in order.
func columnList(ctx context.Context, db *sql.DB, table string) ([]string, error) {
	rows, err := db.QueryContext(ctx, "SELECT name, type, \"notnull\", pk FROM pragma_table_info(?)", table)
	if err != nil {
		return nil, fmt.Errorf("read schema: %w", err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var name, typ string
		var notNull, pk int
		if err := rows.Scan(&name, &typ, &notNull, &pk); err != nil {
			return nil, fmt.Errorf("read schema: %w", err)
		}
		out = append(out, fmt.Sprintf("%s %s notnull=%d pk=%d", name, strings.ToLower(typ), notNull, pk))
	}
	return out, rows.Err()
}

func syncFile(p string) error {
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", p, err)
	}
	return nil
}
