package builder

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/strata-nix/strata/mountinfo"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/nixstore"
	"github.com/strata-nix/strata/overlay"
)

// overlayLowers returns the generations of the visible overlay at the
// store dir in the fake mount table, and how many overlays are there.
func (u *unitEnv) overlayLowers(t *testing.T, a *Agent) ([]uint64, int) {
	t.Helper()
	ms, _ := u.m.Mounts()
	all, top, ok := a.ourOverlays(ms)
	if !ok {
		return nil, len(all)
	}
	g, _, err := a.lowersOf(top)
	if err != nil {
		t.Fatal(err)
	}
	return gens(g), len(all)
}

func (u *unitEnv) lowerMounts(a *Agent) map[string]int {
	ms, _ := u.m.Mounts()
	out := map[string]int{}
	for _, m := range mountinfo.Under(ms, a.cfg.lowerRoot()) {
		out[filepath.Base(m.Mountpoint)]++
	}
	return out
}

func TestStartImportsAndPersists(t *testing.T) {
	u := newUnitEnv(t)
	a1, b1 := info("a"), info("bb")
	u.srv.publish(a1, b1)
	a := u.agent(t)
	var seen []string
	a.onTransition = func(s State) { seen = append(seen, s.String()) }
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if want := []string{"mounting(1)", "importing(1)", "releasing(1)", "releasing(1)", "idle(1)"}; !slices.Equal(seen, want) {
		t.Fatalf("transitions %v, want %v", seen, want)
	}
	if !u.nix.isValid(a1.Path) || !u.nix.isValid(b1.Path) {
		t.Fatal("registration not imported")
	}
	if g, n := u.overlayLowers(t, a); !slices.Equal(g, []uint64{1}) || n != 1 {
		t.Fatalf("overlay lowers %v (%d overlays), want [1] once", g, n)
	}
	st, err := loadState(u.cfg.stateFile())
	if err != nil {
		t.Fatal(err)
	}
	if st.String() != "idle(1)" || st.PathsImported != 2 || st.Work == "" {
		t.Fatalf("persisted state %+v", st)
	}
	if !a.Ready() {
		t.Fatal("not ready after start")
	}
}

func TestServerDownLeavesStoreDirAlone(t *testing.T) {
	u := newUnitEnv(t)
	u.srv.publish(info("a"))
	u.srv.down = true
	a := u.agent(t)
	err := a.Start(context.Background())
	if err == nil || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("start with the server down: %v, want the connection error", err)
	}
	if len(u.m.calls) != 0 || a.Ready() {
		t.Fatalf("mount calls %v, ready %v: want nothing before the server answers", u.m.calls, a.Ready())
	}
	u.srv.down = false
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestRotateRemovesAndKeeps(t *testing.T) {
	u := newUnitEnv(t)
	lib, gone, same := info("lib"), info("gone"), info("same")
	u.srv.publish(lib, gone, same)
	a := u.agent(t)
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	// A local build refers to lib.
	local := info("local-out", lib.Path)
	u.nix.Load(context.Background(), nixstore.RowsFromInfos([]nixstore.PathInfo{local}), nil)
	fresh := info("fresh")
	u.srv.publish(same, fresh)
	if err := a.Check(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	st := a.State()
	if st.String() != "idle(2)" {
		t.Fatalf("state %s, want idle(2)", st)
	}
	if !u.nix.isValid(lib.Path) || u.nix.isValid(gone.Path) || !u.nix.isValid(fresh.Path) || !u.nix.isValid(local.Path) {
		t.Fatalf("validity lib=%v gone=%v fresh=%v local=%v, want true false true true",
			u.nix.isValid(lib.Path), u.nix.isValid(gone.Path), u.nix.isValid(fresh.Path), u.nix.isValid(local.Path))
	}
	if g, _ := u.overlayLowers(t, a); !slices.Equal(g, []uint64{2, 1}) {
		t.Fatalf("overlay lowers %v, want [2 1]", g)
	}
	if m := u.lowerMounts(a); m["1"] != 1 || m["2"] != 1 || len(m) != 2 {
		t.Fatalf("lower mounts %v", m)
	}
	s := a.Status()
	if len(s.Mounts) != 2 || s.Mounts[1].Generation != 1 || s.Mounts[1].Kept != 1 || s.PathsInvalidated != 1 {
		t.Fatalf("status %+v", s)
	}
	// The local referrer goes; the next rotation releases generation 1.
	u.nix.Invalidate(context.Background(), []string{local.Path})
	u.srv.publish(same, fresh, info("third"))
	if err := a.Check(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if g, _ := u.overlayLowers(t, a); !slices.Equal(g, []uint64{3}) {
		t.Fatalf("overlay lowers %v, want [3]", g)
	}
	if m := u.lowerMounts(a); m["3"] != 1 || len(m) != 1 {
		t.Fatalf("lower mounts %v, want only 3", m)
	}
	if u.nix.isValid(lib.Path) {
		t.Fatal("lib still valid after its referrer went")
	}
}

func TestRotateFailureKeepsOldGeneration(t *testing.T) {
	for _, tc := range []struct {
		name   string
		inject func(u *unitEnv)
		want   string
	}{
		{"server gone", func(u *unitEnv) { u.srv.failDelta = errDown }, "connection refused"},
		{"mount fails", func(u *unitEnv) { u.m.failGen = errors.New("mount: no route to host") }, "no route to host"},
		{"swap fails", func(u *unitEnv) { u.m.failSwap = errors.New("move_mount: no space left on device") }, "no space left"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u := newUnitEnv(t)
			a1 := info("a")
			u.srv.publish(a1)
			a := u.agent(t)
			if err := a.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			u.srv.publish(a1, info("b"))
			tc.inject(u)
			err := a.Check(context.Background(), false)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("check: %v, want an error with %q", err, tc.want)
			}
			st := a.State()
			if st.String() != "idle(1)" || !strings.Contains(st.LastError, tc.want) {
				t.Fatalf("state %s, last error %q: want idle(1) and the error", st, st.LastError)
			}
			if g, n := u.overlayLowers(t, a); !slices.Equal(g, []uint64{1}) || n != 1 {
				t.Fatalf("overlay lowers %v (%d), want [1]", g, n)
			}
			if m := u.lowerMounts(a); m["1"] != 1 || len(m) != 1 {
				t.Fatalf("lower mounts %v, want only 1", m)
			}
			if s := a.Status(); !strings.Contains(s.LastError, tc.want) {
				t.Fatalf("status last_error %q", s.LastError)
			}
		})
	}
}

// Restart: a healthy overlay is re-adopted without any mount call; after a
// "reboot" (empty mount table) it is rebuilt with the same upper.
func TestRestartAdoptsAndReboots(t *testing.T) {
	u := newUnitEnv(t)
	u.srv.publish(info("a"))
	a := u.agent(t)
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	u.m.calls = nil
	u.srv.down = true // adoption needs no server
	b := u.agent(t)
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if len(u.m.calls) != 0 || b.State().String() != "idle(1)" || !b.Ready() {
		t.Fatalf("restart made calls %v, state %s", u.m.calls, b.State())
	}
	// Reboot.
	u.m = newFakeMounter()
	u.srv.down = false
	c := u.agent(t)
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if g, n := u.overlayLowers(t, c); !slices.Equal(g, []uint64{1}) || n != 1 {
		t.Fatalf("after reboot: overlay lowers %v (%d)", g, n)
	}
	ms, _ := u.m.Mounts()
	top, _ := mountinfo.Top(ms, u.cfg.StoreDir)
	if up, _ := top.Option("upperdir"); up != u.cfg.upperDir() {
		t.Fatalf("after reboot the upper is %s, want %s", up, u.cfg.upperDir())
	}
}

// A kill between move_mount beneath and the detach leaves the new overlay
// beneath the old one: the next start completes the swap and the import.
func TestRestartCompletesInterruptedSwap(t *testing.T) {
	u := newUnitEnv(t)
	a1, b1 := info("a"), info("bb")
	u.srv.publish(a1)
	a := u.agent(t)
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	u.srv.publish(a1, b1)
	// Stop the agent right after the swap's move_mount: state Swapping(2),
	// gen 2's overlay beneath gen 1's.
	stop := errors.New("killed")
	a.m = &killMounter{fakeMounter: u.m, kill: stop}
	if err := a.Check(context.Background(), true); !errors.Is(err, stop) {
		t.Fatalf("check: %v", err)
	}
	// The deferred failure handling of a dead process never ran: restore
	// the state as the killed process left it.
	st := a.State()
	st.Phase, st.Target, st.LastError = PhaseSwapping, 2, ""
	st.Next = []Lower{{Gen: 2}}
	if err := saveState(u.cfg.stateFile(), st); err != nil {
		t.Fatal(err)
	}
	ms, _ := u.m.Mounts()
	if all, _, _ := a.ourOverlays(ms); len(all) != 2 {
		t.Fatalf("%d overlays before restart, want old and new", len(all))
	}
	b := u.agent(t)
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if b.State().String() != "idle(2)" || !u.nix.isValid(b1.Path) {
		t.Fatalf("after restart %s, new path valid %v", b.State(), u.nix.isValid(b1.Path))
	}
	if g, n := u.overlayLowers(t, b); !slices.Equal(g, []uint64{2}) || n != 1 {
		t.Fatalf("overlay lowers %v (%d overlays), want [2] once", g, n)
	}
	if m := u.lowerMounts(b); m["2"] != 1 || len(m) != 1 {
		t.Fatalf("lower mounts %v, want only 2", m)
	}
}

// killMounter mounts the new overlay beneath and then "dies" before the
// detach: later calls of the dead process change nothing.
type killMounter struct {
	*fakeMounter
	kill error
}

func (k *killMounter) Detach(context.Context, string) error { return k.kill }

func (k *killMounter) Swap(_ context.Context, target string, l overlay.Layers) (overlay.SwapResult, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.beneath(target, l); err != nil {
		return overlay.SwapResult{}, err
	}
	return overlay.SwapResult{}, k.kill
}

func TestIdlePolicyWaitsForBuilds(t *testing.T) {
	u := newUnitEnv(t)
	u.cfg.Policy = PolicyIdle
	u.srv.publish(info("a"))
	busy := true
	a := u.agent(t, func(o *Options) { o.Busy = func() (bool, string, error) { return busy, "/nix/store/x.lock", nil } })
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	u.srv.publish(info("a"), info("b"))
	if err := a.Check(context.Background(), false); !errors.Is(err, ErrBusy) {
		t.Fatalf("check while busy: %v, want ErrBusy", err)
	}
	if a.State().Generation != 1 {
		t.Fatal("rotated while a build ran")
	}
	if err := a.Check(context.Background(), true); err != nil {
		t.Fatalf("forced check: %v", err)
	}
	if a.State().Generation != 2 {
		t.Fatal("forced rotation did not happen")
	}
	u.srv.publish(info("a"), info("b"), info("ccc"))
	a.cfg.MaxWait = 0
	if err := a.Check(context.Background(), false); err != nil || a.State().Generation != 3 {
		t.Fatalf("max_wait 0: %v, generation %d, want a rotation to 3", err, a.State().Generation)
	}
	busy = false
	a.cfg.MaxWait = 1 << 60
	u.srv.publish(info("a"), info("dddd"))
	if err := a.Check(context.Background(), false); err != nil || a.State().Generation != 4 {
		t.Fatalf("idle: %v, generation %d, want a rotation to 4", err, a.State().Generation)
	}
}

func TestPlanRemoval(t *testing.T) {
	cands := map[string]uint64{"x": 1, "y": 1, "z": 1, "u": 1, "w": 2, "inv": 1}
	valid := map[string]bool{"x": true, "y": true, "z": true, "u": true, "w": true}
	refs := map[string][]string{
		"x": {"local"}, // a local path refers to x
		"y": {"x"},     // y is kept through x
		"z": {"zz"},    // zz is leaving too and not valid... but not a candidate: stays
		"w": {"y"},
	}
	r := planRemoval(cands, valid, refs, func(p string) bool { return p == "u" })
	if !slices.Equal(r.Keep[1], []string{"x", "y", "z"}) || !slices.Equal(r.Keep[2], []string{"w"}) {
		t.Fatalf("keep %v", r.Keep)
	}
	if len(r.Invalidate) != 0 || !slices.Equal(r.InUpper, []string{"u"}) {
		t.Fatalf("invalidate %v in upper %v", r.Invalidate, r.InUpper)
	}
	r = planRemoval(map[string]uint64{"a": 1, "b": 1}, map[string]bool{"a": true, "b": true},
		map[string][]string{"a": {"b"}}, func(string) bool { return false })
	if !slices.Equal(r.Invalidate, []string{"a", "b"}) || len(r.Keep) != 0 {
		t.Fatalf("chain of leaving paths: invalidate %v keep %v", r.Invalidate, r.Keep)
	}
}

func TestReferrersFirst(t *testing.T) {
	order, err := referrersFirst([]string{"lib", "app", "tool"}, map[string][]string{"lib": {"app", "tool"}, "tool": {"app"}})
	if err != nil {
		t.Fatal(err)
	}
	idx := func(p string) int { return slices.Index(order, p) }
	if idx("app") > idx("tool") || idx("tool") > idx("lib") {
		t.Fatalf("order %v: referrers must come first", order)
	}
	if _, err := referrersFirst([]string{"lib"}, map[string][]string{"lib": {"outside"}}); err == nil || !strings.Contains(err.Error(), "outside") {
		t.Fatalf("referrer outside the set: %v", err)
	}
}

func TestStateJSON(t *testing.T) {
	s := State{Version: stateVersion, Phase: PhaseSwapping, Generation: 3, Target: 4, Lowers: []Lower{{Gen: 3}}}
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"phase":"swapping"`) {
		t.Fatalf("phase not written by name: %s", b)
	}
	var back State
	if err := json.Unmarshal(b, &back); err != nil || back.String() != "swapping(4)" {
		t.Fatalf("round trip: %v %s", err, back)
	}
	if err := json.Unmarshal([]byte(`{"phase":"dancing"}`), &back); err == nil {
		t.Fatal("unknown phase accepted")
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "state.json"), []byte(`{"version":1,`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := loadState(filepath.Join(dir, "state.json")); err == nil {
		t.Fatal("truncated state file accepted")
	}
}

func TestConfigErrorsNameKeys(t *testing.T) {
	for _, tc := range []struct{ env, val, key string }{
		{"STRATA_ROTATE_POLICY", "sometimes", "rotate.policy"},
		{"STRATA_SERVER_API", "central:7480", "server.api"},
		{"STRATA_SERVER_NFS", "central", "server.nfs"},
		// Review 19 #2, #3: a port that is not a number, and the API's own
		// /v1 in an API URL (every call went to /v1/v1/...).
		{"STRATA_SERVER_NFS", "central:2049x", "server.nfs"},
		{"STRATA_API_LISTEN", ":7481x", "api.listen"},
		{"STRATA_SERVER_API", "http://srv:7070/v1", "server.api"},
		{"STRATA_SERVER_API", "http://srv:7070/v1/", "server.api"},
		{"STRATA_SERVER_PREFER", "http://srv:7070/v1", "server.prefer"},
		{"STRATA_STORE_DIR", "nix/store", "store.dir"},
		{"STRATA_MOUNT_NCONNECT", "32", "mount.nconnect"},
		{"STRATA_MOUNT_OPTIONS", "timeo=600 retrans=2", "mount.options"},
		{"STRATA_SWAP_METHOD", "sideways", "swap.method"},
		{"STRATA_ROTATE_CHECK_INTERVAL", "1ms", "rotate.check_interval"},
		{"STRATA_STATE_DIR", "/nix/store/strata", "state_dir"},
		{"STRATA_SERVER_API", "", "server.api"},
		{"STRATA_SERVER_PREFER", "a b", "server.prefer"},
		{"STRATA_FAILOVER_AFTER", "1ms", "failover.after"},
		{"STRATA_NIX_STATE_DIR", "var/nix", "nix.state_dir"},
		{"STRATA_SWAP_STAGING_DIR", "staging", "swap.staging_dir"},
		{"STRATA_NIX_BIN", "", "nix.bin"},
		{"STRATA_MOUNT_OPTIONS", "vers=3", "mount.options"},
		{"STRATA_ROTATE_MAX_WAIT", "-1s", "rotate.max_wait"},
		{"STRATA_LOG_LEVEL", "loud", "log.level"},
		{"STRATA_WATCHDOG_STALL_AFTER", "1s", "watchdog.stall_after"},
		{"STRATA_NIX_STORE", "nix2", "nix.store"},
		{"STRATA_NIX_STORE", "./nix2", "nix.store"},
	} {
		t.Run(tc.key, func(t *testing.T) {
			_, err := loadConfig(t, "", map[string]string{tc.env: tc.val})
			if err == nil || !strings.Contains(err.Error(), `"`+tc.key+`"`) {
				t.Fatalf("%s=%s: error %v, want one naming %q", tc.env, tc.val, err, tc.key)
			}
			// Where the value came from: the file may look right.
			if want := "(from env " + tc.env + ")"; !strings.Contains(err.Error(), want) {
				t.Errorf("%s=%s: error %v, want it to name its source %s", tc.env, tc.val, err, want)
			}
			if strings.Contains(tc.val, "/v1") && !strings.Contains(err.Error(), "drop the /v1") {
				t.Errorf("%s=%s: error %v, want it to say to drop the /v1", tc.env, tc.val, err)
			}
		})
	}
	if _, err := loadConfig(t, "rotate:\n  polcy: idle\n", nil); err == nil || !strings.Contains(err.Error(), "rotate.polcy") {
		t.Fatalf("unknown key: %v", err)
	}
	for _, store := range []string{"/nix2", "daemon", "local?root=/nix2", "ssh-ng://builder"} {
		if _, err := loadConfig(t, "", map[string]string{"STRATA_NIX_STORE": store}); err != nil {
			t.Errorf("nix.store %q refused: %v", store, err)
		}
	}
	c, err := loadConfig(t, "", nil)
	if err != nil {
		t.Fatalf("defaults: %v", err)
	}
	if c.Socket != "/var/lib/strata/builder/api.sock" || c.Policy != PolicyImmediate || c.NConnect != 4 {
		t.Fatalf("defaults %+v", c)
	}
}

func TestNFSAddress(t *testing.T) {
	c := Config{ServerAPI: "http://central.example:7480"}
	for _, tc := range []struct {
		set, adv, host string
		port           int
	}{
		{"", "0.0.0.0:2049", "central.example", 2049},
		{"", ":2050", "central.example", 2050},
		{"", "10.1.2.3:2049", "10.1.2.3", 2049},
		{"nfs.example:3049", "0.0.0.0:2049", "nfs.example", 3049},
	} {
		c.ServerNFS = tc.set
		h, p, err := c.NFSAddress(tc.adv)
		if err != nil || h != tc.host || p != tc.port {
			t.Errorf("NFSAddress(set %q, advertised %q) = %s %d %v, want %s %d", tc.set, tc.adv, h, p, err, tc.host, tc.port)
		}
	}
	c.ServerNFS = ""
	if _, _, err := c.NFSAddress(""); err == nil {
		t.Error("no address accepted")
	}
}

// A swap that switched and then failed (read-back, staging cleanup) is a
// done swap: the rotation goes on to import the new paths and ends idle on
// the new generation, with the old lower released.
func TestSwapErrorAfterSwitchContinuesRotation(t *testing.T) {
	u := newUnitEnv(t)
	a1, b1 := info("a"), info("bb")
	u.srv.publish(a1)
	a := u.agent(t)
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	u.srv.publish(a1, b1)
	u.m.failAfterSwitch = errors.New("read mountinfo: too many open files")
	if err := a.Check(context.Background(), true); err != nil {
		t.Fatalf("check: %v, want the rotation to carry on after the switch", err)
	}
	if st := a.State(); st.String() != "idle(2)" || st.PathsImported != 1 {
		t.Fatalf("state %s, imported %d: want idle(2) with 1 path imported", st, st.PathsImported)
	}
	if !u.nix.isValid(b1.Path) {
		t.Fatal("new path not imported after a swap that switched")
	}
	if g, n := u.overlayLowers(t, a); !slices.Equal(g, []uint64{2}) || n != 1 {
		t.Fatalf("overlay lowers %v (%d overlays), want [2] once", g, n)
	}
	if m := u.lowerMounts(a); m["2"] != 1 || len(m) != 1 {
		t.Fatalf("lower mounts %v, want only 2", m)
	}
}

// The local store is bound before the first overlay covers the store dir
// and is every overlay's bottom lower; a path it holds stays valid when it
// leaves the central store.
func TestLocalStoreIsBottomLayer(t *testing.T) {
	u := newUnitEnv(t)
	a1, shared := info("a"), info("shared-with-local")
	u.srv.publish(a1, shared)
	a := u.agent(t)
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	local := u.cfg.localDir()
	if len(u.m.calls) < 3 || u.m.calls[1] != "bindlocal "+local || !strings.HasPrefix(u.m.calls[2], "overlay ") {
		t.Fatalf("calls %q: want the local bind right before the overlay", u.m.calls)
	}
	ms, _ := u.m.Mounts()
	_, top, _ := a.ourOverlays(ms)
	l, err := overlay.LayersOf(top)
	if err != nil {
		t.Fatal(err)
	}
	if l.Lower[len(l.Lower)-1] != local || !strings.Contains(top.SuperOptions, "metacopy=on") {
		t.Fatalf("overlay %q: want %s as bottom lower and metacopy=on", top.SuperOptions, local)
	}
	// The local store holds "shared" too (same store path built locally).
	if err := os.WriteFile(filepath.Join(local, filepath.Base(shared.Path)), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	u.srv.publish(a1)
	if err := a.Check(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	if !u.nix.isValid(shared.Path) {
		t.Fatal("a path the local store holds was invalidated when it left the central store")
	}
	if g, _ := u.overlayLowers(t, a); !slices.Equal(g, []uint64{2}) {
		t.Fatalf("overlay lowers %v, want [2] (no old generation kept for a local path)", g)
	}
	if n := strings.Count(strings.Join(u.m.calls, "\n"), "bindlocal"); n != 1 {
		t.Fatalf("%d local binds, want 1", n)
	}
}

// accessServer is a fakeServer whose NFS export refuses this builder.
type accessServer struct {
	*fakeServer
	acc api.NFSAccess
}

func (s accessServer) NFSAccess(context.Context) (api.NFSAccess, error) { return s.acc, nil }

// A server whose nfs.allow leaves this builder out: no mount is tried,
// the store dir is untouched, and status says why in the server's words.
func TestNFSRefusalIsNamed(t *testing.T) {
	u := newUnitEnv(t)
	u.srv.publish(info("a"))
	srv := accessServer{fakeServer: u.srv, acc: api.NFSAccess{Address: "10.0.2.15", Allow: []string{"127.0.0.0/8"}, NFS: "0.0.0.0:2049"}}
	a := u.agent(t, func(o *Options) { o.Server = srv })
	err := a.Start(context.Background())
	if err == nil || !strings.Contains(err.Error(), "refuses NFS connections from this builder") ||
		!strings.Contains(err.Error(), "10.0.2.15") || !strings.Contains(err.Error(), "127.0.0.0/8") {
		t.Fatalf("start: %v, want the refusal with address and allowlist", err)
	}
	for _, c := range u.m.calls {
		if strings.HasPrefix(c, "mountgen") || strings.HasPrefix(c, "overlay") {
			t.Fatalf("mount calls %v after a refusal", u.m.calls)
		}
	}
	srv.acc.Allowed = true
	a = u.agent(t, func(o *Options) { o.Server = srv })
	if err := a.Start(context.Background()); err != nil {
		t.Fatalf("start once allowed: %v", err)
	}
}

// readingNix refuses a load, as nix-store --load-db does when it cannot
// open a .drv, while any path of it is missing under the store dir.
type readingNix struct {
	*fakeNix
	storeDir string
}

func (n readingNix) Load(ctx context.Context, rows *nixstore.Rows, root *nixstore.RootUpdate) (int, error) {
	for _, r := range rows.Paths {
		if strings.Contains(r.Path, "strata-generation-") {
			continue
		}
		if _, err := os.Lstat(filepath.Join(n.storeDir, filepath.Base(r.Path))); err != nil {
			return 0, fmt.Errorf("opening file '%s': No such file or directory", r.Path)
		}
	}
	return n.fakeNix.Load(ctx, rows, root)
}

// An import never wedges on a path that vanished locally: the unreadable
// path and the paths referring to it are skipped, the rest registered,
// the agent is ready and status names what it skipped.
func TestImportSkipsUnreadablePaths(t *testing.T) {
	u := newUnitEnv(t)
	a1, gone := info("a"), info("gone.drv")
	user := info("uses-gone", gone.Path)
	u.srv.publish(a1, gone, user)
	for _, in := range []nixstore.PathInfo{a1, user} {
		if err := os.MkdirAll(filepath.Join(u.cfg.StoreDir, filepath.Base(in.Path)), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	a := u.agent(t, func(o *Options) { o.Nix = readingNix{fakeNix: u.nix, storeDir: u.cfg.StoreDir} })
	if err := a.Start(context.Background()); err != nil {
		t.Fatalf("start: %v, want ready despite an unreadable path", err)
	}
	if !a.Ready() || !u.nix.isValid(a1.Path) || u.nix.isValid(gone.Path) || u.nix.isValid(user.Path) {
		t.Fatalf("ready %v, valid a=%v gone=%v user=%v: want ready, a only", a.Ready(), u.nix.isValid(a1.Path), u.nix.isValid(gone.Path), u.nix.isValid(user.Path))
	}
	if s := a.Status(); !strings.Contains(s.LastError, "2 paths are not readable") || !strings.Contains(s.LastError, gone.Path) {
		t.Fatalf("status last_error %q: want the skipped paths named", s.LastError)
	}
}

// A kernel that refuses metacopy=on: the overlay is mounted (and swapped)
// without it, and status says metacopy is off.
func TestMetacopyRefusedFallsBack(t *testing.T) {
	u := newUnitEnv(t)
	a1 := info("a")
	u.srv.publish(a1)
	u.m.noMetacopy = true
	a := u.agent(t)
	if err := a.Start(context.Background()); err != nil {
		t.Fatalf("start: %v", err)
	}
	if a.Status().Metacopy {
		t.Fatal("status says metacopy on after the kernel refused it")
	}
	u.srv.publish(a1, info("b"))
	if err := a.Check(context.Background(), true); err != nil {
		t.Fatalf("rotation: %v", err)
	}
	n := 0
	for _, c := range u.m.calls {
		if strings.Contains(c, "metacopy=on") {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("%d mount calls with metacopy=on, want only the first: %q", n, u.m.calls)
	}
	// A failure that is not metacopy's stays an error, metacopy stays on.
	v := newUnitEnv(t)
	v.srv.publish(a1)
	v.m.failSwap = errors.New("boom")
	b := v.agent(t)
	if err := b.Start(context.Background()); err != nil || !b.Status().Metacopy {
		t.Fatalf("start: %v, metacopy %v", err, b.Status().Metacopy)
	}
}

// mount.options may tune the NFS mount (timeouts, sizes, caching) but not
// change what strata depends on: such an option is refused at config load
// with an error naming the key, the option and why, since the kernel keeps
// the last value given and an extra option would win over strata's.
func TestMountOptionsRefuseWhatStrataDecides(t *testing.T) {
	load := func(t *testing.T, opts string) (Config, error) {
		return loadConfig(t, "mount:\n  options: ["+opts+"]\n", nil)
	}
	for _, tc := range []struct{ opt, why string }{
		{"soft", "hard"},
		{"softerr", "hard"},
		{"vers=4", "NFSv3"},
		{"nfsvers=4.2", "NFSv3"},
		{"proto=udp", "TCP"},
		{"udp", "TCP"},
		{"port=2050", "portmapper"},
		{"mountport=111", "portmapper"},
		{"mountproto=udp", "portmapper"},
		{"addr=10.0.0.9", "server.nfs"},
		{"mountaddr=10.0.0.9", "server.nfs"},
		{"rw", "read-only"},
		{"ro", "read-only"},
		{"noacl", "Operation not supported"},
		{"sharecache", "cache"},
		{"nosharecache", "cache"},
		{"lock", "lock manager"},
		{"local_lock=none", "lock manager"},
		{"nconnect=8", "mount.nconnect"},
		{"HARD", "hard"},
	} {
		t.Run(tc.opt, func(t *testing.T) {
			_, err := load(t, "timeo=600, "+tc.opt)
			if err == nil {
				t.Fatalf("mount.options %s accepted", tc.opt)
			}
			for _, want := range []string{`"mount.options"`, `"` + tc.opt + `"`, tc.why} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not say %q", err, want)
				}
			}
		})
	}
	c, err := load(t, "timeo=600, retrans=5, rsize=1048576, wsize=1048576, actimeo=60, noac, nocto, lookupcache=positive, fsc")
	if err != nil {
		t.Fatalf("tuning options refused: %v", err)
	}
	if len(c.MountOptions) != 9 {
		t.Fatalf("mount options %v, want the 9 given", c.MountOptions)
	}
}

// A generation kept below the newest for a local path that refers to one
// of its paths, then retired by the server (no longer listed: its files
// are going), is not kept through the next rotation: the path kept through
// it is invalidated with the local path that refers to it, and its lower
// is released, as the restart after a retirement does (planLeaving).
func TestRotateDropsRetiredKeptGeneration(t *testing.T) {
	u := newUnitEnv(t)
	lib, same := info("lib"), info("same")
	u.srv.publish(lib, same)
	a := u.agent(t)
	ctx := context.Background()
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	local := info("local-out", lib.Path)
	u.nix.Load(ctx, nixstore.RowsFromInfos([]nixstore.PathInfo{local}), nil)
	u.srv.publish(same)
	if err := a.Check(ctx, false); err != nil {
		t.Fatal(err)
	}
	if g, _ := u.overlayLowers(t, a); !slices.Equal(g, []uint64{2, 1}) {
		t.Fatalf("overlay lowers %v, want [2 1]", g)
	}
	u.srv.mu.Lock()
	delete(u.srv.gens, 1)
	u.srv.mu.Unlock()
	u.srv.publish(same, info("third"))
	if err := a.Check(ctx, false); err != nil {
		t.Fatal(err)
	}
	if g, _ := u.overlayLowers(t, a); !slices.Equal(g, []uint64{3}) {
		t.Fatalf("overlay lowers %v, want [3]: generation 1 was retired", g)
	}
	if m := u.lowerMounts(a); m["3"] != 1 || len(m) != 1 {
		t.Fatalf("lower mounts %v, want only 3", m)
	}
	if u.nix.isValid(lib.Path) || u.nix.isValid(local.Path) || !u.nix.isValid(same.Path) {
		t.Fatalf("validity lib=%v local=%v same=%v, want false false true", u.nix.isValid(lib.Path), u.nix.isValid(local.Path), u.nix.isValid(same.Path))
	}
	if h := Holding(a.State()); !slices.Equal(h, []uint64{3}) {
		t.Fatalf("holding %v, want [3]", h)
	}
}

// Review 19 #1: the builder mounted generations of a server whose store
// dir is not its own (store.dir /nix/store, generations of /gnu/store): their
// paths would be registered under a directory that does not hold them.
// Refused with an error naming both dirs, before anything is mounted: at
// the first start (the server's generation list says its store dir), and
// at a rotation, also from a server too old to say it in its list (the
// path rows' header says it, fetched before the mount).
func TestOtherStoreDirRefused(t *testing.T) {
	gnu := func(name string) nixstore.PathInfo {
		in := info(name)
		in.Path = strings.Replace(in.Path, "/nix/store/", "/gnu/store/", 1)
		return in
	}
	want := "store dir /gnu/store, but this builder's store dir is /nix/store"

	u := newUnitEnv(t)
	u.srv.storeDir = "/gnu/store"
	u.srv.publish(gnu("a"))
	a := u.agent(t)
	err := a.Start(context.Background())
	if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "server http://central:7480") {
		t.Fatalf("first start against a /gnu/store server: %v, want %q naming the server", err, want)
	}
	if len(u.m.calls) != 0 || a.Ready() || a.State().Generation != 0 {
		t.Fatalf("first start refused, yet mount calls %v, ready %v, state %s", u.m.calls, a.Ready(), a.State())
	}

	for _, old := range []bool{false, true} {
		t.Run(fmt.Sprintf("rotation store_dir listed %v", !old), func(t *testing.T) {
			u := newUnitEnv(t)
			u.srv.publish(info("a"))
			a := u.agent(t)
			if err := a.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			u.srv.mu.Lock()
			u.srv.storeDir, u.srv.listsNoStoreDir = "/gnu/store", old
			u.srv.mu.Unlock()
			u.srv.publish(gnu("b"))
			u.m.calls = nil
			err := a.Check(context.Background(), false)
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Fatalf("rotation to a /gnu/store generation: %v, want %q", err, want)
			}
			if len(u.m.calls) != 0 {
				t.Errorf("the refused rotation made mount calls %v", u.m.calls)
			}
			if st := a.State(); st.String() != "idle(1)" || !a.Ready() {
				t.Errorf("state %s after the refused rotation, want idle(1) and ready", st)
			}
			if g, n := u.overlayLowers(t, a); !slices.Equal(g, []uint64{1}) || n != 1 {
				t.Errorf("overlay lowers %v (%d), want [1]", g, n)
			}
			if u.nix.isValid(gnu("b").Path) {
				t.Errorf("%s registered", gnu("b").Path)
			}
		})
	}
}

// A state_dir that is a file, or lies under one, is refused at load naming
// state_dir (before, the start failed later with "api socket ...: not a
// directory"); the file is left as it was, and a state_dir that does not
// exist yet is fine (the start makes it).
func TestConfigStateDirNotADirectory(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "state")
	if err := os.WriteFile(file, []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{file, filepath.Join(file, "builder")} {
		_, err := loadConfig(t, "", map[string]string{"STRATA_STATE_DIR": p})
		if err == nil || !strings.Contains(err.Error(), `config: key "state_dir" (from env STRATA_STATE_DIR)`) ||
			!strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), "not a directory") {
			t.Errorf("state_dir %s: %v, want an error naming state_dir, the path and \"not a directory\"", p, err)
		}
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "data" {
		t.Errorf("the file state_dir named: %q %v, want it unchanged", b, err)
	}
	if _, err := loadConfig(t, "", map[string]string{"STRATA_STATE_DIR": filepath.Join(dir, "new")}); err != nil {
		t.Errorf("state_dir that does not exist: %v", err)
	}
}
