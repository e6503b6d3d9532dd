package overlay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/strata-nix/strata/mountinfo"

	"golang.org/x/sys/unix"
)

// moveMountBeneath is MOVE_MOUNT_BENEATH (Linux 6.5, include/uapi/linux/mount.h);
// golang.org/x/sys/unix does not name it yet.
const moveMountBeneath = 0x200

// DefaultStagingDir is where the propagation method mounts its private
// staging tmpfs when SwapOptions.StagingDir is empty.
const DefaultStagingDir = "/run/strata/swap"

// stagingSource names the staging tmpfs in mountinfo.
const stagingSource = "strata-staging"

// Method is how Swap replaces an overlay.
type Method int

const (
	// MethodAuto uses MethodBeneath when the kernel supports it and the
	// target allows it, MethodPropagation otherwise.
	MethodAuto Method = iota
	// MethodBeneath builds the new overlay detached, attaches it beneath the
	// current one with move_mount(MOVE_MOUNT_BENEATH) (Linux 6.5+) and
	// detaches the current one. Path lookups at the target see the old
	// overlay, then the new one, never the empty directory below. It
	// changes no propagation setting: other mount namespaces that receive
	// propagation from the target's parent see the same swap.
	MethodBeneath
	// MethodPropagation emulates mounting beneath through mount
	// propagation, for kernels before 6.5 (tested on 6.1 and 6.12; relies
	// on propagation "tuck-under", mainline since about 4.13): the target's
	// parent mount is made shared (and left shared), a non-recursive bind
	// of it (a peer) is made under a private staging tmpfs, the new overlay
	// is mounted on the bind's copy of the target, from where the kernel
	// propagates it to the target and tucks it under the current overlay;
	// then the current overlay is detached and the staging bind is made
	// private and detached. Lookups see old, then new, never a gap.
	//
	// What this means for other mount namespaces: a parent mount that was
	// private becomes shared, so namespaces created afterwards (systemd
	// services with private mounts, containers) become its slaves and
	// receive this and later swaps, and any mount later made under that
	// parent in this namespace propagates to them. Namespaces that are
	// already peers or slaves of the parent (the usual case on systemd
	// hosts, where / is shared) see the same swap as this one. The staging
	// tmpfs is mounted once and left in place; if its own parent is shared,
	// that one empty tmpfs appears in peer namespaces too.
	MethodPropagation
)

// String returns "auto", "beneath" or "propagation".
func (m Method) String() string {
	switch m {
	case MethodAuto:
		return "auto"
	case MethodBeneath:
		return "beneath"
	case MethodPropagation:
		return "propagation"
	}
	return fmt.Sprintf("Method(%d)", int(m))
}

// ParseMethod is the inverse of Method.String.
func ParseMethod(s string) (Method, error) {
	for _, m := range []Method{MethodAuto, MethodBeneath, MethodPropagation} {
		if s == m.String() {
			return m, nil
		}
	}
	return 0, fmt.Errorf("parse swap method %q: want auto, beneath or propagation", s)
}

// ErrBeneathUnsupported means the running kernel has no MOVE_MOUNT_BENEATH
// (before Linux 6.5) and MethodBeneath was asked for.
var ErrBeneathUnsupported = errors.New("kernel has no MOVE_MOUNT_BENEATH (needs Linux 6.5)")

var (
	beneathOnce sync.Once
	beneathOK   bool
)

// BeneathSupported reports whether the kernel knows MOVE_MOUNT_BENEATH. It
// asks the kernel with a move_mount call on invalid fds: the kernel checks
// the flags before the fds, so an unknown flag gives EINVAL and a known one
// EBADF. The answer is cached.
func BeneathSupported() bool {
	beneathOnce.Do(func() {
		err := unix.MoveMount(-1, "", -1, "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH|moveMountBeneath)
		beneathOK = err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOSYS) && !errors.Is(err, unix.EPERM)
	})
	return beneathOK
}

// SwapOptions tune Swap. The zero value picks the method automatically.
type SwapOptions struct {
	// Method forces a method; MethodAuto (zero) chooses.
	Method Method
	// StagingDir is a directory, not under the target, where
	// MethodPropagation mounts (once) and keeps a small private tmpfs for
	// its staging binds. Default DefaultStagingDir.
	StagingDir string
	// Logger receives one line per swap; nil discards.
	Logger *slog.Logger
}

// SwapResult tells the caller what Swap did. Swap returns it with an
// error too: Switched says whether the new overlay became the visible one
// before the error, so a caller never mistakes a done swap for a failed one.
type SwapResult struct {
	// Switched is true once the old overlay was detached from the target
	// and the new one is what path lookups see, even if Swap then failed
	// (reading the mount table back, dropping the staging bind).
	Switched bool
	// Method is the method used: MethodBeneath or MethodPropagation.
	Method Method
	// Old are the layers of the overlay that was replaced, as the kernel
	// reported them.
	Old Layers
	// Mount is the new overlay at the target, read back from mountinfo.
	Mount mountinfo.Mount
}

// Cleanup removes the replaced overlay's workdir (RemoveWorkdir). The old
// overlay is detached when Swap returns but lives on while processes hold
// files or a cwd in it; call Cleanup once writes through such leftovers no
// longer matter (reads keep working after it).
func (r SwapResult) Cleanup() error {
	if r.Old.Work == "" {
		return nil
	}
	if w, _ := r.Mount.Option("workdir"); filepath.Clean(w) == filepath.Clean(r.Old.Work) {
		return nil
	}
	return RemoveWorkdir(r.Old.Work)
}

// Swap replaces the overlay mounted at target with a new overlay of next,
// so that no path lookup by any process fails during the change
// (invariant 3): lookups resolve in the old overlay until one atomic step,
// then in the new one. Processes holding files, directories or a cwd in the
// old overlay keep using it; it is detached (MNT_DETACH) and freed by the
// kernel when they let go.
//
// next.Work must be a fresh workdir: empty (it is created if missing) and
// not the current overlay's. next.Upper is normally the current upper, so
// local builds carry over. The target's top mount must be an overlay.
//
// Before anything changes, Swap checks its input and builds the new
// overlay, so bad layers, a busy workdir or a lower that cannot be mounted
// give an error and leave the current overlay in place. After the swap it
// reads the mount table back and returns an error if the new overlay is not
// the one visible at target. An error after the old overlay was detached
// comes with Switched true in the result: the new overlay serves the
// target, and the caller must carry on as after a swap.
//
// The target's parent mount must not be the mount namespace's root for
// MethodBeneath (the kernel refuses with EINVAL; it happens in an
// initramfs, where / is the namespace root): MethodAuto then uses
// MethodPropagation. MethodAuto also falls back to MethodPropagation when
// move_mount beneath fails with EINVAL for another reason (a locked mount
// in a user namespace, or propagation that would overmount).
func Swap(ctx context.Context, target string, next Layers, opts SwapOptions) (SwapResult, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var res SwapResult
	fail := func(err error) (SwapResult, error) {
		return res, fmt.Errorf("swap overlay at %s: %w", target, err)
	}
	if err := ctx.Err(); err != nil {
		return fail(err)
	}
	if !filepath.IsAbs(target) {
		return fail(errors.New("target is not an absolute path"))
	}
	target = filepath.Clean(target)
	if err := next.Validate(); err != nil {
		return fail(err)
	}
	mounts, err := mountinfo.Read()
	if err != nil {
		return fail(err)
	}
	top, ok := mountinfo.Top(mounts, target)
	if !ok {
		return fail(errors.New("nothing is mounted there"))
	}
	if top.FSType != "overlay" {
		return fail(fmt.Errorf("top mount %d is %s, not overlay", top.ID, top.FSType))
	}
	old, err := LayersOf(top)
	if err != nil {
		return fail(err)
	}
	// The parent is invisible when it lies outside the caller's root
	// (chroot); then only MethodBeneath can work, and the ns-root check is
	// moot (the namespace root is outside the root as well).
	parent, parentVisible := mountinfo.ByID(mounts, top.ParentID)
	if next.Work != "" {
		if err := freshWorkdir(next.Work, old.Work, mounts); err != nil {
			return fail(err)
		}
	}

	if err := next.checkOnDisk(); err != nil {
		return fail(err)
	}

	method := opts.Method
	switch method {
	case MethodAuto:
		switch {
		case !BeneathSupported():
			method = MethodPropagation
		case parentVisible && parent.IsNamespaceRoot():
			log.Info("target's parent is the mount namespace root; cannot mount beneath there", "target", target)
			method = MethodPropagation
		default:
			method = MethodBeneath
		}
	case MethodBeneath:
		if !BeneathSupported() {
			return fail(ErrBeneathUnsupported)
		}
		if parentVisible && parent.IsNamespaceRoot() {
			return fail(fmt.Errorf("parent mount %d (%s) is the mount namespace root, where the kernel refuses to mount beneath: mount a filesystem on %s first",
				parent.ID, parent.Mountpoint, filepath.Dir(target)))
		}
	case MethodPropagation:
	default:
		return fail(fmt.Errorf("unknown method %v", method))
	}

	mfd, err := newOverlay(next)
	legacy := errors.Is(err, unix.ENOSYS)
	if err != nil && !legacy {
		return fail(err)
	}
	if !legacy {
		defer unix.Close(mfd)
	} else {
		mfd = -1
		if method == MethodBeneath {
			return fail(ErrBeneathUnsupported)
		}
	}

	res.Old = old
	if method == MethodBeneath {
		res.Method = method
		err := unix.MoveMount(mfd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH|moveMountBeneath)
		if errors.Is(err, unix.EINVAL) && opts.Method == MethodAuto {
			log.Info("move_mount beneath refused; using propagation", "target", target, "err", err)
			method = MethodPropagation
		} else if err != nil {
			return fail(fmt.Errorf("move_mount beneath: %w", err))
		} else if err := detachTop(ctx, target); err != nil {
			// The new overlay sits beneath the old one; lookups still see
			// the old one. A later Swap replaces the top again.
			return fail(fmt.Errorf("new overlay is beneath, old one stays on top: %w", err))
		} else {
			res.Switched = true
		}
	}
	if method == MethodPropagation {
		if !parentVisible {
			return fail(fmt.Errorf("parent mount %d of mount %d is outside this process's root; the propagation method needs it", top.ParentID, top.ID))
		}
		staging := opts.StagingDir
		if staging == "" {
			staging = DefaultStagingDir
		}
		res.Method = method
		switched, err := swapPropagation(target, top, parent, next, mfd, staging, log)
		res.Switched = switched
		if err != nil {
			return fail(err)
		}
	}

	// The old overlay is gone from the target: from here on an error does
	// not undo the switch. The read-back decides when it can.
	after, err := readBack()
	if err != nil {
		return fail(fmt.Errorf("switched with %s, but reading the mount table back failed: %w", method, err))
	}
	now, ok := mountinfo.Top(after, target)
	if !ok || now.FSType != "overlay" {
		res.Switched = false
		return fail(fmt.Errorf("after %s swap no overlay is visible", method))
	}
	if nowLayers, err := LayersOf(now); err != nil || !sameLayers(nowLayers, next) {
		res.Switched = false
		return fail(fmt.Errorf("after %s swap the visible overlay is mount %d with layers %s, not the new one", method, now.ID, nowLayers))
	}
	res.Mount = now
	log.Info("swapped overlay", "target", target, "method", method.String(),
		"old_lower", strings.Join(old.Lower, ":"), "new_lower", strings.Join(next.Lower, ":"), "mount_id", now.ID)
	return res, nil
}

// Seams for tests of the error paths after the switch; the real calls
// otherwise.
var (
	readBack  = mountinfo.Read
	detachTop = Detach
)

// freshWorkdir creates work if missing and checks it is empty and used by
// no visible overlay.
func freshWorkdir(work, current string, mounts []mountinfo.Mount) error {
	work = filepath.Clean(work)
	if current != "" && work == filepath.Clean(current) {
		return fmt.Errorf("workdir %s is the current overlay's: give each overlay a fresh one (NewWorkdir)", work)
	}
	if m, ok := workdirUser(mounts, work); ok {
		return fmt.Errorf("workdir %s is in use by the overlay at %s", work, m.Mountpoint)
	}
	if err := os.Mkdir(work, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("create workdir: %w", err)
	}
	f, err := os.Open(work)
	if err != nil {
		return fmt.Errorf("check workdir: %w", err)
	}
	defer f.Close()
	names, err := f.Readdirnames(1)
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("check workdir %s: %w", work, err)
	}
	if len(names) > 0 {
		return fmt.Errorf("workdir %s is not empty (has %q): give each overlay a fresh one (NewWorkdir)", work, names[0])
	}
	return nil
}

// swapPropagation is MethodPropagation (swap-fallback.md, P1). mfd is the
// detached new overlay, or -1 to mount next with mount(2) on kernels
// without the new mount API.
func swapPropagation(target string, top, parent mountinfo.Mount, next Layers, mfd int, staging string, log *slog.Logger) (switched bool, err error) {
	if rel, err := filepath.Rel(target, filepath.Clean(staging)); err == nil && !strings.HasPrefix(rel, "..") {
		return false, fmt.Errorf("staging dir %s is under the target", staging)
	}
	if parent.PeerGroup() == 0 {
		if err := unix.Mount("", parent.Mountpoint, "", unix.MS_SHARED, ""); err != nil {
			return false, fmt.Errorf("make parent mount %s shared: %w", parent.Mountpoint, err)
		}
		log.Info("made the target's parent mount shared for propagation swaps", "parent", parent.Mountpoint)
	}
	if err := ensureStaging(staging); err != nil {
		return false, err
	}
	s, err := os.MkdirTemp(staging, "swap-")
	if err != nil {
		return false, fmt.Errorf("staging: %w", err)
	}
	defer os.Remove(s)
	// A non-recursive bind of the parent: a peer of it, without the old
	// overlay on top of the target.
	if err := unix.Mount(parent.Mountpoint, s, "", unix.MS_BIND, ""); err != nil {
		return false, fmt.Errorf("bind parent %s on staging %s: %w", parent.Mountpoint, s, err)
	}
	// The bind must stop being a peer BEFORE it goes, or its unmount
	// propagates to the target and removes the new overlay too.
	dropBind := func() error {
		if err := unix.Mount("", s, "", unix.MS_PRIVATE, ""); err != nil {
			return fmt.Errorf("make staging bind %s private: %w", s, err)
		}
		if err := retryEINTR(func() error { return unix.Unmount(s, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW) }); err != nil {
			return fmt.Errorf("detach staging bind %s: %w", s, err)
		}
		return nil
	}
	rel, err := filepath.Rel(parent.Mountpoint, top.Mountpoint)
	if err != nil || strings.HasPrefix(rel, "..") {
		_ = dropBind()
		return false, fmt.Errorf("target %s is not inside its parent mount %s", top.Mountpoint, parent.Mountpoint)
	}
	inner := filepath.Join(s, rel)
	if mfd >= 0 {
		err = unix.MoveMount(mfd, "", unix.AT_FDCWD, inner, unix.MOVE_MOUNT_F_EMPTY_PATH)
	} else {
		err = legacyMount(inner, next)
	}
	if err != nil {
		if derr := dropBind(); derr != nil {
			log.Warn("staging bind left mounted", "dir", s, "err", derr)
		}
		return false, fmt.Errorf("mount new overlay on staging %s: %w", inner, err)
	}
	// The kernel propagated a copy to target and tucked it under the old
	// overlay. Detaching the old one reveals it.
	if err := retryEINTR(func() error { return unix.Unmount(target, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW) }); err != nil {
		if derr := dropBind(); derr != nil {
			log.Warn("staging bind left mounted", "dir", s, "err", derr)
		}
		return false, fmt.Errorf("new overlay is beneath, old one stays on top: detach %s: %w", target, err)
	}
	if err := dropBind(); err != nil {
		return true, fmt.Errorf("swap done, but %w", err)
	}
	return true, nil
}

// ensureStaging makes sure a private tmpfs named stagingSource is mounted
// at dir, mounting it the first time.
func ensureStaging(dir string) error {
	dir = filepath.Clean(dir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("staging dir: %w", err)
	}
	mounts, err := mountinfo.Read()
	if err != nil {
		return err
	}
	top, ok := mountinfo.Top(mounts, dir)
	if !ok || top.FSType != "tmpfs" || top.Source != stagingSource {
		if err := unix.Mount(stagingSource, dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "mode=0700,size=64k,nr_inodes=4096"); err != nil {
			return fmt.Errorf("mount staging tmpfs on %s: %w", dir, err)
		}
	} else if top.PeerGroup() == 0 && top.Master() == 0 {
		return nil
	}
	if err := unix.Mount("", dir, "", unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make staging %s private: %w", dir, err)
	}
	return nil
}

func sameLayers(a, b Layers) bool {
	if len(a.Lower) != len(b.Lower) || filepath.Clean(a.Upper) != filepath.Clean(b.Upper) || filepath.Clean(a.Work) != filepath.Clean(b.Work) {
		return false
	}
	for i := range a.Lower {
		if filepath.Clean(a.Lower[i]) != filepath.Clean(b.Lower[i]) {
			return false
		}
	}
	return true
}
