package overlay

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// fakeProc is a /proc of regular files: a link (cwd, root, exe, fd/N,
// map_files/R) holds what the fake statx answers for it, "dev=0:77
// mnt=500 unique=9001" or "err=EACCES".
type fakeProc struct {
	t   *testing.T
	dir string
	// onStatx, when set, runs before each statx (a mount made while
	// InUse reads the processes).
	onStatx func(p string)
	// ptrace: the caller has CAP_SYS_PTRACE.
	ptrace bool
}

func newFakeProc(t *testing.T) *fakeProc { return &fakeProc{t: t, dir: t.TempDir()} }

// write writes file rel under the fake /proc.
func (f *fakeProc) write(rel, content string) {
	f.t.Helper()
	p := filepath.Join(f.dir, rel)
	must(f.t, os.MkdirAll(filepath.Dir(p), 0o755))
	must(f.t, os.WriteFile(p, []byte(content), 0o644))
}

// proc adds process pid in namespace ns with table mountinfo and links
// (name: "cwd", "fd/3", "map_files/7f00-7f10", ...; a missing cwd or
// root is a vanished one). Without cwd, root and exe given, they are on
// the root filesystem (8:1, mount 1).
func (f *fakeProc) proc(pid, ns, mountinfo string, links map[string]string) {
	f.t.Helper()
	d := filepath.Join(f.dir, pid)
	must(f.t, os.MkdirAll(filepath.Join(d, "ns"), 0o755))
	must(f.t, os.MkdirAll(filepath.Join(d, "fd"), 0o755))
	must(f.t, os.Symlink(ns, filepath.Join(d, "ns", "mnt")))
	f.write(filepath.Join(pid, "mountinfo"), mountinfo)
	if links == nil {
		links = map[string]string{"cwd": "dev=8:1 mnt=1 unique=1", "root": "dev=8:1 mnt=1 unique=1", "exe": "dev=8:1 mnt=1 unique=1"}
	}
	f.write(filepath.Join(pid, "maps"), "")
	for name, v := range links {
		f.write(filepath.Join(pid, name), v)
	}
}

// kernel is the fake statx (unique: it knows STATX_MNT_ID_UNIQUE).
func (f *fakeProc) kernel(unique bool) kernel {
	return kernel{unique: unique, ptrace: f.ptrace, statx: func(p string, u bool) (Dev, uint64, bool, error) {
		if f.onStatx != nil {
			f.onStatx(p)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return Dev{}, 0, false, err
		}
		var d Dev
		var mnt, uid uint64
		hasM, hasU := false, false
		for _, kv := range strings.Fields(string(b)) {
			k, v, _ := strings.Cut(kv, "=")
			switch k {
			case "err":
				return Dev{}, 0, false, map[string]error{"EACCES": unix.EACCES, "EPERM": unix.EPERM}[v]
			case "dev":
				must(f.t, d.UnmarshalText([]byte(v)))
			case "mnt":
				_, err := fmt.Sscan(v, &mnt)
				must(f.t, err)
				hasM = true
			case "unique":
				_, err := fmt.Sscan(v, &uid)
				must(f.t, err)
				hasU = true
			}
		}
		if u {
			return d, uid, hasU && unique, nil
		}
		return d, mnt, hasM, nil
	}}
}

func (f *fakeProc) inUse(unique bool, ds ...Detached) ([]bool, int) {
	f.t.Helper()
	used, denied, err := inUse(f.dir, ds, f.kernel(unique))
	if err != nil {
		f.t.Fatal(err)
	}
	return used, denied
}

func line(id int, d Dev, mp, fstype, src, super string) string {
	return fmt.Sprintf("%d 1 %s / %s rw - %s %s %s\n", id, d, mp, fstype, src, super)
}

// InUse's rules on a fake /proc: an overlay mounted in some namespace with
// its device and workdir is in use; a device another live mount now has
// (the kernel reuses them) is not the detached overlay's, so neither a
// mount nor a process on it counts; a process whose cwd is on the
// overlay's unique mount id counts, and without unique ids one on its
// device counts when no live mount claims the device and the tables give
// its mount no other device (a detached mount: the overlay's, or a copy);
// a lower mount copied into another namespace counts, one whose device
// another filesystem now has does not.
func TestInUseRules(t *testing.T) {
	root := Dev{8, 1}
	f := newFakeProc(t)
	// Namespace A: overlay 0:77 (workdir /w1) and an NFS lower copy 0:90;
	// 0:78 is a tmpfs now. Namespace B: the same table read twice (two
	// processes) and the root filesystem as ext4 at another id.
	f.proc("100", "mnt:[1]", line(500, Dev{0, 77}, "/nix/store", "overlay", "strata", "rw,lowerdir=/l,upperdir=/u,workdir=/w1")+
		line(501, Dev{0, 78}, "/tmp", "tmpfs", "tmpfs", "rw")+
		line(502, Dev{0, 90}, "/var/lib/strata/builder/lower/3", "nfs", "10.0.2.2:/gen/3", "ro"), nil)
	f.proc("101", "mnt:[1]", "garbage that is never read again\n", nil)
	f.proc("102", "mnt:[2]", line(600, Dev{0, 91}, "/x", "nfs", "10.0.2.2:/gen/9", "ro"), nil)
	for _, unique := range []bool{false, true} {
		for _, tc := range []struct {
			name string
			d    Detached
			want bool
		}{
			{"mounted in another namespace", Detached{Dev: Dev{0, 77}, Work: "/w1"}, true},
			{"same device, other workdir", Detached{Dev: Dev{0, 77}, Work: "/w2"}, false},
			{"device reused by a tmpfs", Detached{Dev: Dev{0, 78}, Work: "/w3"}, false},
			{"a process cwd on its device and mount", Detached{Dev: root, MountID: 1, Work: "/w4"}, true},
			{"a process cwd on its device, a mount in no table", Detached{Dev: root, MountID: 2, Work: "/w4"}, true},
			{"a process cwd on its unique mount id", Detached{Dev: root, MountID: 1, MountIDUnique: 1, Work: "/w4"}, true},
			{"lower copied into another namespace", Detached{Dev: Dev{0, 80}, Work: "/w5",
				Lowers: []DetachedLower{{Dev: Dev{0, 90}, FSType: "nfs", Source: "10.0.2.2:/gen/3"}}}, true},
			{"lower device now another mount's", Detached{Dev: Dev{0, 81}, Work: "/w6",
				Lowers: []DetachedLower{{Dev: Dev{0, 91}, FSType: "nfs", Source: "10.0.2.2:/gen/4"}}}, false},
			{"nothing", Detached{Dev: Dev{0, 82}, Work: "/w7"}, false},
		} {
			t.Run(fmt.Sprintf("%s/unique=%v", tc.name, unique), func(t *testing.T) {
				used, _ := f.inUse(unique, tc.d)
				if used[0] != tc.want {
					t.Fatalf("in use = %v, want %v", used[0], tc.want)
				}
			})
		}
	}
	// The root filesystem's device claimed by a live mount of another
	// kind: a cwd on it no longer counts for a detached overlay.
	f.proc("103", "mnt:[3]", line(700, root, "/", "ext4", "/dev/root", "rw"), nil)
	if used, _ := f.inUse(false, Detached{Dev: root, MountID: 1, Work: "/w4"}); used[0] {
		t.Fatalf("device another mount has: in use, want not")
	}
}

// The kernel hands a detached overlay's device and mount id to the next
// mount at once (lowest free number). A process on that new mount does
// not use the old overlay: with unique mount ids (6.8+) it never counts;
// without them it does not count once a mount table shows either number
// as another filesystem's, also when that mount appeared while the
// processes were read. A btrfs subvolume has a device of its own that no
// mount table shows (the hold TestGossipDiscoveryAndWake saw: a process
// of another test with a file open in a btrfs snapshot that got the old
// overlay's device).
func TestInUseNumbersReused(t *testing.T) {
	old := Detached{Dev: Dev{0, 44}, MountID: 53, MountIDUnique: 1_000_053, Work: "/w"}
	t.Run("detached mount with both numbers", func(t *testing.T) {
		f := newFakeProc(t)
		f.proc("100", "mnt:[1]", line(1, Dev{8, 1}, "/", "ext4", "/dev/root", "rw"), nil)
		f.write("100/fd/3", "dev=0:44 mnt=53 unique=1000077")
		if used, _ := f.inUse(true, old); used[0] {
			t.Fatal("a new mount with the old device and mount id counts as the old overlay")
		}
		if used, _ := f.inUse(true, old, Detached{Dev: Dev{0, 44}, MountID: 53, MountIDUnique: 1_000_077, Work: "/w2"}); used[0] || !used[1] {
			t.Fatalf("in use = %v, want [false true]", used)
		}
	})
	t.Run("btrfs subvolume with the old device", func(t *testing.T) {
		f := newFakeProc(t)
		f.proc("100", "mnt:[1]", line(56, Dev{0, 40}, "/srv", "btrfs", "/dev/loop3", "rw"), nil)
		f.write("100/fd/15", "dev=0:44 mnt=56 unique=1000056")
		for _, unique := range []bool{true, false} {
			if used, _ := f.inUse(unique, old); used[0] {
				t.Fatalf("unique=%v: a file in a btrfs subvolume with the old device counts", unique)
			}
		}
	})
	t.Run("lower file on another filesystem", func(t *testing.T) {
		// Overlayfs shows a file of a lower on another filesystem with a
		// device of its own for that layer; the mount id is the overlay's.
		f := newFakeProc(t)
		f.proc("100", "mnt:[1]", line(1, Dev{8, 1}, "/", "ext4", "/dev/root", "rw"), nil)
		f.write("100/fd/3", "dev=0:99 mnt=53 unique=1000053")
		for _, unique := range []bool{true, false} {
			if used, _ := f.inUse(unique, old); !used[0] {
				t.Fatalf("unique=%v: a lower's file open through the overlay does not count", unique)
			}
		}
	})
	t.Run("mount made during the scan", func(t *testing.T) {
		f := newFakeProc(t)
		f.proc("100", "mnt:[1]", line(1, Dev{8, 1}, "/", "ext4", "/dev/root", "rw"), nil)
		f.write("100/fd/3", "dev=0:44 mnt=53")
		if used, _ := f.inUse(false, old); !used[0] {
			t.Fatal("without unique ids, a process on the old device and mount id does not count")
		}
		f.onStatx = func(p string) {
			if strings.HasSuffix(p, "fd/3") {
				f.write("100/mountinfo", line(1, Dev{8, 1}, "/", "ext4", "/dev/root", "rw")+line(53, Dev{0, 44}, "/tmp/x", "tmpfs", "tmpfs", "rw"))
			}
		}
		if used, _ := f.inUse(false, old); used[0] {
			t.Fatal("a mount that took both numbers while the processes were read counts as the old overlay")
		}
	})
}

// A file mapped from the overlay (mmap, its descriptor closed) keeps it
// in use; so does a mapping that map_files shows on the kernel's clone of
// a lower, and one that maps shows with the upper's device (6.1) whose
// map_files link leads to the overlay's mount. Other mappings are not
// looked at.
func TestInUseMappings(t *testing.T) {
	d := Detached{Dev: Dev{0, 44}, MountID: 53, MountIDUnique: 1_000_053, Work: "/w",
		Lowers: []DetachedLower{{Dev: Dev{0, 45}, FSType: "nfs", Source: "h:/gen/1", MountIDUnique: 1_000_054}}}
	maps := func(dev string) string {
		return "55d0a000-55d0b000 r-xp 00000000 08:01 1234 /usr/bin/sleep\n" +
			"7f13867c6000-7f13867c7000 r--s 00000000 " + dev + " 9996684                    /lib/libx.so\n" +
			"7ffd1000-7ffd2000 rw-p 00000000 00:00 0 [stack]\n"
	}
	for _, unique := range []bool{true, false} {
		t.Run(fmt.Sprintf("overlay file/unique=%v", unique), func(t *testing.T) {
			f := newFakeProc(t)
			f.proc("100", "mnt:[1]", line(1, Dev{8, 1}, "/", "ext4", "/dev/root", "rw"), nil)
			f.write("100/maps", maps("00:2c"))
			f.write("100/map_files/7f13867c6000-7f13867c7000", "dev=0:44 mnt=53 unique=1000053")
			f.write("100/map_files/55d0a000-55d0b000", "err=EPERM") // never looked at
			if used, denied := f.inUse(unique, d); !used[0] || denied != 0 {
				t.Fatalf("in use = %v (denied %d), want true (0)", used[0], denied)
			}
		})
	}
	t.Run("lower clone", func(t *testing.T) {
		f := newFakeProc(t)
		f.proc("100", "mnt:[1]", line(1, Dev{8, 1}, "/", "ext4", "/dev/root", "rw"), nil)
		f.write("100/maps", maps("00:2d"))
		f.write("100/map_files/7f13867c6000-7f13867c7000", "dev=0:45 mnt=700 unique=1000700")
		if used, _ := f.inUse(true, d); !used[0] {
			t.Fatal("a mapping on the kernel's clone of a lower does not count")
		}
	})
	// 6.1: maps shows a mapped file of the upper with the upper's device
	// (here a btrfs subvolume's directory: stat says 0:99, maps and the
	// table the filesystem's 0:50), map_files leads to the overlay's
	// mount (legacy id 53).
	upper := func(t *testing.T, f *fakeProc, link string) Detached {
		f.proc("100", "mnt:[1]", line(1, Dev{8, 1}, "/", "ext4", "/dev/root", "rw")+
			line(20, Dev{0, 50}, "/var", "btrfs", "/dev/vdb", "rw,subvol=/var"), nil)
		f.write("100/maps", maps("00:32"))
		f.write("100/map_files/7f13867c6000-7f13867c7000", link)
		f.write("work", "dev=0:99 mnt=20")
		u := d
		u.MountIDUnique, u.Work = 0, filepath.Join(f.dir, "work")
		return u
	}
	t.Run("upper file, layer's device in maps", func(t *testing.T) {
		f := newFakeProc(t)
		if used, _ := f.inUse(false, upper(t, f, "dev=0:50 mnt=53")); !used[0] {
			t.Fatal("a mapped file of the upper, shown with the upper's device, does not count")
		}
	})
	t.Run("another file of the upper's filesystem", func(t *testing.T) {
		f := newFakeProc(t)
		if used, _ := f.inUse(false, upper(t, f, "dev=0:50 mnt=20")); used[0] {
			t.Fatal("a mapping of another file on the upper's filesystem counts")
		}
	})
	t.Run("another file", func(t *testing.T) {
		f := newFakeProc(t)
		f.proc("100", "mnt:[1]", line(1, Dev{8, 1}, "/", "ext4", "/dev/root", "rw"), nil)
		f.write("100/maps", maps("08:01"))
		if used, _ := f.inUse(true, d); used[0] {
			t.Fatal("a mapping of another filesystem counts")
		}
	})
}

// A process that may not be inspected counts as using every detached
// overlay when the caller lacks CAP_SYS_PTRACE; with it, one still
// refused (a supervisor no capability passes) is reported, not counted. A
// process that vanished while being read is skipped; one whose main
// thread exited is read through its other threads.
func TestInUseUninspectable(t *testing.T) {
	ds := []Detached{{Dev: Dev{0, 44}, MountID: 53, MountIDUnique: 1_000_053, Work: "/w"}, {Dev: Dev{0, 46}, MountID: 54, Work: "/w2"}}
	store := line(1, Dev{8, 1}, "/", "ext4", "/dev/root", "rw") + line(60, Dev{0, 50}, "/nix/store", "overlay", "strata", "rw,lowerdir=/l,upperdir=/u,workdir=/w9")
	denied := map[string]string{"cwd": "err=EACCES", "root": "err=EACCES", "exe": "err=EACCES"}
	t.Run("without CAP_SYS_PTRACE", func(t *testing.T) {
		f := newFakeProc(t)
		f.proc("100", "mnt:[1]", store, nil)
		f.proc("200", "mnt:[1]", store, denied)
		if used, n := f.inUse(true, ds...); !used[0] || !used[1] || n != 1 {
			t.Fatalf("in use = %v, denied %d; want [true true], 1", used, n)
		}
	})
	t.Run("with CAP_SYS_PTRACE", func(t *testing.T) {
		f := newFakeProc(t)
		f.ptrace = true
		f.proc("1", "mnt:[1]", store, denied)
		f.proc("100", "mnt:[1]", store, nil)
		if used, n := f.inUse(true, ds...); used[0] || used[1] || n != 1 {
			t.Fatalf("in use = %v, denied %d; want [false false], 1", used, n)
		}
	})
	t.Run("unreadable maps", func(t *testing.T) {
		f := newFakeProc(t)
		f.proc("100", "mnt:[1]", store, nil)
		must(t, os.Remove(filepath.Join(f.dir, "100", "maps")))
		must(t, os.Mkdir(filepath.Join(f.dir, "100", "maps"), 0o755)) // reading it fails: EISDIR
		if _, _, err := inUse(f.dir, ds, f.kernel(true)); err == nil || !errors.Is(err, unix.EISDIR) {
			t.Fatalf("unreadable maps: err %v, want EISDIR", err)
		}
	})
	t.Run("vanished", func(t *testing.T) {
		f := newFakeProc(t)
		f.proc("100", "mnt:[1]", store, nil)
		f.proc("300", "mnt:[1]", store, map[string]string{})
		must(t, os.Remove(filepath.Join(f.dir, "300", "maps")))
		must(t, os.Remove(filepath.Join(f.dir, "300", "fd")))
		if used, n := f.inUse(true, ds...); used[0] || used[1] || n != 0 {
			t.Fatalf("in use = %v, denied %d; want [false false], 0", used, n)
		}
	})
	t.Run("main thread exited", func(t *testing.T) {
		f := newFakeProc(t)
		f.proc("100", "mnt:[1]", store, nil)
		f.proc("400", "mnt:[1]", store, map[string]string{"task/401/cwd": "dev=0:44 mnt=53 unique=1000053"})
		f.write("400/task/400/stat", "")
		if used, _ := f.inUse(true, ds...); !used[0] || used[1] {
			t.Fatalf("in use = %v, want [true false]", used)
		}
	})
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
