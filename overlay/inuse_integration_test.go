//go:build integration

package overlay

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/mountinfo"
)

// mmapHelperEnv makes the test binary map the file it names, close it,
// leave its directory, print "mapped" and wait for stdin to close.
const mmapHelperEnv = "STRATA_OVERLAYTEST_MMAP"

func mmapHelper(path string) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	b, err := unix.Mmap(fd, 0, 4096, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	_ = unix.Close(fd)
	_ = os.Chdir("/")
	fmt.Printf("mapped %c\n", b[0])
	_, _ = io.Copy(io.Discard, os.Stdin)
	os.Exit(0)
}

// testOverlay mounts an overlay of fresh directories under base at
// base/m and returns its mount and Detached record (taken as the builder
// takes it before a swap).
func testOverlay(t *testing.T, base string) (string, Detached) {
	t.Helper()
	for _, d := range []string{"l", "u", "w", "m"} {
		must(t, os.MkdirAll(filepath.Join(base, d), 0o755))
	}
	writeFile(t, filepath.Join(base, "l", "lowerfile"), strings.Repeat("x", 8192))
	mp := filepath.Join(base, "m")
	if err := unix.Mount("overlay", mp, "overlay", 0, "lowerdir="+base+"/l,upperdir="+base+"/u,workdir="+base+"/w"); err != nil {
		t.Fatalf("mount overlay: %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(mp, unix.MNT_DETACH) })
	m, ok := mountinfo.Top(readMounts(t), mp)
	if !ok {
		t.Fatalf("no mount at %s", mp)
	}
	u, err := IdentityOf(mp, m)
	if err != nil {
		t.Fatal(err)
	}
	if (u != 0) != realKernel().unique {
		t.Fatalf("unique mount id %d, kernel has them: %v", u, realKernel().unique)
	}
	return mp, Detached{Dev: DevOf(m), MountID: m.ID, MountIDUnique: u, Work: filepath.Join(base, "w")}
}

// builderOverlay is testOverlay laid out as a builder's: its lower is a
// filesystem of its own (a tmpfs standing in for the NFS mount of a
// generation), listed in Lowers as the builder lists it; upper and
// workdir are on base's filesystem, not listed (the builder's state_dir).
// It returns the overlay's mountpoint, the lower's, and the record.
func builderOverlay(t *testing.T, base string) (string, string, Detached) {
	t.Helper()
	lower := mountTmpfs(t, filepath.Join(base, "l"), fmt.Sprintf("strata-test-lower-%d", time.Now().UnixNano()))
	lm, ok := mountinfo.Top(readMounts(t), lower)
	if !ok {
		t.Fatalf("no mount at %s", lower)
	}
	lu, err := IdentityOf(lower, lm)
	must(t, err)
	mp, d := testOverlay(t, base)
	d.Lowers = []DetachedLower{{Dev: DevOf(lm), FSType: lm.FSType, Source: lm.Source, MountIDUnique: lu}}
	return mp, lower, d
}

func inUseNow(t *testing.T, unique bool, ds ...Detached) []bool {
	t.Helper()
	k := realKernel()
	k.unique = k.unique && unique
	used, denied, err := inUse("/proc", ds, k)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("in use (unique ids: %v): %v, %d processes not inspected", k.unique, used, denied)
	return used
}

// On this kernel: a detached overlay whose device and mount id the next
// overlay got (the kernel hands out the lowest free numbers) is not in
// use because a process sits on that next overlay, even once that one is
// detached too and so in no mount table; the next overlay is. Without
// unique ids (kernels before 6.8) the same holds while the new mount is
// in a table; once it is detached as well, both numbers are all there is
// to compare, and the old overlay counts (logged, documented in InUse).
func TestInUseNumbersReusedRealKernel(t *testing.T) {
	requireOverlay(t)
	base := t.TempDir()
	var mpB string
	var a, b Detached
	for try := 0; ; try++ {
		mpA, da := testOverlay(t, filepath.Join(base, fmt.Sprint("a", try)))
		if !inUseNow(t, true, da)[0] {
			t.Fatal("a mounted overlay is not in use")
		}
		must(t, unix.Unmount(mpA, unix.MNT_DETACH))
		if inUseNow(t, true, da)[0] {
			t.Fatal("an overlay detached with nothing on it is in use")
		}
		mp, db := testOverlay(t, filepath.Join(base, fmt.Sprint("b", try)))
		if db.Dev == da.Dev {
			mpB, a, b = mp, da, db
			break
		}
		// Another mount on the machine took the number first.
		if try == 20 {
			t.Fatalf("no overlay got the device of a detached one in 20 tries")
		}
		must(t, unix.Unmount(mp, unix.MNT_DETACH))
	}
	t.Logf("detached overlay %+v; next overlay %+v (mount id reused: %v)", a, b, a.MountID == b.MountID)
	if u := inUseNow(t, false, Detached{Dev: a.Dev, MountID: a.MountID, Work: a.Work}); u[0] {
		t.Fatal("without unique ids: the old overlay counts while its device is another mount's in the table")
	}
	sleep := exec.Command("sleep", "600")
	sleep.Dir = mpB
	must(t, sleep.Start())
	t.Cleanup(func() { _ = sleep.Process.Kill(); _ = sleep.Wait() })
	must(t, unix.Unmount(mpB, unix.MNT_DETACH))
	if realKernel().unique {
		if u := inUseNow(t, true, a, b); u[0] || !u[1] {
			t.Fatalf("in use = %v, want [false true]: the process is on the next overlay only", u)
		}
	} else if u := inUseNow(t, true, b); !u[0] {
		t.Fatal("kernel without unique mount ids: the detached overlay a process is on is not in use")
	}
	u := inUseNow(t, false, Detached{Dev: a.Dev, MountID: a.MountID, Work: a.Work})
	t.Logf("without unique ids, both overlays detached, mount id reused %v: old overlay in use = %v", a.MountID == b.MountID, u[0])
	_ = sleep.Process.Kill()
	_ = sleep.Wait()
	if u := inUseNow(t, true, a, b); u[0] || u[1] {
		t.Fatalf("in use = %v after the process exited, want [false false]", u)
	}
}

// The hold TestGossipDiscoveryAndWake saw, on this kernel: a btrfs
// snapshot made after an overlay was detached gets the overlay's freed
// device (a subvolume has a device of its own that no mount table shows),
// and a process with its cwd in that snapshot does not keep the old
// overlay, by unique id or by device and mount id (the btrfs mount's).
func TestInUseBtrfsSnapshotGetsDeviceRealKernel(t *testing.T) {
	requireOverlay(t)
	mnt := testenv.LoopBtrfs(t, "256M")
	testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(mnt, "s"))
	base := t.TempDir()
	var a Detached
	var snap string
	for try := 0; ; try++ {
		mp, d := testOverlay(t, filepath.Join(base, fmt.Sprint(try)))
		must(t, unix.Unmount(mp, unix.MNT_DETACH))
		snap = filepath.Join(mnt, fmt.Sprint("snap", try))
		testenv.Run(t, "btrfs", "subvolume", "snapshot", filepath.Join(mnt, "s"), snap)
		var st unix.Stat_t
		must(t, unix.Stat(snap, &st))
		if (Dev{unix.Major(st.Dev), unix.Minor(st.Dev)}) == d.Dev {
			a = d
			break
		}
		if try == 20 {
			t.Fatalf("no btrfs snapshot got the device of a detached overlay in 20 tries")
		}
	}
	t.Logf("detached overlay %+v; snapshot %s has its device", a, snap)
	sleep := exec.Command("sleep", "600")
	sleep.Dir = snap
	must(t, sleep.Start())
	t.Cleanup(func() { _ = sleep.Process.Kill(); _ = sleep.Wait() })
	if u := inUseNow(t, true, a); u[0] {
		t.Fatal("a process in a btrfs snapshot with the old overlay's device keeps it")
	}
	if u := inUseNow(t, false, Detached{Dev: a.Dev, MountID: a.MountID, Work: a.Work}); u[0] {
		t.Fatal("without unique ids: a process in a btrfs snapshot with the old overlay's device keeps it")
	}
}

// A process that only maps a file of a detached overlay (no descriptor,
// cwd elsewhere) keeps it in use, by unique id and without; once it exits
// the overlay is free. The overlay is laid out as a builder's, and
// detached as a rotation detaches it: the overlay, then its lower (the
// builder releases the old generation's NFS mount). Kernels differ in
// what maps shows for the file (6.12: the overlay's device; 6.1: the
// layer's, the lower's or the upper's, with the overlay's path); its
// map_files link leads to the overlay's mount on both.
func TestInUseMappedOnlyRealKernel(t *testing.T) {
	requireOverlay(t)
	for _, f := range []string{"lowerfile", "upperfile"} {
		t.Run(f, func(t *testing.T) {
			mp, lower, d := builderOverlay(t, t.TempDir())
			if f == "upperfile" {
				writeFile(t, filepath.Join(mp, f), strings.Repeat("y", 8192))
			}
			cmd := exec.Command(os.Args[0])
			cmd.Env = append(os.Environ(), mmapHelperEnv+"="+filepath.Join(mp, f))
			in, err := cmd.StdinPipe()
			must(t, err)
			out, err := cmd.StdoutPipe()
			must(t, err)
			cmd.Stderr = os.Stderr
			must(t, cmd.Start())
			t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
			line, err := bufio.NewReader(out).ReadString('\n')
			if err != nil || !strings.HasPrefix(line, "mapped") {
				t.Fatalf("helper: %q %v", line, err)
			}
			must(t, unix.Unmount(mp, unix.MNT_DETACH))
			must(t, unix.Unmount(lower, unix.MNT_DETACH))
			maps, _ := os.ReadFile(fmt.Sprintf("/proc/%d/maps", cmd.Process.Pid))
			t.Logf("overlay %s, lower %s; helper maps:\n%s", d.Dev, d.Lowers[0].Dev, grepLines(string(maps), f))
			for _, unique := range []bool{true, false} {
				if !inUseNow(t, unique, d)[0] {
					t.Fatalf("unique ids %v: an overlay a process has a file of mapped is not in use", unique)
				}
			}
			in.Close()
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case err := <-done:
				must(t, err)
			case <-time.After(10 * time.Second):
				t.Fatal("helper did not exit")
			}
			for _, unique := range []bool{true, false} {
				if inUseNow(t, unique, d)[0] {
					t.Fatalf("unique ids %v: in use after the process exited", unique)
				}
			}
		})
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
