//go:build integration

package builder

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/strata-nix/strata/mountinfo"
	"github.com/strata-nix/strata/nixstore"

	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/overlay"
)

// A builder whose store already holds paths (a nix-store --add, a local
// build) keeps them valid, readable and runnable through first start, two
// rotations and an agent restart, with each swap method; nothing leaves
// its DB and nix-store --verify --check-contents stays clean.
func TestLocalStoreKept(t *testing.T) {
	for _, m := range []overlay.Method{overlay.MethodBeneath, overlay.MethodPropagation} {
		t.Run(m.String(), func(t *testing.T) {
			if m == overlay.MethodBeneath {
				testenv.Require(t, overlay.BeneathSupported(), "kernel has MOVE_MOUNT_BENEATH (Linux 6.5+)")
			}
			e := newEnv(t)
			e.cfg.SwapMethod = m
			e.central.Fill(t)
			e.publish(t)
			e.startServer(t)
			added := e.builder.AddTree(t, "local-added", map[string]string{"bin/hi*": "#!/bin/sh\necho hi from the local store\n"})
			built := e.builder.Build(t, "local-built", `mkdir $out; $in0/bin/hi > $out/said`, added)
			before := dbPaths(t, e)
			if len(before) < 3 {
				t.Fatalf("local DB holds %d paths before start", len(before))
			}
			check := func(when string) {
				t.Helper()
				if v := e.valid(t, before...); len(v) != len(before) {
					t.Fatalf("%s: %d of %d local paths valid", when, len(v), len(before))
				}
				for _, p := range before {
					if _, err := os.Lstat(e.local(p)); err != nil {
						t.Fatalf("%s: local path not readable: %v", when, err)
					}
				}
				out, err := exec.Command(filepath.Join(e.local(added), "bin", "hi")).Output()
				if err != nil || string(out) != "hi from the local store\n" {
					t.Fatalf("%s: local executable: %q %v", when, out, err)
				}
				if got := readFile(t, filepath.Join(e.local(built), "said")); got != "hi from the local store\n" {
					t.Fatalf("%s: local build output reads %q", when, got)
				}
				if missing := without(before, dbPaths(t, e)); len(missing) > 0 {
					t.Fatalf("%s: dropped from the DB: %v", when, missing)
				}
			}
			a := e.agent(t)
			if err := a.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			check("first start")
			e.verify(t)
			for i := range 2 {
				e.central.AddText(t, "fresh-"+string(rune('a'+i)), "new\n")
				g := e.publish(t)
				if err := a.Check(context.Background(), true); err != nil {
					t.Fatal(err)
				}
				if st := a.State(); st.Generation != g || a.Status().SwapMethod != m.String() {
					t.Fatalf("after rotation: %s via %s", st, a.Status().SwapMethod)
				}
				check("rotation " + string(rune('1'+i)))
				e.checkMounts(t, a.State())
			}
			b := e.agent(t)
			if err := b.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			check("agent restart")
			e.verify(t)
			check("after verify")
		})
	}
}

// Garbage collection on the builder frees a local output nobody refers to
// and leaves every generation path valid, readable and without a
// whiteout. A path a collection hid before the generation was rooted
// (nix-store --delete through the overlay: invalid, whiteout in the upper)
// is repaired at the next rotation, even when the new generation adds a
// path that refers to it; after a "reboot" (every mount gone) the agent
// comes back with every path of the newest generation valid.
func TestGarbageCollectionKeepsGenerations(t *testing.T) {
	e := newEnv(t)
	paths := e.central.Fill(t)
	e.publish(t)
	e.startServer(t)
	a := e.agent(t)
	ctx := context.Background()
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	garbage := e.builder.Build(t, "local-garbage", `mkdir $out; cat $in0/data.txt > $out/copy`, paths[1])
	e.central.AddText(t, "fresh", "new in 2\n")
	g := e.publish(t)
	if err := a.Check(ctx, true); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	_, gcOut := e.nix(t, "nix-store", "--gc")
	t.Logf("nix-store --gc took %v: %s", time.Since(began).Round(time.Millisecond), strings.TrimSpace(gcOut))
	checkGeneration(t, e, g)
	if v := e.valid(t, garbage); v[garbage] {
		t.Fatal("unreferenced local output still valid after GC")
	}
	if _, err := os.Lstat(e.local(garbage)); err == nil {
		t.Fatal("unreferenced local output still there after GC")
	}

	// Before the fix: a GC deleted unrooted generation paths.
	lone := paths[2]
	root, err := os.Readlink(a.cfg.gcRootLink())
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(a.cfg.gcRootLink()); err != nil {
		t.Fatal(err)
	}
	if out, err := e.builder.Command("nix-store", "--delete", lone).CombinedOutput(); err == nil {
		t.Fatalf("nix-store --delete of a generation path succeeded while its root path is valid: %s", out)
	}
	e.nix(t, "nix-store", "--delete", root)
	e.nix(t, "nix-store", "--delete", lone)
	if !isWhiteout(filepath.Join(e.cfg.upperDir(), filepath.Base(lone))) {
		t.Fatal("nix-store --delete through the overlay left no whiteout")
	}
	uses := e.central.Build(t, "uses-lone", `mkdir $out; cat $in0 > $out/copy`, lone)
	g = e.publish(t)
	if err := a.Check(ctx, true); err != nil {
		t.Fatalf("rotation after a collected path: %v", err)
	}
	checkGeneration(t, e, g)
	if got := readFile(t, filepath.Join(e.local(uses), "copy")); got != "a lone file\n" {
		t.Fatalf("new path reads %q", got)
	}
	e.verify(t)

	// Reboot: every mount gone, state and upper kept; a newer generation.
	e.central.AddText(t, "after-reboot", "new in 4\n")
	g = e.publish(t)
	unmountAll(t, e)
	b := e.agent(t)
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := b.Check(ctx, true); err != nil {
		t.Fatal(err)
	}
	if st := b.State(); st.String() != "idle(4)" || !b.Ready() {
		t.Fatalf("after reboot: %s ready=%v", st, b.Ready())
	}
	checkGeneration(t, e, g)
	e.nix(t, "nix-store", "--gc")
	checkGeneration(t, e, g)
	e.verify(t)
}

// checkGeneration: every path of generation g is valid and readable, no
// whiteout hides one, and the GC root names a valid root path.
func checkGeneration(t *testing.T, e *env, g uint64) {
	t.Helper()
	reg := e.registration(t, g)
	all := pathsOf(reg)
	if v := e.valid(t, all...); len(v) != len(all) {
		t.Fatalf("generation %d: %d of %d paths valid: missing %v", g, len(v), len(all), without(all, keys(v)))
	}
	for _, p := range all {
		if _, err := os.Lstat(e.local(p)); err != nil {
			t.Fatalf("generation %d: %v", g, err)
		}
		if isWhiteout(filepath.Join(e.cfg.upperDir(), filepath.Base(p))) {
			t.Fatalf("generation %d: %s has a whiteout in the upper", g, p)
		}
	}
	root, err := os.Readlink(e.cfg.gcRootLink())
	if err != nil || !strings.HasSuffix(root, rootName(g)) {
		t.Fatalf("gc root %q (%v), want the root of generation %d", root, err, g)
	}
	if v := e.valid(t, root); !v[root] {
		t.Fatalf("root path %s not valid", root)
	}
}

func keys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// dbPaths lists the valid paths of the builder node's DB.
func dbPaths(t *testing.T, e *env) []string {
	t.Helper()
	out, _ := e.nix(t, "nix-store", "--dump-db")
	infos, err := nixstore.ParseRegistration(strings.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	return pathsOf(infos)
}

// unmountAll detaches what a reboot would take away: the overlays, the
// generation mounts and the local store bind.
func unmountAll(t *testing.T, e *env) {
	t.Helper()
	for range 6 {
		_ = unix.Unmount(e.cfg.StoreDir, unix.MNT_DETACH)
	}
	ms, _ := mountinfo.Read()
	for _, m := range slices.Backward(mountinfo.Under(ms, e.cfg.StateDir)) {
		_ = unix.Unmount(m.Mountpoint, unix.MNT_DETACH)
	}
	ms, _ = mountinfo.Read()
	if n := len(mountinfo.Under(ms, e.cfg.StateDir)) + len(mountinfo.At(ms, e.cfg.StoreDir)); n != 0 {
		t.Fatalf("%d mounts left after the simulated reboot", n)
	}
}

// A rotation while a sandboxed build runs: the builder's root (the build
// chroot, which Nix makes in the store dir) and cwd stay in the old
// overlay after the swap, and it writes, renames and deletes there; Nix
// then moves the output into place through the new overlay. The build
// succeeds, its output holds exactly what the builder left and verifies,
// with each swap method.
func TestRotationDuringBuild(t *testing.T) {
	for _, m := range []overlay.Method{overlay.MethodBeneath, overlay.MethodPropagation} {
		t.Run(m.String(), func(t *testing.T) {
			if m == overlay.MethodBeneath {
				testenv.Require(t, overlay.BeneathSupported(), "kernel has MOVE_MOUNT_BENEATH (Linux 6.5+)")
			}
			e := newEnv(t)
			e.cfg.SwapMethod = m
			paths := e.central.Fill(t)
			e.publish(t)
			e.startServer(t)
			a := e.agent(t)
			ctx := context.Background()
			if err := a.Start(ctx); err != nil {
				t.Fatal(err)
			}
			sync := t.TempDir()
			script := `mkdir $out; cd $out; cat $in0/data.txt > a; touch /sync/mid
while [ ! -e /sync/go ]; do sleep 0.05; done
echo two > b; mv a c; rm b; mkdir d; echo e > d/e; mv d dd; echo gone > $out/abs; rm $out/abs; echo done > done`
			expr := fmt.Sprintf(`derivation { name = "busy"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" %q ]; in0 = builtins.storePath %q; }`, script, paths[1])
			f := filepath.Join(t.TempDir(), "busy.nix")
			if err := os.WriteFile(f, []byte(expr), 0o644); err != nil {
				t.Fatal(err)
			}
			sh, err := filepath.EvalSymlinks(mustLookPath(t, "busybox"))
			if err != nil {
				t.Fatal(err)
			}
			cmd := e.builder.Command("nix-build", f, "--no-out-link", "--option", "sandbox-paths", "/bin/sh="+sh+" /sync="+sync)
			var out, stderr strings.Builder
			cmd.Stdout, cmd.Stderr = &out, &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(2 * time.Minute)
			for {
				if _, err := os.Stat(filepath.Join(sync, "mid")); err == nil {
					break
				}
				if time.Now().After(deadline) {
					cmd.Process.Kill()
					cmd.Wait()
					t.Fatalf("build never reached its middle: %s", stderr.String())
				}
				time.Sleep(20 * time.Millisecond)
			}
			e.central.AddText(t, "during-build", "new\n")
			g := e.publish(t)
			if err := a.Check(ctx, true); err != nil {
				t.Fatalf("rotation during the build: %v", err)
			}
			if st := a.State(); st.Generation != g {
				t.Fatalf("after rotation: %s", st)
			}
			os.WriteFile(filepath.Join(sync, "go"), nil, 0o644)
			if err := cmd.Wait(); err != nil {
				t.Fatalf("build across the rotation failed: %v\n%s", err, stderr.String())
			}
			o := strings.TrimSpace(out.String())
			got := map[string]string{}
			filepath.WalkDir(e.local(o), func(p string, d fs.DirEntry, err error) error {
				if err == nil && !d.IsDir() {
					b, _ := os.ReadFile(p)
					rel, _ := filepath.Rel(e.local(o), p)
					got[rel] = string(b)
				}
				return nil
			})
			want := map[string]string{"c": strings.Repeat("b", 10000), "dd/e": "e\n", "done": "done\n"}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("output holds %v, want %v", got, want)
			}
			e.nix(t, "nix-store", "--verify-path", o)
			e.verify(t)
		})
	}
}

func mustLookPath(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatal(err)
	}
	return p
}
