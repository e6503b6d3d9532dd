package overlay

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/strata-nix/strata/mountinfo"

	"golang.org/x/sys/unix"
)

// Source is what overlay mounts made by this package show as their source
// in mountinfo (field 10), so strata's mounts can be told from others.
const Source = "strata"

// Layers are the directories of one overlay mount.
type Layers struct {
	// Lower are the read-only layers, top first (e.g. the NFS mount of a
	// generation). At least one.
	Lower []string
	// Upper is the writable layer (local builds). Empty for a read-only
	// overlay, which then needs at least two lowers.
	Upper string
	// Work is overlayfs's scratch directory: empty when mounted, on the same
	// mount as Upper, never shared by two live overlays. Set exactly when
	// Upper is.
	Work string
	// Metacopy mounts with metacopy=on (which implies redirect_dir=on): a
	// change of metadata only, and a hard link (link(2) copies its source
	// up), copies a lower file's inode up without its data, which the
	// upper file keeps reading from the lower. Without it a hard link to a
	// generation file (Nix's sandbox does that for single-file inputs,
	// nix-store --optimise for every file) copies the whole file into the
	// upper. It is not compared or read back: a kernel built with metacopy
	// on by default does not show it in the mount options.
	Metacopy bool
}

// Validate checks the layer paths without touching the filesystem: all
// absolute, none containing ',', '\\', ':' or a newline, Upper and Work set
// together, Work distinct from Upper and the lowers.
func (l Layers) Validate() error {
	if len(l.Lower) == 0 {
		return errors.New("overlay layers: no lower layer")
	}
	for _, p := range l.Lower {
		if err := checkPath("lower", p, true); err != nil {
			return err
		}
	}
	if (l.Upper == "") != (l.Work == "") {
		return fmt.Errorf("overlay layers: upper %q and work %q must be set together", l.Upper, l.Work)
	}
	if l.Upper == "" {
		return nil
	}
	if err := checkPath("upper", l.Upper, false); err != nil {
		return err
	}
	if err := checkPath("work", l.Work, false); err != nil {
		return err
	}
	w := filepath.Clean(l.Work)
	if w == filepath.Clean(l.Upper) || slicesContainsClean(l.Lower, w) {
		return fmt.Errorf("overlay layers: work %q must be a directory of its own", l.Work)
	}
	return nil
}

func slicesContainsClean(list []string, p string) bool {
	for _, q := range list {
		if filepath.Clean(q) == p {
			return true
		}
	}
	return false
}

func checkPath(role, p string, lower bool) error {
	if p == "" || !filepath.IsAbs(p) {
		return fmt.Errorf("overlay layers: %s %q is not an absolute path", role, p)
	}
	bad := ",\\\n"
	if lower {
		bad += ":"
	}
	if i := strings.IndexAny(p, bad); i >= 0 {
		return fmt.Errorf("overlay layers: %s %q contains %q, which overlay mount options cannot carry", role, p, string(p[i]))
	}
	return nil
}

// String renders the layers as overlay mount data:
// "lowerdir=A:B,upperdir=U,workdir=W". Only meaningful for valid Layers.
func (l Layers) String() string {
	s := "lowerdir=" + strings.Join(l.Lower, ":")
	if l.Upper != "" {
		s += ",upperdir=" + l.Upper + ",workdir=" + l.Work
	}
	if l.Metacopy {
		s += ",metacopy=on"
	}
	return s
}

// checkOnDisk checks what the kernel would otherwise refuse with a bare
// EINVAL or ENOENT (overlayfs writes its reasons only to the kernel log):
// every layer is an existing directory, and Work is on the same mount as
// Upper.
func (l Layers) checkOnDisk() error {
	dirs := append([]string(nil), l.Lower...)
	if l.Upper != "" {
		dirs = append(dirs, l.Upper, l.Work)
	}
	for _, d := range dirs {
		var st unix.Stat_t
		if err := unix.Stat(d, &st); err != nil {
			return fmt.Errorf("overlay layer %s: %w", d, err)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			return fmt.Errorf("overlay layer %s: not a directory", d)
		}
	}
	if l.Upper == "" {
		return nil
	}
	var up, wk unix.Statx_t
	if unix.Statx(unix.AT_FDCWD, l.Upper, 0, unix.STATX_MNT_ID, &up) != nil ||
		unix.Statx(unix.AT_FDCWD, l.Work, 0, unix.STATX_MNT_ID, &wk) != nil ||
		up.Mask&unix.STATX_MNT_ID == 0 || wk.Mask&unix.STATX_MNT_ID == 0 {
		return nil // kernel before 5.8: let the mount decide
	}
	if up.Mnt_id != wk.Mnt_id {
		return fmt.Errorf("overlay workdir %s is not on the same mount as upperdir %s (mount %d vs %d)", l.Work, l.Upper, wk.Mnt_id, up.Mnt_id)
	}
	return nil
}

// newOverlay builds a detached overlay mount for l with
// fsopen/fsconfig/fsmount and returns its fd. The superblock is built (and
// the layers checked by the kernel) here, so a bad layer fails before
// anything is attached. Kernel messages about the failure are included in
// the error. It returns unix.ENOSYS (wrapped) on kernels without fsopen.
func newOverlay(l Layers) (int, error) {
	fsfd, err := unix.Fsopen("overlay", unix.FSOPEN_CLOEXEC)
	if err != nil {
		return -1, fmt.Errorf("fsopen overlay: %w", err)
	}
	defer unix.Close(fsfd)
	set := func(k, v string) error {
		if err := unix.FsconfigSetString(fsfd, k, v); err != nil {
			return fmt.Errorf("overlay option %s=%s: %w%s", k, v, err, fsLog(fsfd))
		}
		return nil
	}
	if err := set("source", Source); err != nil {
		return -1, err
	}
	if err := set("lowerdir", strings.Join(l.Lower, ":")); err != nil {
		return -1, err
	}
	if l.Upper != "" {
		if err := set("upperdir", l.Upper); err != nil {
			return -1, err
		}
		if err := set("workdir", l.Work); err != nil {
			return -1, err
		}
		// index=on (a kernel build default on some distributions) locks
		// the upper to one mount; a swap mounts the same upper twice.
		if err := set("index", "off"); err != nil {
			return -1, err
		}
	}
	if l.Metacopy {
		if err := set("metacopy", "on"); err != nil {
			return -1, err
		}
	}
	if err := unix.FsconfigCreate(fsfd); err != nil {
		return -1, fmt.Errorf("create overlay %s: %w%s", l, err, fsLog(fsfd))
	}
	mfd, err := unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("fsmount overlay %s: %w%s", l, err, fsLog(fsfd))
	}
	return mfd, nil
}

// fsLog drains the messages the kernel queued on an fs context fd, e.g.
// "overlayfs: workdir and upperdir must reside under the same mount".
func fsLog(fsfd int) string {
	var msgs []string
	buf := make([]byte, 1024)
	for range 16 {
		n, err := unix.Read(fsfd, buf)
		if err != nil || n <= 0 {
			break
		}
		msg := strings.TrimSpace(string(buf[:n]))
		// Lines are "e msg", "w msg" or "i msg".
		if len(msg) > 2 && msg[1] == ' ' {
			msg = msg[2:]
		}
		msgs = append(msgs, msg)
	}
	if len(msgs) == 0 {
		return " (overlayfs gives its reason in the kernel log: dmesg)"
	}
	return " (kernel: " + strings.Join(msgs, "; ") + ")"
}

// legacyMount mounts an overlay with mount(2), for kernels without fsopen.
func legacyMount(target string, l Layers) error {
	data := l.String()
	if l.Upper != "" {
		data += ",index=off"
	}
	if err := retryEINTR(func() error { return unix.Mount(Source, target, "overlay", 0, data) }); err != nil {
		return fmt.Errorf("mount overlay %s on %s: %w", data, target, err)
	}
	return nil
}

// Mount mounts an overlay of l on target, which must be an existing
// directory. On a kernel with the new mount API (5.2+) the overlay is built
// detached first and attached with move_mount, so bad layers never leave a
// half-made mount. A mount under a shared parent propagates to its peers, as
// any mount does.
func Mount(ctx context.Context, target string, l Layers) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("mount overlay on %s: %w", target, err)
	}
	if err := l.Validate(); err != nil {
		return fmt.Errorf("mount overlay on %s: %w", target, err)
	}
	if !filepath.IsAbs(target) {
		return fmt.Errorf("mount overlay on %s: target is not an absolute path", target)
	}
	if err := l.checkOnDisk(); err != nil {
		return fmt.Errorf("mount overlay on %s: %w", target, err)
	}
	mfd, err := newOverlay(l)
	if errors.Is(err, unix.ENOSYS) {
		return legacyMount(target, l)
	}
	if err != nil {
		return fmt.Errorf("mount overlay on %s: %w", target, err)
	}
	defer unix.Close(mfd)
	if err := unix.MoveMount(mfd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("mount overlay on %s: move_mount: %w", target, err)
	}
	return nil
}

// Unmount unmounts the mount on top of target. It fails with EBUSY
// (errors.Is(err, unix.EBUSY)) while a process uses the mount; Detach does
// not. It does not follow a symlink at target and never stats target, so it
// is safe on a dead NFS mount.
func Unmount(ctx context.Context, target string) error {
	return unmount(ctx, target, 0)
}

// Detach lazily unmounts the mount on top of target (MNT_DETACH): it leaves
// the namespace at once, and the kernel frees it when the last process using
// it (open file, cwd) lets go. Use it for NFS lowers and for an old overlay
// after a swap.
func Detach(ctx context.Context, target string) error {
	return unmount(ctx, target, unix.MNT_DETACH)
}

func unmount(ctx context.Context, target string, flags int) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("unmount %s: %w", target, err)
	}
	if err := retryEINTR(func() error { return unix.Unmount(target, flags|unix.UMOUNT_NOFOLLOW) }); err != nil {
		return fmt.Errorf("unmount %s: %w", target, err)
	}
	return nil
}

func retryEINTR(f func() error) error {
	for {
		err := f()
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

// NewWorkdir creates a fresh, empty overlay workdir in dir, named
// prefix plus a random suffix, and returns its path. dir must be on the same
// mount as the upper layer. Give every overlay its own: overlayfs clears and
// recreates "work" inside its workdir at mount time, which would break the
// whiteouts and directory copy-ups of an overlay still using it.
func NewWorkdir(dir, prefix string) (string, error) {
	w, err := os.MkdirTemp(dir, prefix)
	if err != nil {
		return "", fmt.Errorf("new workdir in %s: %w", dir, err)
	}
	return w, nil
}

// RemoveWorkdir removes an overlay workdir, including the root-owned, mode
// 000 "work" directory overlayfs leaves in it. It refuses a workdir that an
// overlay visible in this mount namespace still uses. An overlay that was
// detached (after Swap) is not visible: remove its workdir only once nothing
// writes through it any more; reads through files still open there keep
// working after removal, new copy-ups in it fail.
func RemoveWorkdir(path string) error {
	path = filepath.Clean(path)
	mounts, err := mountinfo.Read()
	if err != nil {
		return fmt.Errorf("remove workdir %s: %w", path, err)
	}
	if m, ok := workdirUser(mounts, path); ok {
		return fmt.Errorf("remove workdir %s: in use by the overlay at %s (mount %d)", path, m.Mountpoint, m.ID)
	}
	if err := removeAllForce(path); err != nil {
		return fmt.Errorf("remove workdir %s: %w", path, err)
	}
	return nil
}

func workdirUser(mounts []mountinfo.Mount, work string) (mountinfo.Mount, bool) {
	for _, m := range mounts {
		if m.FSType != "overlay" {
			continue
		}
		if w, ok := m.Option("workdir"); ok && filepath.Clean(w) == work {
			return m, true
		}
	}
	return mountinfo.Mount{}, false
}

// PruneWorkdirs removes every directory in dir that no visible overlay uses
// as its workdir, and returns the removed paths. dir must hold nothing but
// workdirs made by NewWorkdir. Call it at agent start, before any swap.
func PruneWorkdirs(dir string) ([]string, error) {
	mounts, err := mountinfo.Read()
	if err != nil {
		return nil, fmt.Errorf("prune workdirs in %s: %w", dir, err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("prune workdirs in %s: %w", dir, err)
	}
	var removed []string
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		p := filepath.Join(filepath.Clean(dir), e.Name())
		if _, used := workdirUser(mounts, p); used {
			continue
		}
		if err := removeAllForce(p); err != nil {
			return removed, fmt.Errorf("prune workdirs in %s: %w", dir, err)
		}
		removed = append(removed, p)
	}
	return removed, nil
}

// removeAllForce is os.RemoveAll that first makes directories searchable,
// so it also works without CAP_DAC_OVERRIDE.
func removeAllForce(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.IsDir() {
		_ = filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
			// Called for a directory before it is read: open it up first.
			if err == nil && d.IsDir() {
				_ = os.Chmod(p, 0o700)
			}
			return nil
		})
	}
	return os.RemoveAll(path)
}
