//go:build integration

package nixstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
)

// genDB builds generation gen's DB from central into a temporary file.
func genDB(t *testing.T, central nixtest.Store, gen uint64) (string, DBFile) {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "nixdb.sqlite")
	infos, err := ReadDB(context.Background(), dbDir(central))
	if err != nil {
		t.Fatal(err)
	}
	reg, err := RegistrationSHA256(infos)
	if err != nil {
		t.Fatal(err)
	}
	f, err := BuildGenerationDB(context.Background(), dbDir(central), dst, RootOf("/nix/store", gen), 1_700_000_000, reg)
	if err != nil {
		t.Fatal(err)
	}
	return dst, f
}

// builderStore is an empty store of Nix v with the central store's files
// and generation gen's root file, as a builder has them under its overlay
// before its import.
func builderStore(t *testing.T, v nixVersion, central nixtest.Store, gen uint64, features ...string) nixtest.Store {
	t.Helper()
	b := storeOf(t, v, features...)
	store := filepath.Join(b.NixRoot(), "store")
	copyStore(t, central, store)
	r := RootOf("/nix/store", gen)
	if err := os.WriteFile(filepath.Join(store, filepath.Base(r.Path)), r.Content, 0o444); err != nil {
		t.Fatal(err)
	}
	return b
}

func install(t *testing.T, b nixtest.Store, file string, f DBFile, opt InstallOptions) error {
	t.Helper()
	in, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	return InstallDB(context.Background(), dbDir(b), in, f, opt)
}

// sameAsCentral fails unless Nix on b reports every path of central as
// central's Nix does (nix path-info --json: signatures, ca, deriver,
// references, NAR hash and size, registration time, ultimate), b has
// exactly those paths and root, the store verifies with its contents, and
// SQLite finds the DB sound.
func sameAsCentral(t *testing.T, b, central nixtest.Store, root string) {
	t.Helper()
	want, got := central.PathInfos(t), b.PathInfos(t)
	if _, ok := got[root]; !ok {
		t.Errorf("root %s is not valid", root)
	}
	delete(got, root)
	if len(got) != len(want) || len(want) == 0 {
		t.Errorf("nix path-info: %d paths on the builder, %d on the central store", len(got), len(want))
	}
	for p, w := range want {
		g := got[p]
		slices.Sort(g.Signatures)
		slices.Sort(w.Signatures)
		if !reflect.DeepEqual(g, w) {
			t.Errorf("nix path-info %s:\nbuilder %+v\ncentral %+v", p, g, w)
		}
	}
	verifyClean(t, b)
	var res string
	if err := openLiveDB(t, b).QueryRow("PRAGMA integrity_check").Scan(&res); err != nil || res != "ok" {
		t.Fatalf("integrity_check: %q %v", res, err)
	}
	noForeignKeyViolations(t, b)
}

func verifyClean(t *testing.T, b nixtest.Store) {
	t.Helper()
	verify := b.Command("nix-store", "--verify", "--check-contents")
	if out, err := verify.CombinedOutput(); err != nil || strings.Contains(string(out), "error") ||
		strings.Contains(string(out), "path '") {
		t.Fatalf("nix-store --verify --check-contents: %v\n%s", err, out)
	}
}

// TestIntegrationGenerationDB: a generation's DB built from a real central
// store (BuildGenerationDB) and installed into an empty store of the same
// or another Nix (InstallDB) gives the builder exactly the central store's
// paths as Nix reports them, plus the generation's root referring to every
// one. A second install refuses (the DB has paths now) and changes
// nothing. A rotation on top (ImportDB of the next generation's new rows
// with the root renamed) works, and nix-store --gc keeps every path of
// the generation while it collects an unrooted local path.
func TestIntegrationGenerationDB(t *testing.T) {
	for _, c := range []struct {
		central, builder nixVersion
		ca, builderCA    bool
	}{
		{nix28, nix28, false, false},
		{nix226, nix226, true, true},
		{nix226, nix28, true, false},  // Realisations tables dropped
		{nix226, nix226, true, false}, // 2.26 without ca-derivations: the same
		{nix28, nix226, false, true},  // the builder's Realisations tables made
	} {
		name := fmt.Sprintf("central-%s-ca-%v-builder-%s-ca-%v", c.central.name, c.ca, c.builder.name, c.builderCA)
		t.Run(name, func(t *testing.T) {
			central, made := centralStore(t, c.central, c.ca)
			file, f := genDB(t, central, 1)
			want, err := ReadDBRows(context.Background(), dbDir(central))
			if err != nil {
				t.Fatal(err)
			}
			if f.Paths != len(want.Paths)+1 || f.Schema != 10 || f.Root != RootOf("/nix/store", 1).Path {
				t.Fatalf("generation db %+v, want %d paths", f, len(want.Paths)+1)
			}
			var feats []string
			if c.builderCA {
				feats = []string{"ca-derivations"}
			}
			b := builderStore(t, c.builder, central, 1, feats...)
			// Nix versions differ in the comments of their CREATE TABLE
			// text only; the rest must be the builder's.
			localSchema := noSQLComments(schemaOf(t, b))
			localMigrations := migrationsOf(t, b)
			if err := install(t, b, file, f, InstallOptions{}); err != nil {
				t.Fatal(err)
			}
			if got := noSQLComments(schemaOf(t, b)); !reflect.DeepEqual(got, localSchema) {
				t.Errorf("schema after install differs from the one the builder's Nix made:\n%s", diffLinesOf(got, localSchema))
			}
			if got := migrationsOf(t, b); got != localMigrations {
				t.Errorf("SchemaMigrations %q after install, the builder's Nix recorded %q", got, localMigrations)
			}
			sameAsCentral(t, b, central, f.Root)
			if refs := strings.Fields(b.Run(t, "nix-store", "--query", "--references", f.Root)); len(refs) != len(want.Paths) {
				t.Fatalf("root refers to %d paths, want %d", len(refs), len(want.Paths))
			}
			if c.ca && c.builderCA {
				got, err := ReadDBRows(context.Background(), dbDir(b))
				if err != nil {
					t.Fatal(err)
				}
				if len(got.Realisations) == 0 || !reflect.DeepEqual(got.Realisations, want.Realisations) {
					t.Errorf("realisations %+v, want %+v", got.Realisations, want.Realisations)
				}
			}
			before := b.DumpDB(t)
			if err := install(t, b, file, f, InstallOptions{}); !errors.Is(err, ErrDBNotEmpty) {
				t.Fatalf("second install: %v, want ErrDBNotEmpty", err)
			}
			if b.DumpDB(t) != before {
				t.Fatal("second install changed the DB")
			}

			// Rotation: generation 2 adds a path; the row import renames
			// the root and adds its reference.
			next := central.Build(t, "gen2", `mkdir $out; echo $in0 > $out/ref`, made[0])
			rows2, err := ReadDBRows(context.Background(), dbDir(central))
			if err != nil {
				t.Fatal(err)
			}
			copyStore(t, central, filepath.Join(b.NixRoot(), "store"))
			r2 := RootOf("/nix/store", 2)
			os.WriteFile(filepath.Join(b.NixRoot(), "store", filepath.Base(r2.Path)), r2.Content, 0o444)
			res, err := ImportDB(context.Background(), dbDir(b), rows2, &RootUpdate{Path: r2.Path, NarHash: r2.NarHash, NarSize: r2.NarSize, Prev: f.Root})
			if err != nil || res.Imported < 1 {
				t.Fatalf("rotation: %+v %v", res, err)
			}
			os.Remove(filepath.Join(b.NixRoot(), "store", filepath.Base(f.Root)))
			// The GC root link, as the agent makes it.
			link := filepath.Join(b.NixRoot(), "var", "nix", "gcroots", "strata")
			os.MkdirAll(filepath.Dir(link), 0o755)
			if err := os.Symlink(r2.Path, link); err != nil {
				t.Fatal(err)
			}
			local := b.AddText(t, "local-garbage", "collect me\n")
			b.Run(t, "nix-store", "--gc")
			if out := b.Run(t, "nix-store", append([]string{"--check-validity", "--print-invalid"}, append(rowPaths(rows2), r2.Path)...)...); out != "" {
				t.Fatalf("after gc, invalid: %s", out)
			}
			if out := b.Run(t, "nix-store", "--check-validity", "--print-invalid", local); out != local {
				t.Fatalf("unrooted local path %s survived gc", local)
			}
			if _, err := os.Stat(filepath.Join(b.NixRoot(), "store", filepath.Base(next))); err != nil {
				t.Fatal(err)
			}
			verifyClean(t, b)
		})
	}
}

// migrationsOf returns the rows of b's SchemaMigrations (Nix 2.26), "-"
// without the table.
func migrationsOf(t *testing.T, b nixtest.Store) string {
	t.Helper()
	rows, err := openLiveDB(t, b).Query("SELECT migration FROM SchemaMigrations ORDER BY 1")
	if err != nil {
		if strings.Contains(err.Error(), "no such table") {
			return "-"
		}
		t.Fatal(err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var m string
		rows.Scan(&m)
		out = append(out, m)
	}
	return strings.Join(out, ",")
}

func noSQLComments(s string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if i := strings.Index(l, " --"); i >= 0 {
			l = l[:i]
		}
		out = append(out, strings.TrimRight(l, " "))
	}
	return strings.Join(out, "\n")
}

func rowPaths(rs *Rows) []string {
	out := make([]string, len(rs.Paths))
	for i := range rs.Paths {
		out[i] = rs.Paths[i].Path
	}
	return out
}

// TestIntegrationInstallDBCrash: InstallDB killed (SIGKILL, in a child
// process) at the start of each step, or failing there, leaves either the
// old, empty DB or the complete new one, never a broken one; Nix then
// works on the store, and a later InstallDB (old DB left) completes. A
// Nix process holding the store open makes InstallDB refuse with
// ErrDBInUse and replace nothing. A corrupt download, a wrong path count
// and a schema version this builder does not run are refused.
func TestIntegrationInstallDBCrash(t *testing.T) {
	central, _ := centralStore(t, nix28, false)
	file, f := genDB(t, central, 1)
	steps := []string{StepDownload, StepVerify, StepSchema, StepSync, StepLock, StepCheckpoint, StepRename, StepDone}
	for _, how := range []string{"kill", "fail"} {
		for _, s := range steps {
			t.Run(how+"-at-"+s, func(t *testing.T) {
				b := builderStore(t, nix28, central, 1)
				staleWAL(t, b)
				var err error
				if how == "kill" {
					err = installInChild(t, b, file, f, s)
				} else {
					err = install(t, b, file, f, InstallOptions{Step: func(at string) error {
						if at == s {
							return errors.New("injected")
						}
						return nil
					}})
				}
				installed := s == StepDone
				if how == "fail" && err == nil || how == "kill" && err == nil {
					t.Fatalf("install at %s did not stop", s)
				}
				// The error says whether the new DB is in place.
				if how == "fail" && errors.Is(err, ErrDBReplaced) != installed {
					t.Errorf("install failed at %s: %v; the new DB in place: %v", s, err, installed)
				}
				if installed {
					sameAsCentral(t, b, central, f.Root)
				} else {
					if d := strings.TrimSpace(b.DumpDB(t)); d != "" {
						t.Fatalf("old DB changed: %s", d)
					}
					verifyClean(t, b)
					if err := install(t, b, file, f, InstallOptions{}); err != nil {
						t.Fatalf("install after an interrupted one: %v", err)
					}
					sameAsCentral(t, b, central, f.Root)
				}
				if left, _ := filepath.Glob(filepath.Join(dbDir(b), newDBPrefix+"*")); len(left) > 0 && !installed {
					t.Errorf("temporary files left: %v", left)
				}
			})
		}
	}
	t.Run("nix holds the store open", func(t *testing.T) {
		b := builderStore(t, nix28, central, 1)
		// A Nix process with the store open holds the big-lock shared;
		// flock(1) stands in for it for the whole install.
		lock := exec.Command("flock", "--shared", filepath.Join(dbDir(b), "big-lock"), "sleep", "600")
		lock.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := lock.Start(); err != nil {
			t.Fatal(err)
		}
		stop := func() { syscall.Kill(-lock.Process.Pid, syscall.SIGKILL); lock.Wait() }
		defer stop()
		for i := 0; ; i++ {
			b, _ := os.ReadFile("/proc/locks")
			if strings.Contains(string(b), fmt.Sprintf(" %d ", lock.Process.Pid)) {
				break
			}
			if i == 100 {
				t.Fatal("flock did not take the lock")
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err := install(t, b, file, f, InstallOptions{}); !errors.Is(err, ErrDBInUse) {
			t.Fatalf("got %v, want ErrDBInUse", err)
		}
		stop()
		if d := strings.TrimSpace(b.DumpDB(t)); d != "" {
			t.Fatalf("DB changed: %s", d)
		}
		if left, _ := filepath.Glob(filepath.Join(dbDir(b), newDBPrefix+"*")); len(left) > 0 {
			t.Errorf("temporary files left: %v", left)
		}
	})
	t.Run("refusals", func(t *testing.T) {
		for _, c := range []struct {
			name string
			edit func(*DBFile)
			want string
		}{
			{"sha256", func(x *DBFile) { x.SHA256 = strings.Repeat("0", 64) }, "sha256"},
			{"paths", func(x *DBFile) { x.Paths++ }, "valid paths"},
			{"schema", func(x *DBFile) { x.Schema = 11 }, "schema version"},
			{"root", func(x *DBFile) { x.Root = RootOf("/nix/store", 7).Path }, "root"},
		} {
			b := builderStore(t, nix28, central, 1)
			g := f
			c.edit(&g)
			err := install(t, b, file, g, InstallOptions{})
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("%s: got %v", c.name, err)
			}
			if d := strings.TrimSpace(b.DumpDB(t)); d != "" {
				t.Fatalf("%s: DB changed: %s", c.name, d)
			}
		}
	})
}

// staleWAL leaves b's DB as a Nix killed in the middle leaves it: a
// write-ahead log with frames not yet checkpointed (a path registered and
// invalidated again: still no valid path), and its -shm. Replayed into
// another DB file, those frames would corrupt it.
func staleWAL(t *testing.T, b nixtest.Store) {
	t.Helper()
	p := filepath.Join(dbDir(b), dbFile)
	db, err := sql.Open("sqlite", "file:"+p+"?_pragma=wal_autocheckpoint(0)&_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for _, q := range []string{
		"INSERT INTO ValidPaths (path, hash, registrationTime) VALUES ('/nix/store/00000000000000000000000000000000-x', 'sha256:00', 1)",
		"DELETE FROM ValidPaths",
	} {
		if _, err := db.Exec(q); err != nil {
			t.Fatal(err)
		}
	}
	saved := map[string][]byte{}
	for _, s := range []string{"", "-wal", "-shm"} {
		if saved[s], err = os.ReadFile(p + s); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()
	for s, b := range saved {
		if err := os.WriteFile(p+s, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if fi, err := os.Stat(p + "-wal"); err != nil || fi.Size() == 0 {
		t.Fatalf("no log left: %v", err)
	}
}

// installInChild runs InstallDB in a child process (this test binary,
// TestHelperInstallDB) that SIGKILLs itself as step begins, and returns
// its error (a kill is *exec.ExitError).
func installInChild(t *testing.T, b nixtest.Store, file string, f DBFile, step string) error {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperInstallDB$", "-test.v")
	cmd.Env = append(os.Environ(), "STRATA_HELPER_INSTALL="+strings.Join([]string{dbDir(b), file, f.SHA256,
		fmt.Sprint(f.Size), fmt.Sprint(f.Paths), fmt.Sprint(f.Schema), f.Root, step}, "|"))
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("helper at %s: %v, want killed\n%s", step, err, out)
	}
	return err
}

// TestHelperInstallDB is installInChild's child.
func TestHelperInstallDB(t *testing.T) {
	env := os.Getenv("STRATA_HELPER_INSTALL")
	if env == "" {
		return // not a child: nothing to do
	}
	a := strings.Split(env, "|")
	var f DBFile
	f.SHA256, f.Root = a[2], a[6]
	fmt.Sscan(a[3], &f.Size)
	fmt.Sscan(a[4], &f.Paths)
	fmt.Sscan(a[5], &f.Schema)
	in, err := os.Open(a[1])
	if err != nil {
		t.Fatal(err)
	}
	err = InstallDB(context.Background(), a[0], in, f, InstallOptions{Step: func(s string) error {
		if s == a[7] {
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
			time.Sleep(time.Minute)
		}
		return nil
	}})
	t.Fatalf("not killed at %s: %v", a[7], err)
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// TestIntegrationInstallDBOwnerAndSize: the installed DB keeps the owner
// and mode of the DB it replaces (a single-user store's, not the agent's
// root), so that Nix running as that user still writes it; a server that
// sends more bytes than it said is refused after reading no more than one
// byte past the size, and the old DB stays.
func TestIntegrationInstallDBOwnerAndSize(t *testing.T) {
	central, _ := centralStore(t, nix28, false)
	file, f := genDB(t, central, 1)

	b := builderStore(t, nix28, central, 1)
	p := filepath.Join(dbDir(b), dbFile)
	if err := os.Chown(p, 12345, 23456); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, 0o640); err != nil {
		t.Fatal(err)
	}
	if err := install(t, b, file, f, InstallOptions{}); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if st.Uid != 12345 || st.Gid != 23456 || fi.Mode().Perm() != 0o640 {
		t.Errorf("installed db is %d:%d mode %o, want the old db's 12345:23456 mode 640", st.Uid, st.Gid, fi.Mode().Perm())
	}
	sameAsCentral(t, b, central, f.Root)

	b = builderStore(t, nix28, central, 1)
	in, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	r := &testenv.CountingReader{R: io.MultiReader(in, io.LimitReader(zeros{}, 256<<20))}
	err = InstallDB(context.Background(), dbDir(b), r, f, InstallOptions{})
	if err == nil || !strings.Contains(err.Error(), "more than") {
		t.Fatalf("a server sending 256 MiB more than it said: %v", err)
	}
	if r.N > f.Size+1 {
		t.Errorf("read %d bytes of a DB said to be %d", r.N, f.Size)
	}
	if d := strings.TrimSpace(b.DumpDB(t)); d != "" {
		t.Fatalf("old DB changed: %s", d)
	}
	if left, _ := filepath.Glob(filepath.Join(dbDir(b), newDBPrefix+"*")); len(left) > 0 {
		t.Errorf("temporary files left: %v", left)
	}
}

// TestIntegrationInstallDBSchemaObjects: an index or trigger the builder's
// DB and the generation's DB (real Nix 2.8 and 2.26 DBs, each way) both
// have under one name becomes the builder's when its SQL says something
// else (an index on other columns), and stays when it differs only in
// spacing, case and quoting; Nix then reports the central store's paths.
func TestIntegrationInstallDBSchemaObjects(t *testing.T) {
	const (
		localIndex   = "CREATE INDEX IndexReferrer on Refs(referrer, reference)"
		localTrigger = `CREATE TRIGGER "DeleteSelfRefs" BEFORE DELETE ON "ValidPaths" BEGIN DELETE FROM Refs WHERE referrer=old.id AND reference=old.id; END`
	)
	for _, c := range []struct{ central, builder nixVersion }{{nix226, nix28}, {nix28, nix226}} {
		t.Run("central-"+c.central.name+"-builder-"+c.builder.name, func(t *testing.T) {
			central, _ := centralStore(t, c.central, false)
			file, f := genDB(t, central, 1)
			b := builderStore(t, c.builder, central, 1)
			db, err := sql.Open("sqlite", "file:"+filepath.Join(dbDir(b), dbFile)+"?_pragma=busy_timeout(10000)")
			if err != nil {
				t.Fatal(err)
			}
			for _, q := range []string{"DROP INDEX IndexReferrer", localIndex, "DROP TRIGGER DeleteSelfRefs", localTrigger} {
				if _, err := db.Exec(q); err != nil {
					t.Fatalf("%s: %v", q, err)
				}
			}
			db.Close()
			if err := install(t, b, file, f, InstallOptions{}); err != nil {
				t.Fatal(err)
			}
			live := openLiveDB(t, b)
			var idx, trg string
			if err := live.QueryRow("SELECT sql FROM sqlite_master WHERE type = 'index' AND name = 'IndexReferrer'").Scan(&idx); err != nil {
				t.Fatal(err)
			}
			if err := live.QueryRow("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = 'DeleteSelfRefs'").Scan(&trg); err != nil {
				t.Fatal(err)
			}
			var cols int
			live.QueryRow("SELECT count(*) FROM pragma_index_info('IndexReferrer')").Scan(&cols)
			if idx != localIndex || cols != 2 {
				t.Errorf("IndexReferrer after install: %q (%d columns), want the builder's %q", idx, cols, localIndex)
			}
			if !sameSQL(trg, localTrigger) || trg == localTrigger {
				t.Errorf("DeleteSelfRefs after install: %q; want the generation's own text (the builder's differs only in spacing, case and quotes)", trg)
			}
			sameAsCentral(t, b, central, f.Root)
		})
	}
}
