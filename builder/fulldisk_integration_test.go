//go:build integration

package builder

import (
	"context"
	"database/sql"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/mountinfo"
)

// The builder node's filesystem (one tmpfs holding the Nix DB, the upper and
// the agent's state dir) with 256 KiB left, too little for the Nix DB rows
// of 3,000 paths, while the running agent (Run, the daemon's loop) imports
// a generation: on first start and in a rotation. Each time the agent
// reports the failure in its status, naming the Nix DB and the full disk;
// the Nix DB passes `PRAGMA integrity_check` and every path valid in it is
// readable under the store dir (the generation mounted before, in the
// rotation, with its files); once the space is freed the agent becomes READY
// (first start) or finishes the rotation on its own, every path of the
// generation is valid, and `nix-store --verify` is clean.
func TestBuilderImportOnFullDisk(t *testing.T) {
	e := newEnv(t)
	e.central.Fill(t)
	first := e.central.AddMany(t, "first", 3000)
	g1 := e.publish(t)
	e.startServer(t)
	e.nix(t, "nix-store", "--verify") // Nix has run on this machine: its DB exists

	free := testenv.Fill(t, e.node, 256<<10)
	a := e.agent(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })

	failed := e.waitFailure(t, a, "first start")
	if a.Ready() {
		t.Fatalf("the agent is ready although its import failed: %s", failed)
	}
	e.dbIntact(t, "first start on a full disk")
	free()
	e.waitState(t, a, g1)
	if !a.Ready() {
		t.Fatal("the agent is idle on its generation but not ready")
	}
	e.allValid(t, g1)
	e.dbIntact(t, "first start after the space was freed")
	e.nixVerify(t)

	// A rotation whose import hits the full disk. The node is full before
	// the generation is published: the agent checks every 200 ms, so a
	// publish first could let it rotate before the disk is full.
	old := filepath.Join(e.local(first[0]))
	oldContent := readFile(t, old)
	e.central.AddMany(t, "second", 3000)
	free = testenv.Fill(t, e.node, 256<<10)
	if st := a.State(); st.Phase != PhaseIdle || st.Generation != g1 || a.Status().LastError != "" {
		t.Fatalf("before the rotation on a full disk: %s, last error %q, want idle(%d) and no error", st, a.Status().LastError, g1)
	}
	g2 := e.publish(t)
	failed = e.waitFailure(t, a, "rotation")
	if st := a.State(); st.Generation == g2 && st.Phase == PhaseIdle {
		t.Fatalf("the agent finished the rotation to %d on a full disk", g2)
	}
	if !strings.Contains(failed, "rotate") {
		t.Errorf("the failure is not the rotation's: %s", failed)
	}
	e.dbIntact(t, "rotation on a full disk")
	if got := readFile(t, old); got != oldContent {
		t.Fatalf("%s of generation %d reads %q during the failed rotation, was %q", old, g1, got, oldContent)
	}
	free()
	e.waitState(t, a, g2)
	e.allValid(t, g2)
	e.dbIntact(t, "rotation after the space was freed")
	e.nixVerify(t)
	if got := a.Status().LastError; got != "" {
		t.Errorf("status still reports an error after the rotation finished: %s", got)
	}
}

// waitFailure waits until the agent's status reports an error that names the
// full disk, and returns it.
func (e *env) waitFailure(t *testing.T, a *Agent, step string) string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		msg := a.Status().LastError
		if strings.Contains(msg, "disk is full") || strings.Contains(msg, "no space left on device") {
			t.Logf("%s on a full disk: status says: %s", step, msg)
			if !strings.Contains(msg, e.cfg.NixStateDir) {
				t.Errorf("%s on a full disk: the error does not name the Nix DB under %s: %s", step, e.cfg.NixStateDir, msg)
			}
			return msg
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s on a full disk: no error reported (state %s, last error %q)", step, a.State(), msg)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitState waits until the agent is idle on generation g.
func (e *env) waitState(t *testing.T, a *Agent, g uint64) {
	t.Helper()
	deadline := time.Now().Add(45 * time.Second)
	for {
		st := a.State()
		if st.Phase == PhaseIdle && st.Generation == g {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent did not get to idle(%d) after the space was freed: %s, last error %q", g, st, a.Status().LastError)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// dbIntact checks the builder's Nix DB with SQLite's own integrity check
// and that every path valid in it is there under the store dir (invariant
// 2). It reads the DB directly: Nix's tools want to write on a full disk.
func (e *env) dbIntact(t *testing.T, step string) {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+filepath.Join(e.cfg.NixStateDir, "db", "db.sqlite")+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var ok string
	if err := db.QueryRow("PRAGMA integrity_check").Scan(&ok); err != nil || ok != "ok" {
		t.Fatalf("%s: integrity_check of the Nix DB: %q %v", step, ok, err)
	}
	rows, err := db.Query("SELECT path FROM ValidPaths")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	n := 0
	for rows.Next() {
		var p string
		if err := rows.Scan(&p); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Lstat(e.local(p)); err != nil {
			t.Fatalf("%s: %s is valid in the Nix DB but not readable: %v", step, p, err)
		}
		n++
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: Nix DB intact, %d valid paths all readable", step, n)
}

// allValid checks that every path of generation g is valid on the builder.
func (e *env) allValid(t *testing.T, g uint64) {
	t.Helper()
	var all []string
	for _, in := range e.registration(t, g) {
		all = append(all, in.Path)
	}
	if v := e.valid(t, all...); len(v) != len(all) {
		t.Fatalf("%d of %d paths of generation %d valid", len(v), len(all), g)
	}
}

// nixVerify runs `nix-store --verify` (AddMany's NAR hashes are not the
// files', so no --check-contents) and fails on anything it reports.
func (e *env) nixVerify(t *testing.T) {
	t.Helper()
	_, stderr := e.nix(t, "nix-store", "--verify")
	for _, bad := range []string{"disappeared", "error", "invalid"} {
		if strings.Contains(stderr, bad) {
			t.Fatalf("nix-store --verify reports problems:\n%s", stderr)
		}
	}
}

// The agent's state dir (with the upper) on a filesystem of its own, as on a
// node with /var/lib/strata on its own partition. Full at first start:
// nothing is mounted, the agent is not ready, its status names the state
// file, and it becomes ready once the space is freed. Then it fills up in
// the middle of a rotation, right after the swap: the new generation's GC root cannot be
// written into the upper, and the state file cannot record the end of the
// import. The Nix DB (on another filesystem) imports the new paths. The
// agent reports the full disk; every valid path stays readable; once the
// space is freed, the agent finishes the rotation on its own: idle on the
// new generation, the old lower released, the generation rooted for
// garbage collection, and no error left in its status.
func TestBuilderStateDirFullMidRotation(t *testing.T) {
	e := newEnv(t)
	if err := os.MkdirAll(e.cfg.StateDir, 0o755); err != nil {
		t.Fatal(err)
	}
	testenv.Run(t, "mount", "-t", "tmpfs", "-o", "size=32m", "strata-builder-state", e.cfg.StateDir)
	paths := e.central.Fill(t)
	g1 := e.publish(t)
	e.startServer(t)

	var g2 atomic.Uint64
	fill, filled := make(chan struct{}), make(chan struct{})
	a := e.agent(t, func(o *Options) {
		o.OnTransition = func(s State) {
			if n := g2.Load(); n != 0 && s.Phase == PhaseImporting && s.Generation == n && g2.CompareAndSwap(n, 0) {
				fill <- struct{}{} // the test fills the state dir now
				<-filled
			}
		}
	})
	// First start with the state dir full: nothing can be recorded, so
	// nothing is mounted; the agent is not ready and says why.
	free := testenv.Fill(t, e.cfg.StateDir, 0)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(a.Status().LastError, "no space left on device") {
		if time.Now().After(deadline) {
			t.Fatalf("first start on a full state dir: no full disk reported: state %s, last error %q", a.State(), a.Status().LastError)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if msg := a.Status().LastError; !strings.Contains(msg, e.cfg.stateFile()) || a.Ready() {
		t.Errorf("first start on a full state dir: ready %v, status %q, want not ready and the state file named", a.Ready(), msg)
	}
	if ms, err := mountinfo.Read(); err != nil || len(mountinfo.At(ms, e.cfg.StoreDir)) != 0 {
		t.Errorf("first start on a full state dir: the store dir has %d mounts (%v), want none", len(mountinfo.At(ms, e.cfg.StoreDir)), err)
	}
	free()
	e.waitState(t, a, g1)

	fresh := e.central.AddText(t, "fresh", "fresh\n")
	n := e.publish(t)
	g2.Store(n)
	select {
	case <-fill:
		free = testenv.Fill(t, e.cfg.StateDir, 0)
		close(filled)
	case <-time.After(30 * time.Second):
		t.Fatalf("the agent never got to importing(%d): %s", n, a.State())
	}
	deadline = time.Now().Add(30 * time.Second)
	for !strings.Contains(a.Status().LastError, "no space left on device") {
		if time.Now().After(deadline) {
			t.Fatalf("no full disk reported: state %s, last error %q", a.State(), a.Status().LastError)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("state dir full mid-rotation: status says: %s", a.Status().LastError)
	e.dbIntact(t, "state dir full mid-rotation")
	if got := readFile(t, filepath.Join(e.local(paths[1]), "data.txt")); got == "" {
		t.Fatalf("a path of generation %d reads empty", g1)
	}
	time.Sleep(time.Second) // a few checks on the full disk
	free()

	e.waitState(t, a, n)
	deadline = time.Now().Add(30 * time.Second)
	for !a.rooted(context.Background()) || a.Status().LastError != "" {
		if time.Now().After(deadline) {
			root, _ := os.Readlink(e.cfg.gcRootLink())
			t.Fatalf("after the space was freed: rooted=%v (root %s), last error %q", a.rooted(context.Background()), root, a.Status().LastError)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if root, _ := os.Readlink(e.cfg.gcRootLink()); !strings.HasSuffix(root, rootName(n)) {
		t.Errorf("GC root names %s, want generation %d's root", root, n)
	}
	if refs, err := NewNixStore(e.cfg, nil).References(context.Background(), mustReadlink(t, e.cfg.gcRootLink())); err != nil || !slices.Contains(refs, fresh) {
		t.Errorf("generation %d's root does not refer to its new path %s: %v %v", n, fresh, refs, err)
	}
	st := a.State()
	e.checkMounts(t, st)
	e.allValid(t, n)
	e.dbIntact(t, "after the space was freed")
	e.verify(t)
	if saved, err := loadState(e.cfg.stateFile()); err != nil || saved.Phase != PhaseIdle || saved.Generation != n {
		t.Errorf("state file after the space was freed: %s %v, want idle(%d)", saved, err, n)
	}

	// The next rotation goes through as usual.
	e.central.AddText(t, "after", "after\n")
	n3 := e.publish(t)
	e.waitState(t, a, n3)
	e.allValid(t, n3)
}

func mustReadlink(t *testing.T, p string) string {
	t.Helper()
	s, err := os.Readlink(p)
	if err != nil {
		t.Fatal(err)
	}
	return s
}
