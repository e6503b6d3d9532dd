//go:build integration

package overlay

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/strata-nix/strata/mountinfo"

	"golang.org/x/sys/unix"
)

// A swap whose read-back fails after the old overlay was detached reports
// the switch with its error, for both methods: the caller must not take
// it for a failed swap.
func TestSwapSwitchedThenFailed(t *testing.T) {
	requireOverlay(t)
	for _, method := range []Method{MethodBeneath, MethodPropagation} {
		if method == MethodBeneath && !BeneathSupported() {
			t.Fatal("this host's kernel has no MOVE_MOUNT_BENEATH")
		}
		t.Run(method.String(), func(t *testing.T) {
			ctx := context.Background()
			e := newEnv(t, 1)
			if err := Mount(ctx, e.target, e.layers(t, 0)); err != nil {
				t.Fatal(err)
			}
			readBack = func() ([]mountinfo.Mount, error) { return nil, errors.New("injected read-back failure") }
			defer func() { readBack = mountinfo.Read }()
			res, err := Swap(ctx, e.target, e.layers(t, 1), SwapOptions{Method: method, StagingDir: e.staging})
			if err == nil || !strings.Contains(err.Error(), "injected") || !res.Switched || res.Method != method {
				t.Fatalf("Swap = %+v, %v: want Switched with the injected error", res, err)
			}
			if c := readFile(t, filepath.Join(e.target, "common")); c != "gen 1\n" {
				t.Fatalf("after the switch common = %q, want gen 1", c)
			}
			// A swap refused before anything changed is not switched.
			readBack = mountinfo.Read
			bad := e.layers(t, 1)
			bad.Lower = []string{filepath.Join(e.lowers, "gone")}
			if res, err := Swap(ctx, e.target, bad, SwapOptions{Method: method, StagingDir: e.staging}); err == nil || res.Switched {
				t.Fatalf("bad swap = %+v, %v: want an error, not switched", res, err)
			}
		})
	}
}

// BindBelow binds the store dir as it is before an overlay covers it, and
// the same directory again (through its parent mount) once the overlay
// covers it; the bind never shows the overlay or mounts made later, even
// when the parent mount is shared.
func TestBindBelow(t *testing.T) {
	requireOverlay(t)
	ctx := context.Background()
	e := newEnv(t, 0)
	writeFile(t, filepath.Join(e.target, "local-path", "bin", "tool"), "local tool\n")
	if err := unix.Mount("", e.srv, "", unix.MS_SHARED, ""); err != nil {
		t.Fatal(err)
	}
	ours := func(m mountinfo.Mount) bool {
		u, _ := m.Option("upperdir")
		return m.FSType == "overlay" && u == e.upper
	}
	local := filepath.Join(e.base, "local")
	os.Mkdir(local, 0o755)
	if err := BindBelow(ctx, e.target, local, e.staging, ours); err != nil {
		t.Fatal(err)
	}
	l := e.layers(t, 0)
	l.Lower = append(l.Lower, local)
	if err := Mount(ctx, e.target, l); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(e.target, unix.MNT_DETACH)
	if c := readFile(t, filepath.Join(e.target, "local-path", "bin", "tool")); c != "local tool\n" {
		t.Fatalf("local path through the overlay = %q", c)
	}
	if c := readFile(t, filepath.Join(e.target, "common")); c != "gen 0\n" {
		t.Fatalf("generation file through the overlay = %q", c)
	}
	if _, err := os.Stat(filepath.Join(local, "common")); err == nil {
		t.Fatal("the local bind shows the overlay mounted later")
	}
	ms := readMounts(t)
	if b, ok := mountinfo.Top(ms, local); !ok || b.PeerGroup() != 0 {
		t.Fatalf("local bind %+v: want a private mount", b)
	}
	// Covered: bound again through the parent mount.
	if err := unix.Unmount(local, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if err := BindBelow(ctx, e.target, local, e.staging, ours); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(local, unix.MNT_DETACH)
	if c := readFile(t, filepath.Join(local, "local-path", "bin", "tool")); c != "local tool\n" {
		t.Fatalf("local bind under the overlay = %q", c)
	}
	if _, err := os.Stat(filepath.Join(local, "common")); err == nil {
		t.Fatal("the local bind made under the overlay shows the overlay")
	}
	for _, m := range mountinfo.Under(readMounts(t), e.staging) {
		if m.Mountpoint != e.staging {
			t.Errorf("staging mount leaked: %+v", m)
		}
	}
}

// With metacopy=on a hard link to a lower file (what Nix's sandbox does
// with single-file inputs, and nix-store --optimise with every file)
// copies only the inode up; without it, the whole file. The file reads
// the same either way.
func TestMetacopyHardLink(t *testing.T) {
	requireOverlay(t)
	ctx := context.Background()
	const size = 16 << 20
	for _, meta := range []bool{true, false} {
		t.Run(map[bool]string{true: "metacopy", false: "nometacopy"}[meta], func(t *testing.T) {
			e := newEnv(t, 0)
			big := strings.Repeat("0123456789abcdef", size/16)
			writeFile(t, filepath.Join(e.gen(0), "input.tar"), big)
			l := e.layers(t, 0)
			l.Metacopy = meta
			if err := Mount(ctx, e.target, l); err != nil {
				t.Fatal(err)
			}
			defer unix.Unmount(e.target, unix.MNT_DETACH)
			if err := os.Mkdir(filepath.Join(e.target, "chroot"), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Link(filepath.Join(e.target, "input.tar"), filepath.Join(e.target, "chroot", "input.tar")); err != nil {
				t.Fatal(err)
			}
			if c := readFile(t, filepath.Join(e.target, "chroot", "input.tar")); c != big {
				t.Fatal("hard link reads other bytes")
			}
			os.RemoveAll(filepath.Join(e.target, "chroot"))
			var st unix.Stat_t
			if err := unix.Lstat(filepath.Join(e.upper, "input.tar"), &st); err != nil {
				t.Fatal(err)
			}
			used := st.Blocks * 512
			t.Logf("metacopy=%v: upper copy of the 16 MiB input uses %d bytes", meta, used)
			if meta && used > 64<<10 {
				t.Fatalf("metacopy=on: the upper holds %d bytes of the linked input, want metadata only", used)
			}
			if !meta && used < size {
				t.Fatalf("metacopy=off: upper holds %d bytes; the control should copy the whole file", used)
			}
		})
	}
}

// NixOS mounts the store read-only on itself. BindBelow binds that mount
// (read-only still) before the overlay covers it; once covered, no path
// reaches it any more, and BindBelow says so instead of binding the
// overlay.
func TestBindBelowReadOnlyStoreMount(t *testing.T) {
	requireOverlay(t)
	ctx := context.Background()
	e := newEnv(t, 0)
	writeFile(t, filepath.Join(e.target, "system-path", "bin", "init"), "the running system\n")
	if err := unix.Mount(e.target, e.target, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("", e.target, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		t.Fatal(err)
	}
	ours := func(m mountinfo.Mount) bool {
		u, _ := m.Option("upperdir")
		return m.FSType == "overlay" && u == e.upper
	}
	local := filepath.Join(e.base, "local")
	os.Mkdir(local, 0o755)
	if err := BindBelow(ctx, e.target, local, e.staging, ours); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(local, unix.MNT_DETACH)
	if b, ok := mountinfo.Top(readMounts(t), local); !ok || !b.ReadOnly() {
		t.Fatalf("local bind %+v: want read-only like the store mount", b)
	}
	l := e.layers(t, 0)
	l.Lower = append(l.Lower, local)
	if err := Mount(ctx, e.target, l); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(e.target, unix.MNT_DETACH)
	if c := readFile(t, filepath.Join(e.target, "system-path", "bin", "init")); c != "the running system\n" {
		t.Fatalf("system path through the overlay = %q", c)
	}
	other := filepath.Join(e.base, "local2")
	os.Mkdir(other, 0o755)
	err := BindBelow(ctx, e.target, other, e.staging, ours)
	if err == nil || !strings.Contains(err.Error(), "unmount the overlays") {
		t.Fatalf("BindBelow under the overlay = %v, want an error saying the store mount cannot be reached", err)
	}
	if len(mountinfo.At(readMounts(t), other)) != 0 {
		t.Fatal("a failed BindBelow left a mount")
	}
}
