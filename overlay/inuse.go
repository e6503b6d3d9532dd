package overlay

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

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
// mounts), or a process whose working directory, root, executable, open
// file or mapped file is on it. Take it from the mount table while the
// overlay is still mounted (before the swap), with IdentityOf.
type Detached struct {
	// Dev is its superblock's device and MountID its mount's id in the
	// namespace it was detached from. The kernel gives both to another
	// mount once this one is gone, at once (it hands out the lowest free
	// number).
	Dev     Dev `json:"dev"`
	MountID int `json:"mount_id"`
	// MountIDUnique is its mount's 64-bit id (statx STATX_MNT_ID_UNIQUE,
	// Linux 6.8+), which the kernel never gives to another mount until
	// it reboots; 0 on older kernels (see InUse).
	MountIDUnique uint64 `json:"mount_id_unique,omitempty"`
	// Work is its workdir: with Dev it identifies the overlay in another
	// namespace's mount table.
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
	// MountIDUnique is the lower mount's 64-bit id (0: unknown).
	MountIDUnique uint64 `json:"mount_id_unique,omitempty"`
}

// IdentityOf returns the 64-bit unique id (STATX_MNT_ID_UNIQUE) of the
// mount at path, which must be m, the top mount there (same mount id and
// device), or 0 when the kernel (before 6.8) has none. It never asks a
// server (AT_STATX_DONT_SYNC).
func IdentityOf(path string, m mountinfo.Mount) (uint64, error) {
	same := func() error {
		dev, id, ok, err := statxMnt(path, false)
		if err != nil {
			return fmt.Errorf("identify mount %s: %w", path, err)
		}
		if dev != DevOf(m) || (ok && int(id) != m.ID) {
			return fmt.Errorf("identify mount %s: it is mount %d on %s now, not mount %d on %s", path, id, dev, m.ID, DevOf(m))
		}
		return nil
	}
	if err := same(); err != nil {
		return 0, err
	}
	_, u, ok, err := statxMnt(path, true)
	if err != nil {
		return 0, fmt.Errorf("identify mount %s: %w", path, err)
	}
	if !ok {
		return 0, nil
	}
	// Still the same mount after the second call.
	if err := same(); err != nil {
		return 0, err
	}
	return u, nil
}

// maxScanned bounds the work of one InUse call: the directory entries
// (processes, their open files and the mappings worth a look) it looks
// at. Past it, InUse gives up with an error and the caller keeps what it
// holds.
const maxScanned = 4 << 20

// InUse reports, for each overlay in ds, whether any process on the
// machine still uses it or one of its lowers. It reads /proc: the mount
// table of each mount namespace (/proc/<pid>/ns/mnt, one
// /proc/<pid>/mountinfo per distinct namespace), then each process's cwd,
// root, exe, open files and mapped files (statx with AT_STATX_DONT_SYNC:
// never a call to a server; /proc/<pid>/maps, and /proc/<pid>/map_files
// for a mapping whose device is an overlay's, a listed lower's or that of
// the filesystem of an overlay's workdir, which holds its upper: some
// kernels, 6.1 among them, show a mapped file of an overlay with its
// layer's device).
//
// An overlay is in use when a mount table has it (its device with its
// workdir) or one of its lowers (device, type and source), or when a
// process's cwd, root, exe, open file or mapping (mmap, with or without
// a descriptor left) is on it or on one of its lowers. Which mount a
// process is on is decided by the mount's unique id where the kernel has
// one (6.8+) and Detached has it: it is never reused, so a mount made
// after this one went, with its old device and mount id, does not count.
// Without it (older kernels, or a Detached recorded by one) a process
// counts when it is on the overlay's mount id or device (a file of a
// lower on another filesystem shows a device of the overlay's own for
// that layer, not the overlay's), no mount table gives that device to
// another filesystem nor the process's mount id to another device (a
// btrfs subvolume has a device of its own, on a mount the tables show
// with the filesystem's device), and a second reading of the tables after
// the scan confirms both. A mapping
// whose map_files link leads to the kernel's private clone of a lower
// rather than to the overlay (kernels differ in what they show) counts by
// the lower's device when no mount table gives that device to another
// filesystem.
//
// A process the caller may not inspect (its cwd, root, exe, fd or maps
// answer EACCES or EPERM) could be using any of them. Without
// CAP_SYS_PTRACE (needed for other users' processes: build users) each
// overlay then counts as in use. With it, a process still refused is
// protected beyond anything the caller could be granted (a security
// module, a VM or container supervisor) and is not counted. Either way
// denied is the number of such processes, for the caller to log.
// A process that exits while InUse runs
// (its /proc entry or links vanish) is skipped: by then it released its
// files, directories and mappings. A process whose main thread exited
// while others run is read through those threads (/proc/<pid>/task: cwd,
// root, open files; its mappings are not seen then).
//
// Not seen: a copy of the overlay's mount that is in no mount namespace
// with a process in it (a namespace kept only by a bind of its nsfs file,
// a detached clone held by a descriptor), files in flight in a unix
// socket, a loop device backed by a file on it, and threads with a cwd or file
// table of their own (unshare CLONE_FS or CLONE_FILES), and, on kernels
// that show a mapped file with its layer's device (6.1), a mapping of a
// file of an unlisted lower on another filesystem than the upper's. On
// kernels before 6.8, a detached mount of another filesystem that got the
// overlay's device (a new mount a process holds after it was unmounted)
// counts as the overlay: a false hold, until it goes.
// An error (no /proc, more than 4 Mi entries) means the answer is unknown:
// keep holding.
func InUse(ds []Detached) (used []bool, denied int, err error) {
	return inUse("/proc", ds, realKernel())
}

// kernel is what inUse asks of the kernel besides reading /proc; tests
// fake it.
type kernel struct {
	// unique: statx knows STATX_MNT_ID_UNIQUE.
	unique bool
	// statx returns the device and mount id (the unique one, or the
	// legacy one) of what the /proc magic link p points at; ok is false
	// when the kernel did not say.
	statx func(p string, unique bool) (dev Dev, mnt uint64, ok bool, err error)
	// ptrace: the caller has CAP_SYS_PTRACE.
	ptrace bool
}

var realKernel = sync.OnceValue(func() kernel {
	_, _, ok, err := statxMnt("/", true)
	return kernel{unique: err == nil && ok, statx: statxMnt, ptrace: hasPtrace()}
})

// hasPtrace reports whether this process has CAP_SYS_PTRACE in its
// effective set.
func hasPtrace() bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false
	}
	return data[unix.CAP_SYS_PTRACE/32].Effective&(1<<(unix.CAP_SYS_PTRACE%32)) != 0
}

// ident is a mount as a mount table shows it.
type ident struct{ fstype, source, work string }

// tables are the mounts of every mount namespace: the identities each
// device has, and the device each mount id has.
type tables struct {
	devs map[Dev][]ident
	ids  map[int]Dev
}

// readTables reads the mount table of each distinct mount namespace of
// pids.
func readTables(proc string, pids []string) (tables, error) {
	t := tables{devs: map[Dev][]ident{}, ids: map[int]Dev{}}
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
			return t, fmt.Errorf("detached overlays in use: %w", rerr)
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
			return t, fmt.Errorf("detached overlays in use: %s: %w", filepath.Join(proc, pid, "mountinfo"), err)
		}
		for _, m := range ms {
			id := ident{fstype: m.FSType, source: m.Source}
			if m.FSType == "overlay" {
				id.work, _ = m.Option("workdir")
				id.work = filepath.Clean(id.work)
			}
			d := DevOf(m)
			t.devs[d] = append(t.devs[d], id)
			t.ids[m.ID] = d
		}
	}
	return t, nil
}

// ownMount reports whether a link on device dev whose mount id is mnt
// (hasMnt: the kernel said) may be on a mount of the overlay with that
// device: the tables give that mount id no other device. A mount in no
// table is a detached one: the overlay's own or a copy of it, or (kernels
// before 6.8 cannot tell) another filesystem's that took the device.
func ownMount(t tables, mnt uint64, hasMnt bool, dev Dev) bool {
	if !hasMnt {
		return true
	}
	d, ok := t.ids[int(mnt)]
	return !ok || d == dev
}

// mark is what InUse looks for of one detached overlay, from the mount
// tables.
type mark struct {
	// dead: its device is another superblock's now, so the overlay is
	// gone (two live superblocks never share a device).
	dead bool
	// lowers: lower devices that no table gives to another filesystem.
	lowers map[Dev]bool
}

// marks compares ds with the tables: used[i] is set for an overlay or
// lower a table has.
func marks(t tables, ds []Detached, used []bool) []mark {
	mks := make([]mark, len(ds))
	for i, d := range ds {
		mk := mark{lowers: map[Dev]bool{}}
		for _, id := range t.devs[d.Dev] {
			if id.fstype == "overlay" && id.work == filepath.Clean(d.Work) {
				used[i] = true // mounted in some namespace
			} else {
				mk.dead = true
			}
		}
		for _, l := range d.Lowers {
			own := true
			for _, id := range t.devs[l.Dev] {
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
		mks[i] = mk
	}
	return mks
}

func inUse(proc string, ds []Detached, k kernel) ([]bool, int, error) {
	if len(ds) == 0 {
		return []bool{}, 0, nil
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
	t, err := readTables(proc, pids)
	if err != nil {
		return nil, 0, err
	}
	// strong: in use for sure (a mount table has it, or a process is on
	// its mount by unique id).
	strong := make([]bool, len(ds))
	mks := marks(t, ds, strong)
	all := func() bool {
		for _, u := range strong {
			if !u {
				return false
			}
		}
		return true
	}
	if all() {
		return strong, 0, nil
	}
	// What a link is compared with: the unique ids where both the kernel
	// and the record have them, else the legacy ids and devices.
	byUnique := make([]bool, len(ds))
	wantUnique, wantLegacy := false, false
	for i, d := range ds {
		byUnique[i] = k.unique && d.MountIDUnique != 0
		wantUnique = wantUnique || byUnique[i]
		wantLegacy = wantLegacy || !byUnique[i]
	}
	// Devices whose mappings are worth a map_files look: the overlay's,
	// its listed lowers', and its upper's. Some kernels (6.1; not 6.12)
	// show a mapped file of an overlay in /proc/<pid>/maps with the device
	// and inode of the layer's file (its map_files link still leads to
	// the overlay's mount), so a file of the upper shows the upper's
	// device.
	mapDevs := map[Dev]bool{}
	for i, d := range ds {
		if !mks[i].dead {
			mapDevs[d.Dev] = true
			if dev, ok := filesystemOf(t, k, d.Work); ok {
				mapDevs[dev] = true
			}
		}
		for _, l := range d.Lowers {
			mapDevs[l.Dev] = true
		}
	}
	// Pass 2: the processes. weakOver, weakLow: a use by device and legacy
	// id, or by a lower's device, to be confirmed by the tables read again
	// (a mount made meanwhile may have taken the numbers).
	weakOver := make([]bool, len(ds))
	overMnt, overHasMnt := make([]uint64, len(ds)), make([]bool, len(ds))
	weakLow := make([]map[Dev]bool, len(ds))
	type link struct {
		dev            Dev
		unique, legacy uint64
		hasU, hasL     bool
	}
	match := func(l link, mapping bool) {
		for i, d := range ds {
			if strong[i] {
				continue
			}
			mk := mks[i]
			switch {
			case byUnique[i] && l.hasU && (l.unique == d.MountIDUnique || slices.ContainsFunc(d.Lowers, func(x DetachedLower) bool {
				return x.MountIDUnique != 0 && x.MountIDUnique == l.unique
			})):
				strong[i] = true
			case !byUnique[i] && !mk.dead && ((l.hasL && int(l.legacy) == d.MountID) || l.dev == d.Dev) && ownMount(t, l.legacy, l.hasL, d.Dev):
				weakOver[i], overMnt[i], overHasMnt[i] = true, l.legacy, l.hasL
			case (mapping || !byUnique[i]) && mk.lowers[l.dev]:
				if weakLow[i] == nil {
					weakLow[i] = map[Dev]bool{}
				}
				weakLow[i][l.dev] = true
			}
		}
	}
	// look stats one /proc link; fdinfo is its fdinfo file for the
	// legacy mount id on kernels without STATX_MNT_ID.
	look := func(p, fdinfo string, mapping bool) error {
		var l link
		var err error
		if wantUnique {
			l.dev, l.unique, l.hasU, err = k.statx(p, true)
			if err != nil {
				return err
			}
		}
		if wantLegacy {
			l.dev, l.legacy, l.hasL, err = k.statx(p, false)
			if err != nil {
				return err
			}
			if !l.hasL && fdinfo != "" {
				var n int
				n, l.hasL = fdinfoMnt(fdinfo)
				l.legacy = uint64(n)
			}
		}
		match(l, mapping)
		return nil
	}
	scanned, refused := 0, 0
	var mapsBuf []byte
	// inspect reads one task's links: dir is /proc/<pid> or
	// /proc/<pid>/task/<tid>. leaderGone: its cwd and root are gone
	// while the process is still there.
	inspect := func(dir string) (refusedHere, leaderGone bool, err error) {
		note := func(err error) {
			if denied(err) {
				refusedHere = true
			}
		}
		nolink := 0
		for _, l := range []string{"cwd", "root", "exe"} {
			if err := look(filepath.Join(dir, l), "", false); err != nil {
				note(err)
				if gone(err) && l != "exe" {
					nolink++
				}
			}
		}
		fdDir := filepath.Join(dir, "fd")
		fds, err := os.ReadDir(fdDir)
		if err != nil {
			if denied(err) {
				refusedHere = true
			} else if !gone(err) {
				return false, false, fmt.Errorf("detached overlays in use: %w", err)
			}
		}
		scanned += 1 + len(fds)
		if scanned > maxScanned {
			return false, false, errTooMany
		}
		for _, fd := range fds {
			if err := look(filepath.Join(fdDir, fd.Name()), filepath.Join(dir, "fdinfo", fd.Name()), false); err != nil {
				note(err) // gone: closed meanwhile
			}
		}
		ms, err := mappings(filepath.Join(dir, "maps"), mapDevs, &mapsBuf)
		if err != nil {
			if denied(err) {
				refusedHere = true
			} else if !gone(err) {
				return false, false, fmt.Errorf("detached overlays in use: %w", err)
			}
		}
		scanned += len(ms)
		if scanned > maxScanned {
			return false, false, errTooMany
		}
		for _, m := range ms {
			if err := look(filepath.Join(dir, "map_files", m), "", true); err != nil {
				note(err) // gone: unmapped meanwhile
			}
		}
		return refusedHere, nolink == 2, nil
	}
	for _, pid := range pids {
		refusedHere, leaderGone, err := inspect(filepath.Join(proc, pid))
		if err != nil {
			return nil, 0, err
		}
		if leaderGone {
			// A main thread that exited leaves the process's cwd, root,
			// fds and maps unreadable through /proc/<pid>; the threads
			// still running have them.
			tids, _ := os.ReadDir(filepath.Join(proc, pid, "task"))
			for _, tid := range tids {
				if tid.Name() == pid {
					continue
				}
				r, _, err := inspect(filepath.Join(proc, pid, "task", tid.Name()))
				if err != nil {
					return nil, 0, err
				}
				refusedHere = refusedHere || r
			}
		}
		if refusedHere {
			refused++
		}
		if all() {
			break
		}
	}
	// Uses found by device and legacy mount id, or by a lower's device,
	// only: each stands when the tables read again still give neither
	// number to another filesystem.
	used := strong
	for i := range ds {
		if !strong[i] && (weakOver[i] || len(weakLow[i]) > 0) {
			t2, err := readTables(proc, pids)
			if err != nil {
				return nil, 0, err
			}
			again := make([]bool, len(ds))
			mks2 := marks(t2, ds, again)
			for i, d := range ds {
				if strong[i] {
					continue
				}
				used[i] = again[i]
				if weakOver[i] {
					used[i] = used[i] || (!mks2[i].dead && ownMount(t2, overMnt[i], overHasMnt[i], d.Dev))
				}
				for l := range weakLow[i] {
					used[i] = used[i] || mks2[i].lowers[l]
				}
			}
			break
		}
	}
	if refused > 0 && !k.ptrace {
		for i := range used {
			used[i] = true
		}
	}
	return used, refused, nil
}

// filesystemOf returns the device /proc/<pid>/maps shows for files of
// the filesystem holding dir (an overlay's workdir, which overlayfs wants
// on its upper's filesystem): its mount's device in the tables, which is
// the superblock's (a btrfs subvolume's st_dev is one of its own), or
// dir's st_dev when the tables do not have its mount. ok is false when
// dir cannot be looked up (removed): its mappings are then not looked at.
func filesystemOf(t tables, k kernel, dir string) (Dev, bool) {
	dev, mnt, ok, err := k.statx(dir, false)
	if err != nil {
		return Dev{}, false
	}
	if d, in := t.ids[int(mnt)]; ok && in {
		return d, true
	}
	return dev, true
}

var errTooMany = fmt.Errorf("detached overlays in use: more than %d processes, open files and mappings to look at", maxScanned)

// statxMnt returns the device and mount id of what path points at (the
// unique id with unique, Linux 6.8+; else the legacy one, Linux 5.8+),
// without asking any server for fresh attributes; ok is false when the
// kernel did not give the id asked for.
func statxMnt(path string, unique bool) (Dev, uint64, bool, error) {
	mask := unix.STATX_MNT_ID
	if unique {
		mask = unix.STATX_MNT_ID_UNIQUE
	}
	var st unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, path, unix.AT_STATX_DONT_SYNC, mask, &st); err != nil {
		return Dev{}, 0, false, err
	}
	return Dev{st.Dev_major, st.Dev_minor}, st.Mnt_id, st.Mask&uint32(mask) != 0, nil
}

// mappings returns the /proc/<pid>/map_files names ("start-end", hex) of
// the file mappings in the maps file p whose device is in devs, one per
// file. buf is reused between calls.
func mappings(p string, devs map[Dev]bool, buf *[]byte) ([]string, error) {
	b, err := readAll(p, buf)
	if err != nil {
		return nil, err
	}
	type file struct {
		dev Dev
		ino string
	}
	seen := map[file]bool{}
	var out []string
	for line := range bytes.Lines(b) {
		// start-end perms offset major:minor inode path
		var f [5][]byte
		rest := line
		n := 0
		for ; n < 5; n++ {
			rest = bytes.TrimLeft(rest, " ")
			var ok bool
			if f[n], rest, ok = bytes.Cut(rest, []byte(" ")); !ok {
				f[n] = bytes.TrimRight(f[n], "\n")
				n++
				break
			}
		}
		if n < 5 || string(f[4]) == "0" {
			continue
		}
		ma, mi, ok := bytes.Cut(f[3], []byte(":"))
		x, err1 := strconv.ParseUint(string(ma), 16, 32)
		y, err2 := strconv.ParseUint(string(mi), 16, 32)
		if !ok || err1 != nil || err2 != nil {
			return nil, fmt.Errorf("%s: device %q: want hex major:minor", p, f[3])
		}
		fl := file{Dev{uint32(x), uint32(y)}, ""}
		if !devs[fl.dev] {
			continue
		}
		fl.ino = string(f[4])
		if seen[fl] {
			continue
		}
		seen[fl] = true
		lo, hi, ok := bytes.Cut(f[0], []byte("-"))
		s, err1 := strconv.ParseUint(string(lo), 16, 64)
		e, err2 := strconv.ParseUint(string(hi), 16, 64)
		if !ok || err1 != nil || err2 != nil {
			return nil, fmt.Errorf("%s: range %q: want hex start-end", p, f[0])
		}
		out = append(out, fmt.Sprintf("%x-%x", s, e))
	}
	return out, nil
}

// readAll reads the /proc file p into *buf (grown as needed) and returns
// the bytes read.
func readAll(p string, buf *[]byte) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if len(*buf) == 0 {
		*buf = make([]byte, 64<<10)
	}
	n := 0
	for {
		if n == len(*buf) {
			*buf = append(*buf, make([]byte, len(*buf))...)
		}
		m, err := f.Read((*buf)[n:])
		n += m
		if err == io.EOF || (err == nil && m == 0) {
			return (*buf)[:n], nil
		}
		if err != nil {
			return nil, err
		}
	}
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
