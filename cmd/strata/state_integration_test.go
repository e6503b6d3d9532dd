//go:build integration

package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/nfsraw"
	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
)

// Issue 13: the server never destroys a published generation by mistake.
// Every test here runs the real `strata server` as a child process on a
// loop-backed btrfs central store filled with nix-bin, and looks at what a
// user would: the CLI's answers, the snapshots on disk, the state dir, and
// file handles of a raw NFS client.

// site is a central store (btrfs subvolume <mnt>/nix) with its snapshot
// dir, and a server config around it.
type site struct {
	mnt, snaps, state string
	store             nixtest.Store
}

func newSite(t *testing.T) *site {
	t.Helper()
	mnt := testenv.LoopBtrfs(t, "1G")
	testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(mnt, "nix"))
	st := nixtest.New(t, mnt)
	st.Fill(t)
	return &site{mnt: mnt, snaps: filepath.Join(mnt, "snaps"), state: filepath.Join(t.TempDir(), "state"), store: st}
}

// config writes a server config and returns its path; over replaces or
// adds keys of the defaults: "store.root", "snapshot_dir", "state_dir",
// "keep" (retention.keep, 10), "api.listen" (none: the unix socket only),
// "api.token_file", "nfs.listen" (127.0.0.1:0) and "nfs.allow" (a YAML list's
// items; default the server's).
func (s *site) config(t *testing.T, over map[string]string) string {
	t.Helper()
	v := map[string]string{"store.root": s.store.NixRoot(), "snapshot_dir": s.snaps, "state_dir": s.state,
		"keep": "10", "api.listen": `""`, "nfs.listen": "127.0.0.1:0"}
	for k, x := range over {
		v[k] = x
	}
	yaml := fmt.Sprintf("store:\n  root: %s\nsnapshot:\n  snapshot_dir: %s\nstate_dir: %s\npublish:\n  interval: 0s\napi:\n  listen: %s\n",
		v["store.root"], v["snapshot_dir"], v["state_dir"], v["api.listen"])
	if v["api.token_file"] != "" {
		yaml += "  token_file: " + v["api.token_file"] + "\n"
	}
	yaml += "nfs:\n  listen: " + v["nfs.listen"] + "\n"
	if v["nfs.allow"] != "" {
		yaml += "  allow: [" + v["nfs.allow"] + "]\n"
	}
	yaml += "retention:\n  keep: " + v["keep"] + "\n"
	f := filepath.Join(t.TempDir(), "server.yaml")
	if err := os.WriteFile(f, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	return f
}

// snapshots lists the snapshot dir.
func (s *site) snapshots(t *testing.T) []string {
	t.Helper()
	names, err := snapshotNames(s.snaps)
	if err != nil {
		t.Fatal(err)
	}
	return names
}

// snapshotNames lists the snapshots in dir: its entries but the label
// changes kept beside a snapshot and the owner record and lock.
func snapshotNames(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	var out []string
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".labels") && !strings.HasPrefix(e.Name(), "strata.owner.") {
			out = append(out, e.Name())
		}
	}
	return out, err
}

// noteFile is the base name of a path every generation of the site has
// (Fill's "note-c").
func (s *site) noteFile(t *testing.T) string {
	t.Helper()
	for _, line := range strings.Split(s.store.DumpDB(t), "\n") {
		if strings.HasSuffix(line, "-note-c") {
			return filepath.Base(line)
		}
	}
	t.Fatal("the central store has no note-c")
	return ""
}

// manifests lists the generation ids stored in state dir dir.
func manifests(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(dir, "generations"))
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

// server is a running `strata server` child.
type daemonProc struct {
	cmd    *exec.Cmd
	logs   *testenv.Buffer
	notify <-chan string
	api    string // unix:<state>/api.sock
	nfs    string // host:port of the export
	done   chan struct{}
}

var nfsAddrRE = regexp.MustCompile(`msg="nfs export listening" addr=(\S+)`)

// start runs `strata server --config cfg args...` with env and waits for
// READY=1.
func start(t *testing.T, cfg, state string, env []string, args ...string) *daemonProc {
	t.Helper()
	sock, ch := testenv.NotifySocket(t)
	cmd := exec.Command(os.Args[0], append([]string{"server", "--config", cfg}, args...)...)
	cmd.Env = append(append(os.Environ(), "STRATA_TEST_RUN_MAIN=1", "NOTIFY_SOCKET="+sock), env...)
	logs := &testenv.Buffer{Tee: os.Stderr}
	cmd.Stderr = logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &daemonProc{cmd: cmd, logs: logs, notify: ch, api: "unix:" + filepath.Join(state, "api.sock"), done: make(chan struct{})}
	go func() { cmd.Wait(); close(s.done) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-s.done })
	deadline := time.After(60 * time.Second)
	for ready := false; !ready; {
		select {
		case m := <-ch:
			ready = strings.Contains(m, "READY=1")
		case <-s.done:
			t.Fatalf("server exited before READY: %v\n%s", cmd.ProcessState, logs)
		case <-deadline:
			t.Fatal("no READY=1 from the server")
		}
	}
	// The line was logged before READY=1, but stderr is a pipe copied into
	// logs by another goroutine: READY=1 on the notify socket can arrive
	// first (TestMissingHandleKeyRefusesStart once dialed "" for it).
	for wait := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if m := nfsAddrRE.FindStringSubmatch(logs.String()); m != nil {
			s.nfs = m[1]
			break
		}
		if time.Now().After(wait) {
			break // a server that logs no export address (none configured)
		}
	}
	return s
}

// stop sends SIGTERM and waits for a clean exit.
func (s *daemonProc) stop(t *testing.T) {
	t.Helper()
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(60 * time.Second):
		t.Fatal("server did not stop after SIGTERM")
	}
	if !s.cmd.ProcessState.Success() {
		t.Fatalf("server exit after SIGTERM: %v", s.cmd.ProcessState)
	}
}

// waitLog waits until the server's stderr contains want.
func (s *daemonProc) waitLog(t *testing.T, want string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(s.logs.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("server never logged %q", want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitLogCount waits until the server's stderr contains want n times.
func (s *daemonProc) waitLogCount(t *testing.T, want string, n int) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for strings.Count(s.logs.String(), want) < n {
		if time.Now().After(deadline) {
			t.Fatalf("server logged %q %d times, want %d\n%s", want, strings.Count(s.logs.String(), want), n, s.logs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// refused runs `strata server` expecting it to exit non-zero by itself
// (within a minute) and returns its output.
func refused(t *testing.T, cfg string, args ...string) string {
	t.Helper()
	out, _ := refusedExit(t, cfg, args...)
	return out
}

// refusedExit is refused with the exit status: 2 for a configuration
// error, which the shipped unit does not restart on (a restart would
// only repeat it).
func refusedExit(t *testing.T, cfg string, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], append([]string{"server", "--config", cfg}, args...)...)
	cmd.Env = append(os.Environ(), "STRATA_TEST_RUN_MAIN=1")
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("server %v did not stop by itself:\n%s", args, out)
	}
	if err == nil {
		t.Fatalf("server %v exited 0, want a refusal:\n%s", args, out)
	}
	return string(out), cmd.ProcessState.ExitCode()
}

func (s *daemonProc) client() *api.Client { return api.NewClient(s.api, "") }

func (s *daemonProc) generations(t *testing.T) api.GenerationList {
	t.Helper()
	l, err := s.client().Generations(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// waitServes waits until the daemon serves exactly the generations want
// (a replica receives them on its own) and returns its list.
func (s *daemonProc) waitServes(t *testing.T, want ...uint64) api.GenerationList {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		l := s.generations(t)
		if slices.Equal(ids(l.Generations), want) {
			return l
		}
		if time.Now().After(deadline) {
			t.Fatalf("serves %v, want %v\n%s", ids(l.Generations), want, s.logs)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func ids(gs []api.Generation) []uint64 {
	var out []uint64
	for _, g := range gs {
		out = append(out, g.ID)
	}
	return out
}

func publishOne(t *testing.T, s *site, srv *daemonProc, name string) uint64 {
	t.Helper()
	s.store.AddText(t, name, name+"\n")
	out, code := runStrata(t, nil, "publish", "--json", "--api", srv.api)
	var res api.PublishResult
	if code != 0 || json.Unmarshal([]byte(out), &res) != nil || !res.Published {
		t.Fatalf("publish: exit %d %s", code, out)
	}
	return res.Generation.ID
}

// handles a raw NFS client holds: for each generation, the root and one
// file, and the file's content.
type held struct {
	root, file []byte
	data       []byte
}

func holdHandles(t *testing.T, addr string, gens []uint64, file string) map[uint64]held {
	t.Helper()
	c, err := nfsraw.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	out := map[uint64]held{}
	for _, id := range gens {
		st, root, err := c.Mount(fmt.Sprintf("/gen/%d", id))
		if err != nil || st != 0 {
			t.Fatalf("MOUNT /gen/%d: status %d, %v", id, st, err)
		}
		st, fh, _, err := c.Lookup(root, file)
		if err != nil || st != nfsraw.NFS3OK {
			t.Fatalf("LOOKUP %s in /gen/%d: status %d, %v", file, id, st, err)
		}
		st, data, err := c.ReadAll(fh)
		if err != nil || st != nfsraw.NFS3OK {
			t.Fatalf("READ %s in /gen/%d: status %d, %v", file, id, st, err)
		}
		out[id] = held{root: root, file: fh, data: data}
	}
	return out
}

// resolve uses held handles on a (restarted) server without MOUNT or
// LOOKUP, as a client with the export mounted does; it returns the NFS
// statuses of GETATTR on the root and READ of the file.
func resolve(t *testing.T, addr string, h held) (uint32, uint32, []byte) {
	t.Helper()
	c, err := nfsraw.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	st1, _, err := c.Getattr(h.root)
	if err != nil {
		t.Fatal(err)
	}
	st2, data, err := c.ReadAll(h.file)
	if err != nil {
		t.Fatal(err)
	}
	return st1, st2, data
}

func regSums(t *testing.T, srv *daemonProc, gens []uint64) map[uint64][32]byte {
	t.Helper()
	out := map[uint64][32]byte{}
	for _, id := range gens {
		b, err := srv.client().Registration(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		out[id] = sha256.Sum256(b)
	}
	return out
}

// threeGenerations publishes generations 1-3 and pins 2 as "golden".
func threeGenerations(t *testing.T, s *site) (*daemonProc, []api.Generation, string) {
	t.Helper()
	srv := start(t, s.config(t, nil), s.state, nil)
	srv.waitLog(t, "published generation")
	publishOne(t, s, srv, "second")
	publishOne(t, s, srv, "third")
	if out, code := runStrata(t, nil, "pin", "2", "--name", "golden", "--api", srv.api); code != 0 {
		t.Fatalf("pin: exit %d %s", code, out)
	}
	l := srv.generations(t)
	if got := ids(l.Generations); !slices.Equal(got, []uint64{1, 2, 3}) {
		t.Fatalf("generations %v, want [1 2 3]", got)
	}
	// A file every generation has: the "note-c" path of Fill.
	var file string
	for _, line := range strings.Split(s.store.DumpDB(t), "\n") {
		if strings.HasSuffix(line, "-note-c") {
			file = filepath.Base(line)
		}
	}
	if file == "" {
		t.Fatal("no note-c path in the store")
	}
	return srv, l.Generations, file
}

// Must show: three generations (one pinned) and a raw NFS client holding
// handles; a start with a fresh empty state_dir (at another path: it claims
// the snapshot dir explicitly) serves all three with the
// same ids, manifests, registrations and pin once the old key is put back,
// the held handles resolve, and no snapshot is destroyed.
func TestFreshStateDirRebuildsFromSnapshots(t *testing.T) {
	s := newSite(t)
	srv, before, file := threeGenerations(t, s)
	sums := regSums(t, srv, []uint64{1, 2, 3})
	hs := holdHandles(t, srv.nfs, []uint64{1, 2, 3}, file)
	srv.stop(t)
	snapsBefore := s.snapshots(t)

	fresh := filepath.Join(t.TempDir(), "fresh-state")
	// retention.keep 1: generations adopted from their snapshots are still
	// not destroyed by this process.
	cfg := s.config(t, map[string]string{"state_dir": fresh, "keep": "1"})

	// The snapshot dir's owner record names the old state_dir: a state_dir
	// at another path takes it over only when told (--claim-snapshot-dir).
	out := refused(t, cfg)
	for _, want := range []string{"is owned by server", "a primary with state_dir " + s.state, "--claim-snapshot-dir"} {
		if !strings.Contains(out, want) {
			t.Errorf("refusal of another state_dir %q lacks %q", out, want)
		}
	}
	// Without the key the start is refused: clients hold handles.
	out = refused(t, cfg, "--claim-snapshot-dir")
	key := filepath.Join(fresh, "nfs-handle.key")
	for _, want := range []string{key, "restore", "--new-handle-key", "ESTALE"} {
		if !strings.Contains(out, want) {
			t.Errorf("refusal without key %q lacks %q", out, want)
		}
	}
	// --check-config tells the same and what it would rebuild, changing nothing.
	out, code := runStrata(t, nil, "server", "--config", cfg, "--check-config", "--claim-snapshot-dir")
	if code != 1 || !strings.Contains(out, "would rebuild manifests and registrations of generations [1 2 3]") || !strings.Contains(out, key) {
		t.Errorf("check-config: exit %d\n%s", code, out)
	}
	if _, err := os.Stat(fresh); !os.IsNotExist(err) {
		t.Errorf("refused starts and check-config made state_dir %s: %v", fresh, err)
	}

	// Put the old key back (as from a backup of state_dir).
	k, err := os.ReadFile(filepath.Join(s.state, "nfs-handle.key"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(fresh, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(key, k, 0o600); err != nil {
		t.Fatal(err)
	}
	srv = start(t, cfg, fresh, nil, "--claim-snapshot-dir")
	after := srv.generations(t).Generations
	if len(after) != len(before) {
		t.Fatalf("after rebuild: generations %v, want %v", ids(after), ids(before))
	}
	for i := range before {
		b, a := before[i], after[i]
		if !a.Created.Equal(b.Created) {
			t.Errorf("generation %d: created %v, want %v", b.ID, a.Created, b.Created)
		}
		a.Created = b.Created
		if a != b {
			t.Errorf("generation %d after rebuild:\n got %+v\nwant %+v", b.ID, a, b)
		}
	}
	if got := regSums(t, srv, []uint64{1, 2, 3}); !equalSums(got, sums) {
		t.Errorf("registrations changed by the rebuild")
	}
	if !after[1].Pinned || after[1].PinName != "golden" || after[0].Pinned || after[2].Pinned {
		t.Errorf("pins after rebuild: %+v", after)
	}
	for id, h := range hs {
		st1, st2, data := resolve(t, srv.nfs, h)
		if st1 != nfsraw.NFS3OK || st2 != nfsraw.NFS3OK || !bytes.Equal(data, h.data) {
			t.Errorf("generation %d: held handles after rebuild: GETATTR %d, READ %d %q; want OK and %q", id, st1, st2, data, h.data)
		}
	}
	if got := s.snapshots(t); !slices.Equal(got, snapsBefore) {
		t.Errorf("snapshots %v after the rebuild, want %v", got, snapsBefore)
	}
	// Ids go on where they were: never reused. Retention (keep 1) leaves
	// the adopted generations alone.
	if id := publishOne(t, s, srv, "fourth"); id != 4 {
		t.Errorf("next generation after rebuild is %d, want 4", id)
	}
	if got, want := s.snapshots(t), append(snapsBefore, "strata-4"); !slices.Equal(got, want) {
		t.Errorf("snapshots after publishing 4 with keep 1: %v, want %v", got, want)
	}
}

func equalSums(a, b map[uint64][32]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// Must show: a missing handle key with generations present refuses the
// start, naming the key file and both ways out; --new-handle-key is the
// explicit one, after which held handles are stale.
func TestMissingHandleKeyRefusesStart(t *testing.T) {
	s := newSite(t)
	srv, _, file := threeGenerations(t, s)
	hs := holdHandles(t, srv.nfs, []uint64{3}, file)
	srv.stop(t)
	key := filepath.Join(s.state, "nfs-handle.key")
	if err := os.Remove(key); err != nil {
		t.Fatal(err)
	}
	cfg := s.config(t, nil)
	out, code := refusedExit(t, cfg)
	if code != 2 {
		t.Errorf("refused start exited %d, want 2 (a configuration error: systemd does not restart into it)", code)
	}
	for _, want := range []string{"NFS handle key " + key + " is missing", "restore the file from a backup of state_dir", "strata server --new-handle-key", "ESTALE"} {
		if !strings.Contains(out, want) {
			t.Errorf("refusal %q lacks %q", out, want)
		}
	}
	if _, err := os.Stat(key); !os.IsNotExist(err) {
		t.Errorf("refused start made a key: %v", err)
	}
	srv = start(t, cfg, s.state, nil, "--new-handle-key")
	if _, err := os.Stat(key); err != nil {
		t.Fatalf("--new-handle-key made no key: %v", err)
	}
	if st1, _, _ := resolve(t, srv.nfs, hs[3]); st1 != nfsraw.NFS3ErrStale {
		t.Errorf("old handle under a new key: GETATTR status %d, want STALE", st1)
	}
	if got := ids(srv.generations(t).Generations); !slices.Equal(got, []uint64{1, 2, 3}) {
		t.Errorf("generations %v, want [1 2 3]", got)
	}
}

// Must show: a mistyped snapshot_dir (missing, then an existing empty
// directory), then the right one: clear errors, nothing destroyed, no
// manifest lost.
func TestMistypedSnapshotDir(t *testing.T) {
	s := newSite(t)
	srv, before, _ := threeGenerations(t, s)
	srv.stop(t)
	snapsBefore := s.snapshots(t)

	typo := filepath.Join(s.mnt, "snapz")
	out := refused(t, s.config(t, map[string]string{"snapshot_dir": typo}))
	if !strings.Contains(out, "snapshot.snapshot_dir "+typo+" does not exist") || !strings.Contains(out, "[1 2 3]") {
		t.Errorf("missing snapshot dir: %q", out)
	}
	if _, err := os.Stat(typo); !os.IsNotExist(err) {
		t.Errorf("the mistyped snapshot dir was created: %v", err)
	}
	empty := filepath.Join(s.mnt, "empty")
	if err := os.Mkdir(empty, 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := s.config(t, map[string]string{"snapshot_dir": empty})
	out = refused(t, cfg)
	if !strings.Contains(out, "none of the 3 generations recorded in state_dir") || !strings.Contains(out, empty) {
		t.Errorf("empty snapshot dir: %q", out)
	}
	// "Nothing was changed": the refused start leaves the mistyped dir as
	// it found it (before, with the strata.owner.lock it had made).
	if des, err := os.ReadDir(empty); err != nil || len(des) != 0 {
		t.Errorf("the mistyped, empty snapshot dir after the refused start: %v %v, want it still empty", des, err)
	}
	if out, code := runStrata(t, nil, "server", "--config", cfg, "--check-config"); code != 1 || !strings.Contains(out, "none of the 3 generations") {
		t.Errorf("check-config with an empty snapshot dir: exit %d\n%s", code, out)
	}
	if got := manifests(t, s.state); !slices.Equal(got, []string{"1", "2", "3"}) {
		t.Errorf("manifests after the mistakes: %v", got)
	}

	srv = start(t, s.config(t, nil), s.state, nil)
	after := srv.generations(t).Generations
	if len(after) != 3 || after[1].PinName != "golden" || after[2].RegistrationSHA256 != before[2].RegistrationSHA256 {
		t.Errorf("after the right config: %+v", after)
	}
	if got := s.snapshots(t); !slices.Equal(got, snapsBefore) {
		t.Errorf("snapshots %v, want %v", got, snapsBefore)
	}
}

// A mistyped store.dir (found by a new user): the start served the
// generations while telling builders and replicas the mistyped store dir
// (so they refused every one) and failed each publish ("registered paths
// outside the store directory"). Must show: the start is refused (exit 2,
// a configuration error) and --check-config says so (exit 1), naming both
// store dirs, with nothing changed; the right store.dir serves as before.
func TestMistypedStoreDir(t *testing.T) {
	s := newSite(t)
	srv, before, _ := threeGenerations(t, s)
	srv.stop(t)
	snapsBefore := s.snapshots(t)
	cfg := s.config(t, nil)
	t.Setenv("STRATA_STORE_DIR", "/gnu/store")
	want := "store.dir is /gnu/store, but the paths of generation 3 (state_dir " + s.state + ") are in /nix/store"
	if out, code := runStrata(t, nil, "server", "--config", cfg, "--check-config"); code != 1 || !strings.Contains(out, "ERROR: "+want) {
		t.Errorf("check-config with a mistyped store.dir: exit %d\n%s", code, out)
	}
	out, code := refusedExit(t, cfg)
	if code != 2 || !strings.Contains(out, want) {
		t.Errorf("start with a mistyped store.dir: exit %d, want 2\n%s", code, out)
	}
	os.Unsetenv("STRATA_STORE_DIR")
	if got := s.snapshots(t); !slices.Equal(got, snapsBefore) {
		t.Errorf("snapshots %v, want %v", got, snapsBefore)
	}
	srv = start(t, cfg, s.state, nil)
	if after := srv.generations(t).Generations; len(after) != 3 || after[2].RegistrationSHA256 != before[2].RegistrationSHA256 {
		t.Errorf("after the right store.dir: %+v", after)
	}
	srv.stop(t)
}

// Must show: store.root pointed at another Nix store: publishing refused,
// naming both identities, in one ERROR line per refused publish; nothing
// published, nothing destroyed. With
// --adopt-store the other store is published from then on.
func TestOtherStoreRefusesPublish(t *testing.T) {
	s := newSite(t)
	srv, _, _ := threeGenerations(t, s)
	srv.stop(t)
	idA, err := os.ReadFile(filepath.Join(s.store.NixRoot(), "var/nix/strata-store-id"))
	if err != nil {
		t.Fatalf("the first publish recorded no store identity: %v", err)
	}
	wantA := strings.TrimSpace(string(idA))
	if got, _ := unix.Getxattr(filepath.Join(s.snaps, "strata-3"), "user.strata.store", make([]byte, 64)); got != len(wantA) {
		t.Errorf("strata-3 carries no store label of length %d", len(wantA))
	}

	otherRoot := filepath.Join(s.mnt, "other")
	if err := os.Mkdir(otherRoot, 0o755); err != nil {
		t.Fatal(err)
	}
	testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(otherRoot, "nix"))
	other := nixtest.New(t, otherRoot)
	other.AddText(t, "unrelated", "another store\n")
	const wantB = "0f1e2d3c-4b5a-4697-8877-665544332211" // as if another strata server gave it one
	if err := os.WriteFile(filepath.Join(other.NixRoot(), "var/nix/strata-store-id"), []byte(wantB+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := s.config(t, map[string]string{"store.root": other.NixRoot()})
	snapsBefore := s.snapshots(t)

	out, code := runStrata(t, nil, "server", "--config", cfg, "--check-config")
	if code != 1 || !strings.Contains(out, wantA) || !strings.Contains(out, wantB) {
		t.Errorf("check-config: exit %d, want 1 naming %s and %s:\n%s", code, wantA, wantB, out)
	}
	srv = start(t, cfg, s.state, nil)
	// The start's own publish is refused too; wait for it (the metric),
	// then the API's publish, which waits for the start's to be logged.
	for deadline := time.Now().Add(30 * time.Second); !strings.Contains(metrics(t, srv), `strata_publish_total{result="error"} 1`); {
		if time.Now().After(deadline) {
			t.Fatal("the start's publish was not counted as refused")
		}
		time.Sleep(20 * time.Millisecond)
	}
	out, code = runStrata(t, nil, "publish", "--api", srv.api)
	if code == 0 || !strings.Contains(out, wantA) || !strings.Contains(out, wantB) || !strings.Contains(out, "--adopt-store") {
		t.Errorf("publish of another store: exit %d %q; want a refusal naming both identities", code, out)
	}
	// One ERROR line per refused publish (the start's, the API's), each
	// naming both identities and --adopt-store; the start logged its
	// refusal twice, once from New and once from the publish.
	var refusals []string
	for _, l := range strings.Split(srv.logs.String(), "\n") {
		if strings.Contains(l, "level=ERROR") && strings.Contains(l, "another Nix store") {
			refusals = append(refusals, l)
		}
	}
	if len(refusals) != 2 {
		t.Errorf("%d ERROR lines about the refusal, want 2 (the start's publish, the API's):\n%s", len(refusals), strings.Join(refusals, "\n"))
	}
	for _, l := range refusals {
		if !strings.Contains(l, wantA) || !strings.Contains(l, wantB) || !strings.Contains(l, "--adopt-store") {
			t.Errorf("refusal line lacks an identity or --adopt-store: %s", l)
		}
	}
	out, _ = runStrata(t, nil, "status", "--api", srv.api)
	if !strings.Contains(out, wantB) {
		t.Errorf("status does not report the refusal: %q", out)
	}
	if got := ids(srv.generations(t).Generations); !slices.Equal(got, []uint64{1, 2, 3}) {
		t.Errorf("generations %v, want [1 2 3] still served", got)
	}
	srv.stop(t)
	if got := s.snapshots(t); !slices.Equal(got, snapsBefore) {
		t.Errorf("snapshots %v, want %v: nothing published or destroyed", got, snapsBefore)
	}

	// The explicit way: --adopt-store.
	srv = start(t, cfg, s.state, nil, "--adopt-store")
	srv.waitLog(t, "published generation")
	l := srv.generations(t)
	if got := ids(l.Generations); !slices.Equal(got, []uint64{1, 2, 3, 4}) {
		t.Fatalf("after --adopt-store: generations %v, want [1 2 3 4]", got)
	}
	buf := make([]byte, 64)
	n, err := unix.Getxattr(filepath.Join(s.snaps, "strata-4"), "user.strata.store", buf)
	if err != nil || string(buf[:n]) != wantB {
		t.Errorf("strata-4 store label %q, %v; want %s", buf[:n], err, wantB)
	}
}

// Must show: kill -9 during a publish, after the id is reserved, after the
// snapshot, after the registration is written: the next start destroys only
// that unfinished snapshot and serves every earlier generation.
func TestKillDuringPublish(t *testing.T) {
	for _, step := range []string{"reserved", "snapshot", "registration"} {
		t.Run(step, func(t *testing.T) {
			s := newSite(t)
			cfg := s.config(t, nil)
			srv := start(t, cfg, s.state, nil)
			srv.waitLog(t, "published generation")
			publishOne(t, s, srv, "second")
			srv.stop(t)

			srv = start(t, cfg, s.state, []string{"STRATA_DEBUG_PUBLISH_PAUSE=" + step})
			third := s.store.AddText(t, "third", "third\n")
			go srv.client().Publish(context.Background()) // blocks until the kill
			srv.waitLog(t, "step="+step)
			srv.cmd.Process.Signal(syscall.SIGKILL)
			<-srv.done

			wantLeft := []string{"strata-1", "strata-2"}
			if step != "reserved" {
				wantLeft = append(wantLeft, "strata-3")
			}
			if got := s.snapshots(t); !slices.Equal(got, wantLeft) {
				t.Fatalf("after kill -9 at %s: snapshots %v, want %v", step, got, wantLeft)
			}
			if step == "registration" && !slices.Contains(manifests(t, s.state), "3") {
				t.Fatalf("after kill -9 at registration: no manifest 3 in the state (the test does not test that step)")
			}

			out, _ := runStrata(t, nil, "server", "--config", cfg, "--check-config")
			if wantDestroy := step != "reserved"; strings.Contains(out, "would destroy snapshot strata-3") != wantDestroy {
				t.Errorf("check-config after kill -9 at %s (would destroy strata-3: %v):\n%s", step, wantDestroy, out)
			}
			if got := s.snapshots(t); !slices.Equal(got, wantLeft) {
				t.Fatalf("check-config changed the snapshots: %v, want %v", got, wantLeft)
			}
			// The store as generation 2 had it: the start's own publish
			// then has nothing to do, so what is served is what survived.
			s.store.Delete(t, third)
			srv = start(t, cfg, s.state, nil, "--log-level", "debug")
			srv.waitLog(t, "nothing to publish")
			if got := s.snapshots(t); !slices.Equal(got, []string{"strata-1", "strata-2"}) {
				t.Errorf("after restart: snapshots %v, want [strata-1 strata-2]", got)
			}
			destroyed := strings.Contains(srv.logs.String(), "destroying the snapshot of an unfinished publish")
			if destroyed != (step != "reserved") {
				t.Errorf("restart logged a destroy: %v, want %v", destroyed, step != "reserved")
			}
			if got := manifests(t, s.state); !slices.Equal(got, []string{"1", "2"}) {
				t.Errorf("after restart: manifests %v, want [1 2]", got)
			}
			if got := ids(srv.generations(t).Generations); !slices.Equal(got, []uint64{1, 2}) {
				t.Errorf("after restart: generations %v, want [1 2]", got)
			}
			c, err := nfsraw.Dial(srv.nfs)
			if err != nil {
				t.Fatal(err)
			}
			for _, id := range []uint64{1, 2} {
				if st, _, err := c.Mount(fmt.Sprintf("/gen/%d", id)); err != nil || st != 0 {
					t.Errorf("MOUNT /gen/%d after restart: status %d, %v", id, st, err)
				}
			}
			c.Close()
			// The interrupted publish's id is never reused.
			publishOne(t, s, srv, "fourth")
			if got := ids(srv.generations(t).Generations); !slices.Equal(got, []uint64{1, 2, 4}) {
				t.Errorf("the publish after restart: generations %v, want [1 2 4]", got)
			}
		})
	}
}

// A generation whose snapshot is gone is reported (status, generations,
// metric), never dropped, until `strata generations forget N --yes-forget N`.
func TestMissingSnapshotReportedUntilForgotten(t *testing.T) {
	s := newSite(t)
	srv, _, _ := threeGenerations(t, s)
	srv.stop(t)
	testenv.Run(t, "btrfs", "subvolume", "delete", filepath.Join(s.snaps, "strata-2"))

	// --check-config agrees with the start, which serves the rest: a
	// warning that names forget, not a refusal (review 18 #5).
	out, code := runStrata(t, nil, "server", "--config", s.config(t, nil), "--check-config")
	if code != 0 || !strings.Contains(out, "WARNING: generations [2] have a manifest but no snapshot") ||
		!strings.Contains(out, "strata generations forget N --yes-forget N") || !strings.Contains(out, "\nconfiguration: ok\n") {
		t.Errorf("--check-config with strata-2 missing: exit %d, want 0 with a warning naming forget\n%s", code, out)
	}
	srv = start(t, s.config(t, nil), s.state, nil)
	if !strings.Contains(srv.logs.String(), "level=ERROR msg=\"generation has no snapshot") {
		t.Errorf("no error logged for the missing snapshot")
	}
	l := srv.generations(t)
	if got := ids(l.Generations); !slices.Equal(got, []uint64{1, 3}) || !slices.Equal(ids(l.Missing), []uint64{2}) {
		t.Errorf("generations %v missing %v, want [1 3] and [2]", got, ids(l.Missing))
	}
	if out, code := runStrata(t, nil, "generations", "--api", srv.api); code != 0 || !regexp.MustCompile(`(?m)^2 .*pinned:golden\s+MISSING SNAPSHOT\b`).MatchString(out) {
		t.Errorf("strata generations: exit %d\n%s", code, out)
	}
	if out, code := runStrata(t, nil, "status", "--api", srv.api); code != 0 || !strings.Contains(out, "missing:") || !strings.Contains(out, "[2]") {
		t.Errorf("strata status: exit %d\n%s", code, out)
	}
	if m := metrics(t, srv); !strings.Contains(m, "strata_generations_missing 1\n") {
		t.Errorf("metrics lack strata_generations_missing 1")
	}
	if out, code := runStrata(t, nil, "generations", "forget", "2", "--api", srv.api); code != 2 || !strings.Contains(out, "--yes-forget 2") {
		t.Errorf("forget without confirmation: exit %d %q", code, out)
	}
	if out, code := runStrata(t, nil, "generations", "forget", "1", "--yes-forget", "1", "--api", srv.api); code == 0 || !strings.Contains(out, "has its snapshot") {
		t.Errorf("forget of a served generation: exit %d %q", code, out)
	}
	if got := manifests(t, s.state); !slices.Equal(got, []string{"1", "2", "3"}) {
		t.Fatalf("manifests before forget: %v", got)
	}
	// The label files beside the snapshots (pin, live state): strata-2's
	// outlived its snapshot.
	labelFiles := func() map[string]string {
		out := map[string]string{}
		names, err := filepath.Glob(filepath.Join(s.snaps, "strata-*.labels"))
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range names {
			b, err := os.ReadFile(n)
			if err != nil {
				t.Fatal(err)
			}
			out[filepath.Base(n)] = string(b)
		}
		return out
	}
	before := labelFiles()
	if _, ok := before["strata-2.labels"]; !ok {
		t.Fatalf("label files before forget: %v, want strata-2.labels among them", slices.Sorted(maps.Keys(before)))
	}
	if out, code := runStrata(t, nil, "generations", "forget", "2", "--yes-forget", "2", "--api", srv.api); code != 0 || !strings.Contains(out, "forgot generation 2") {
		t.Errorf("forget 2: exit %d %q", code, out)
	}
	if got := manifests(t, s.state); !slices.Equal(got, []string{"1", "3"}) {
		t.Errorf("manifests after forget: %v", got)
	}
	// A new-user test found strata-2.labels left behind: the forget
	// removes it, and only it.
	delete(before, "strata-2.labels")
	if after := labelFiles(); !maps.Equal(after, before) {
		t.Errorf("label files after forget: %v, want %v unchanged", slices.Sorted(maps.Keys(after)), slices.Sorted(maps.Keys(before)))
	}
	if m := metrics(t, srv); !strings.Contains(m, "strata_generations_missing 0\n") {
		t.Errorf("metrics lack strata_generations_missing 0 after forget")
	}
}

func metrics(t *testing.T, srv *daemonProc) string {
	t.Helper()
	sock := strings.TrimPrefix(srv.api, "unix:")
	hc := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	resp, err := hc.Get("http://strata/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// A new-user test: a failing publish showed only in the log and in
// strata_publish_total{result="error"}. strata status shows the last
// publish error and when it happened (text and --json) until a publish
// succeeds.
func TestStatusShowsLastPublishError(t *testing.T) {
	s := newSite(t)
	srv := start(t, s.config(t, nil), s.state, nil)
	srv.waitLog(t, "published generation")
	status := func() (string, map[string]any) {
		t.Helper()
		out, code := runStrata(t, nil, "status", "--api", srv.api)
		if code != 0 {
			t.Fatalf("strata status: exit %d\n%s", code, out)
		}
		js, code := runStrata(t, nil, "status", "--json", "--api", srv.api)
		var m map[string]any
		if code != 0 || json.Unmarshal([]byte(js), &m) != nil {
			t.Fatalf("strata status --json: exit %d\n%s", code, js)
		}
		return out, m
	}
	if out, m := status(); strings.Contains(out, "last_error") || m["last_error"] != nil || m["last_error_at"] != nil {
		t.Errorf("status before any failure shows an error:\n%s\n%v", out, m)
	}

	// A registered path gone from the store: the publish's verification
	// refuses the snapshot.
	p := s.store.AddText(t, "broken", "soon gone\n")
	phys := filepath.Join(s.store.NixRoot(), "store", filepath.Base(p))
	aside := filepath.Join(s.store.NixRoot(), "aside") // same subvolume: a rename
	if err := os.Rename(phys, aside); err != nil {
		t.Fatal(err)
	}
	before := time.Now().UTC().Truncate(time.Second)
	if out, code := runStrata(t, nil, "publish", "--api", srv.api); code == 0 || !strings.Contains(out, "1 registered path missing") {
		t.Fatalf("publish with a registered path gone: exit %d %q, want a verification failure", code, out)
	}
	out, m := status()
	want := "publish generation 2: verify registration: 1 registered path missing from snapshot: " + p
	if !regexp.MustCompile(`(?m)^last_error:\s+`+regexp.QuoteMeta(want)+`$`).MatchString(out) ||
		!regexp.MustCompile(`(?m)^last_error_at:\s+\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$`).MatchString(out) {
		t.Errorf("strata status after a failed publish lacks last_error %q and its time:\n%s", want, out)
	}
	at, _ := m["last_error_at"].(string)
	when, err := time.Parse(time.RFC3339, at)
	if m["last_error"] != want || err != nil || when.Before(before) || when.After(time.Now().Add(time.Second)) {
		t.Errorf("strata status --json: last_error %q at %q, want %q at the publish's time", m["last_error"], at, want)
	}

	// Put back: the next publish succeeds and clears it.
	if err := os.Rename(aside, phys); err != nil {
		t.Fatal(err)
	}
	if out, code := runStrata(t, nil, "publish", "--api", srv.api); code != 0 {
		t.Fatalf("publish after the path is back: exit %d %q", code, out)
	}
	if out, m := status(); strings.Contains(out, "last_error") || m["last_error"] != nil || m["last_error_at"] != nil {
		t.Errorf("status after a successful publish still shows the error:\n%s\n%v", out, m)
	}
	srv.stop(t)
}
