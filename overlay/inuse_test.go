package overlay

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// InUse's rules on a fake /proc: an overlay mounted in some namespace with
// its device and workdir is in use; a device another live mount now has
// (the kernel reuses them) is not the detached overlay's, so neither a
// mount nor a process on it counts; a process whose cwd is on a device no
// live mount claims counts; a lower mount copied into another namespace
// counts, one whose device another filesystem now has does not.
func TestInUseRules(t *testing.T) {
	var st unix.Stat_t
	if err := unix.Stat("/", &st); err != nil {
		t.Fatal(err)
	}
	root := Dev{unix.Major(st.Dev), unix.Minor(st.Dev)}
	proc := t.TempDir()
	mkproc := func(pid, ns, mountinfo string) {
		d := filepath.Join(proc, pid)
		for _, sub := range []string{"ns", "fd"} {
			if err := os.MkdirAll(filepath.Join(d, sub), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		must(t, os.Symlink(ns, filepath.Join(d, "ns", "mnt")))
		must(t, os.WriteFile(filepath.Join(d, "mountinfo"), []byte(mountinfo), 0o644))
		for _, l := range []string{"cwd", "root", "exe"} {
			must(t, os.Symlink("/", filepath.Join(d, l)))
		}
	}
	line := func(id int, d Dev, mp, fstype, src, super string) string {
		return fmt.Sprintf("%d 1 %s / %s rw - %s %s %s\n", id, d, mp, fstype, src, super)
	}
	// Namespace A: overlay 0:77 (workdir /w1) and an NFS lower copy 0:90;
	// 0:78 is a tmpfs now. Namespace B: the same table read twice (two
	// processes) and the root filesystem as ext4 at another id.
	mkproc("100", "mnt:[1]", line(500, Dev{0, 77}, "/nix/store", "overlay", "strata", "rw,lowerdir=/l,upperdir=/u,workdir=/w1")+
		line(501, Dev{0, 78}, "/tmp", "tmpfs", "tmpfs", "rw")+
		line(502, Dev{0, 90}, "/var/lib/strata/builder/lower/3", "nfs", "10.0.2.2:/gen/3", "ro"))
	mkproc("101", "mnt:[1]", "garbage that is never read again\n")
	mkproc("102", "mnt:[2]", line(600, Dev{0, 91}, "/x", "nfs", "10.0.2.2:/gen/9", "ro"))
	for _, tc := range []struct {
		name string
		d    Detached
		want bool
	}{
		{"mounted in another namespace", Detached{Dev: Dev{0, 77}, Work: "/w1"}, true},
		{"same device, other workdir", Detached{Dev: Dev{0, 77}, Work: "/w2"}, false},
		{"device reused by a tmpfs", Detached{Dev: Dev{0, 78}, Work: "/w3"}, false},
		{"a process cwd on its device", Detached{Dev: root, Work: "/w4"}, true},
		{"lower copied into another namespace", Detached{Dev: Dev{0, 80}, Work: "/w5",
			Lowers: []DetachedLower{{Dev: Dev{0, 90}, FSType: "nfs", Source: "10.0.2.2:/gen/3"}}}, true},
		{"lower device now another mount's", Detached{Dev: Dev{0, 81}, Work: "/w6",
			Lowers: []DetachedLower{{Dev: Dev{0, 91}, FSType: "nfs", Source: "10.0.2.2:/gen/4"}}}, false},
		{"nothing", Detached{Dev: Dev{0, 82}, Work: "/w7"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			used, _, err := inUse(proc, []Detached{tc.d})
			if err != nil {
				t.Fatal(err)
			}
			if used[0] != tc.want {
				t.Fatalf("in use = %v, want %v", used[0], tc.want)
			}
		})
	}
	// The root filesystem's device claimed by a live mount of another
	// kind: a cwd on it no longer counts for a detached overlay.
	mkproc("103", "mnt:[3]", line(700, root, "/", "ext4", "/dev/root", "rw"))
	used, _, err := inUse(proc, []Detached{{Dev: root, Work: "/w4"}})
	if err != nil || used[0] {
		t.Fatalf("device another mount has: in use = %v (%v), want false", used, err)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
