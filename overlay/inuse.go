package overlay

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/mountinfo"
)

// Dev is a device number as mountinfo prints it ("major:minor"): the
// st_dev of a superblock.
type Dev struct{ Major, Minor uint32 }

// String is "major:minor".
func (d Dev) String() string { return fmt.Sprintf("%d:%d", d.Major, d.Minor) }

// MarshalText writes String.
func (d Dev) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// UnmarshalText reads "major:minor".
func (d *Dev) UnmarshalText(b []byte) error {
	ma, mi, ok := strings.Cut(string(b), ":")
	x, err1 := strconv.ParseUint(ma, 10, 32)
	y, err2 := strconv.ParseUint(mi, 10, 32)
	if !ok || err1 != nil || err2 != nil {
		return fmt.Errorf("device %q: want major:minor", b)
	}
	*d = Dev{uint32(x), uint32(y)}
	return nil
}

// IsZero reports whether d is unset.
func (d Dev) IsZero() bool { return d == Dev{} }

// DevOf returns m's device.
func DevOf(m mountinfo.Mount) Dev { return Dev{m.Major, m.Minor} }

// Detached identifies an overlay a swap detached (Swap, Detach), which
// lives on, in the kernel, for as long as anything still uses it: a copy
// of it in another mount namespace (a Nix sandbox, a service with private
// mounts), or a process whose working directory, root, executable or open
// file is on it. Take it from the mount table while the overlay is still
// mounted (before the swap).
type Detached struct {
	// Dev is its superblock's device and MountID its mount's id in the
	// namespace it was detached from.
	Dev     Dev `json:"dev"`
	MountID int `json:"mount_id"`
	// Work is its workdir: with Dev it identifies the overlay in another
	// namespace's mount table (a device number alone is reused once its
	// superblock is gone).
	Work string `json:"work"`
	// Lowers are the devices of the lower mounts that only this overlay
	// uses once it is detached, with their filesystem type and source
	// (an NFS mount of a generation: "nfs", "host:/gen/7"); a lower whose
	// filesystem others use (a bind of a local directory) must not be
	// listed, or every process on that filesystem would count.
	Lowers []DetachedLower `json:"lowers,omitempty"`
}

// DetachedLower is one lower mount of a Detached overlay.
type DetachedLower struct {
	Dev    Dev    `json:"dev"`
	FSType string `json:"fstype"`
	Source string `json:"source"`
}

// maxScanned bounds the work of one InUse call: the directory entries
// (processes and their open files) it looks at. Past it, InUse gives up with
// an error and the caller keeps what it holds.
const maxScanned = 4 << 20

// InUse reports, for each overlay in ds, whether any process on the
// machine still uses it or one of its lowers. It reads /proc once: the
// mount table of each mount namespace (/proc/<pid>/ns/mnt, one
// /proc/<pid>/mountinfo per distinct namespace), then each process's cwd,
// root, exe and open files (statx with AT_STATX_DONT_SYNC: never a call
// to a server; fdinfo's mnt_id on kernels without STATX_MNT_ID). A
// process counts when one of those is on the overlay's device or mount,
// or on a lower's device; a device or mount id that another live mount
// now has (the kernel reuses both) does not count. Not seen: a file of
// the overlay that a process has only mapped (mmap) and has no descriptor,
// directory or mount of left. Processes that exit while it runs are
// skipped. Denied is the number of processes whose cwd, root, exe or
// open files the caller may not inspect (it needs CAP_SYS_PTRACE for
// processes of other users): their mount namespaces are still read, the
// rest of them is not seen. An error (no /proc, more than 4 Mi entries)
// means the answer is unknown: keep holding.
func InUse(ds []Detached) (used []bool, denied int, err error) { return inUse("/proc", ds) }

func inUse(proc string, ds []Detached) ([]bool, int, error) {
	used := make([]bool, len(ds))
	if len(ds) == 0 {
		return used, 0, nil
	}
	ents, err := os.ReadDir(proc)
	if err != nil {
		return nil, 0, fmt.Errorf("detached overlays in use: %w", err)
	}
	var pids []string
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err == nil {
			pids = append(pids, e.Name())
		}
	}
	// Pass 1: every mount namespace's table. devs: the identity of every
	// live mount's device; ids: the device of every live mount id.
	type ident struct{ fstype, source, work string }
	devs := map[Dev][]ident{}
	ids := map[int]Dev{}
	seen := map[string]bool{}
	for _, pid := range pids {
		// The namespace's identity; a process that may not be inspected
		// has its mount table read all the same (mountinfo is readable by
		// all), keyed by its content.
		ns, err := os.Readlink(filepath.Join(proc, pid, "ns", "mnt"))
		if gone(err) {
			continue
		}
		if err == nil && seen[ns] {
			continue
		}
		b, rerr := os.ReadFile(filepath.Join(proc, pid, "mountinfo"))
		if rerr != nil {
			if gone(rerr) || denied(rerr) {
				continue
			}
			return nil, 0, fmt.Errorf("detached overlays in use: %w", rerr)
		}
		if err != nil {
			ns = "content:" + string(b)
			if seen[ns] {
				continue
			}
		}
		seen[ns] = true
		ms, err := mountinfo.Parse(bytes.NewReader(b))
		if err != nil {
			return nil, 0, fmt.Errorf("detached overlays in use: %s: %w", filepath.Join(proc, pid, "mountinfo"), err)
		}
		for _, m := range ms {
			id := ident{fstype: m.FSType, source: m.Source}
			if m.FSType == "overlay" {
				id.work, _ = m.Option("workdir")
				id.work = filepath.Clean(id.work)
			}
			d := DevOf(m)
			devs[d] = append(devs[d], id)
			ids[m.ID] = d
		}
	}
	// What each detached overlay still is: a mount in some namespace
	// (in use), or devices and ids that are its own (nothing else has them
	// now) to look for in the processes.
	type mark struct {
		dev    bool         // its device is still its own
		ids    map[int]bool // mount ids that are its own
		lowers map[Dev]bool // lower devices still its own
	}
	marks := make([]mark, len(ds))
	for i, d := range ds {
		mk := mark{ids: map[int]bool{}, lowers: map[Dev]bool{}}
		mk.dev = true
		for _, id := range devs[d.Dev] {
			if id.fstype == "overlay" && id.work == filepath.Clean(d.Work) {
				used[i] = true // mounted in some namespace
			} else {
				mk.dev = false // the device is another superblock's now
			}
		}
		if d.MountID != 0 {
			if dev, ok := ids[d.MountID]; !ok || dev == d.Dev {
				mk.ids[d.MountID] = true
			}
		}
		for _, l := range d.Lowers {
			own := true
			for _, id := range devs[l.Dev] {
				if id.fstype == l.FSType && id.source == l.Source {
					used[i] = true // a copy of the lower's mount somewhere
				} else {
					own = false
				}
			}
			if own {
				mk.lowers[l.Dev] = true
			}
		}
		marks[i] = mk
	}
	for id, dev := range ids {
		for i, d := range ds {
			if dev == d.Dev && marks[i].dev {
				marks[i].ids[id] = true // its mount in another namespace
			}
		}
	}
	all := func() bool {
		for _, u := range used {
			if !u {
				return false
			}
		}
		return true
	}
	if all() {
		return used, 0, nil
	}
	// Pass 2: the processes.
	scanned, refused := 0, 0
	hit := func(dev Dev, mnt int, hasMnt bool) {
		for i := range ds {
			if used[i] {
				continue
			}
			mk := marks[i]
			if (mk.dev && dev == ds[i].Dev) || (hasMnt && mk.ids[mnt]) || mk.lowers[dev] {
				used[i] = true
			}
		}
	}
	for _, pid := range pids {
		refusedHere := false
		for _, l := range []string{"cwd", "root", "exe"} {
			dev, mnt, ok, err := statxDev(filepath.Join(proc, pid, l))
			if err == nil {
				hit(dev, mnt, ok)
			} else if denied(err) {
				refusedHere = true
			}
		}
		fdDir := filepath.Join(proc, pid, "fd")
		fds, err := os.ReadDir(fdDir)
		if err != nil {
			if denied(err) {
				refusedHere = true
			} else if !gone(err) {
				return nil, 0, fmt.Errorf("detached overlays in use: %w", err)
			}
		}
		if refusedHere {
			refused++
		}
		scanned += 1 + len(fds)
		if scanned > maxScanned {
			return nil, 0, fmt.Errorf("detached overlays in use: more than %d processes and open files to look at", maxScanned)
		}
		for _, fd := range fds {
			dev, mnt, ok, err := statxDev(filepath.Join(fdDir, fd.Name()))
			if err != nil {
				continue // closed meanwhile
			}
			if !ok {
				mnt, ok = fdinfoMnt(filepath.Join(proc, pid, "fdinfo", fd.Name()))
			}
			hit(dev, mnt, ok)
		}
		if all() {
			break
		}
	}
	return used, refused, nil
}

// statxDev returns the device and, when the kernel says (STATX_MNT_ID,
// Linux 5.8+), the mount id of what the /proc magic link p points at,
// without asking any server for fresh attributes.
func statxDev(p string) (Dev, int, bool, error) {
	var st unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, p, unix.AT_STATX_DONT_SYNC, unix.STATX_MNT_ID, &st); err != nil {
		return Dev{}, 0, false, err
	}
	return Dev{st.Dev_major, st.Dev_minor}, int(st.Mnt_id), st.Mask&unix.STATX_MNT_ID != 0, nil
}

// fdinfoMnt reads the mnt_id line of /proc/<pid>/fdinfo/<fd>.
func fdinfoMnt(p string) (int, bool) {
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, false
	}
	s := bufio.NewScanner(bytes.NewReader(b))
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "mnt_id:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			return n, err == nil
		}
	}
	return 0, false
}

// gone reports whether err means the process exited meanwhile.
func gone(err error) bool {
	return err != nil && (errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ESRCH) || errors.Is(err, unix.EINVAL))
}

// denied reports whether err means the caller may not inspect the process.
func denied(err error) bool {
	return errors.Is(err, fs.ErrPermission) || errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM)
}
