// Package testenv gates tests on what the machine offers (root, commands,
// loop devices, btrfs) and builds real loop-backed filesystems for them.
//
// A missing requirement skips the test on a developer's machine, but fails it
// when CI=true: tests of the real data path must run in CI, never vanish.
package testenv

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// InCI reports whether the tests run under CI (CI=true).
func InCI() bool { return os.Getenv("CI") == "true" }

// Require skips t (fails it under CI) when ok is false, naming why.
func Require(t testing.TB, ok bool, why string) {
	t.Helper()
	if ok {
		return
	}
	if InCI() {
		t.Fatalf("required under CI=true: %s", why)
	}
	t.Skipf("skipping: %s", why)
}

// RequireRoot needs uid 0.
func RequireRoot(t testing.TB) {
	t.Helper()
	Require(t, os.Geteuid() == 0, "needs root")
}

// RequireCommands needs every named command on PATH.
func RequireCommands(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		_, err := exec.LookPath(n)
		Require(t, err == nil, fmt.Sprintf("needs command %q on PATH", n))
	}
}

// RequireZpool returns the OpenZFS pool named by STRATA_TEST_ZPOOL. The host
// tier has no ZFS: the VM tier builds a package's integration test binary and
// runs it as root in a guest with a pool, with STRATA_TEST_ZPOOL set. Where it
// is unset the test skips if STRATA_ZFS_IN_VM=1 (the Makefile's statement that
// the VM tier runs it) and otherwise goes through Require, so under CI=true it
// fails rather than vanishes. The binary needs zfs, mount and umount on PATH.
func RequireZpool(t testing.TB) string {
	t.Helper()
	pool := os.Getenv("STRATA_TEST_ZPOOL")
	if pool == "" {
		if os.Getenv("STRATA_ZFS_IN_VM") == "1" {
			t.Skip("run by the VM tier")
		}
		Require(t, false, "needs an OpenZFS pool named by STRATA_TEST_ZPOOL (or STRATA_ZFS_IN_VM=1 when the VM tier runs this test)")
	}
	RequireRoot(t)
	RequireCommands(t, "zfs", "mount", "umount")
	return pool
}

// Run runs a command and fails t with its output if it fails. It returns
// the combined output.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// LoopBtrfs creates a sparse image of size (e.g. "1G") in a temp dir, formats
// it as btrfs on a loop device, mounts it and returns the mountpoint. Cleanup
// unmounts it and frees the loop device.
func LoopBtrfs(t testing.TB, size string) string {
	t.Helper()
	RequireRoot(t)
	RequireCommands(t, "losetup", "mkfs.btrfs", "btrfs")
	dir := t.TempDir()
	img := filepath.Join(dir, "btrfs.img")
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	Run(t, "truncate", "-s", size, img)
	Run(t, "mkfs.btrfs", "-q", "-f", img)
	loop := strings.TrimSpace(Run(t, "losetup", "--find", "--show", img))
	t.Cleanup(func() { _ = exec.Command("losetup", "-d", loop).Run() })
	Run(t, "mount", "-t", "btrfs", loop, mnt)
	t.Cleanup(func() {
		if out, err := exec.Command("umount", "-l", mnt).CombinedOutput(); err != nil {
			t.Logf("umount %s: %v %s", mnt, err, out)
		}
	})
	return mnt
}

// Fill fills the filesystem that holds dir until at most leave bytes are
// free for data (statfs), so that writes there fail with ENOSPC: first one
// preallocated file, then, with leave 0, small files until a write fails
// (on btrfs they are inlined in metadata, so its metadata fills as well). It
// returns a function that removes what it wrote and syncs the filesystem,
// so the space is free again; Cleanup calls it too (a second call does
// nothing).
func Fill(t testing.TB, dir string, leave int64) (free func()) {
	t.Helper()
	fill, err := os.MkdirTemp(dir, ".testenv-fill-")
	if err != nil {
		t.Fatalf("fill %s: %v", dir, err)
	}
	done := false
	free = func() {
		if done {
			return
		}
		done = true
		if err := os.RemoveAll(fill); err != nil {
			t.Errorf("free %s: %v", fill, err)
		}
		if d, err := os.Open(dir); err == nil {
			_ = unix.Syncfs(int(d.Fd())) // btrfs frees at the commit
			d.Close()
		}
	}
	t.Cleanup(free)
	avail := func() int64 {
		var st unix.Statfs_t
		if err := unix.Statfs(fill, &st); err != nil {
			t.Fatalf("statfs %s: %v", fill, err)
		}
		return int64(st.Bavail) * st.Bsize
	}
	f, err := os.Create(filepath.Join(fill, "big"))
	if err != nil {
		t.Fatalf("fill %s: %v", dir, err)
	}
	defer f.Close()
	var off int64
	for n := avail() - leave; n >= 64<<10; n = avail() - leave {
		if err := unix.Fallocate(int(f.Fd()), 0, off, n); err != nil {
			if !errors.Is(err, unix.ENOSPC) {
				t.Fatalf("fill %s: fallocate: %v", dir, err)
			}
			n /= 2 // the estimate was too high; take half and measure again
			if err := unix.Fallocate(int(f.Fd()), 0, off, n); err != nil {
				if errors.Is(err, unix.ENOSPC) {
					break
				}
				t.Fatalf("fill %s: fallocate: %v", dir, err)
			}
		}
		off += n
	}
	if leave > 0 {
		return free
	}
	junk := make([]byte, 2000)
	for i := range junk {
		junk[i] = byte(i*7 + i/13)
	}
	for i := 0; i < 1_000_000; i++ {
		err := os.WriteFile(filepath.Join(fill, fmt.Sprintf("s%07d", i)), junk, 0o644)
		if errors.Is(err, unix.ENOSPC) {
			return free
		}
		if err != nil {
			t.Fatalf("fill %s: %v", dir, err)
		}
	}
	t.Fatalf("fill %s: a million small files and still no ENOSPC", dir)
	return free
}
