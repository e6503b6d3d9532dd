package overlay

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/strata-nix/strata/mountinfo"

	"golang.org/x/sys/unix"
)

// BindBelow bind-mounts, at target, what dir shows below the overlays that
// cover it: the local store as it was before any overlay of the caller's
// was mounted on dir. covers tells the caller's overlays from other mounts
// at dir. The bind is non-recursive and private (mounts later made on dir,
// by the caller or propagated from a peer, never appear in it), keeps the
// mount flags of what it binds (a read-only store stays read-only) and
// holds no reference to the covering overlays, so it can serve as their
// bottom lower layer.
//
// Nothing of the caller's at dir: dir itself is bound. Otherwise the
// bottom overlay's parent mount is bound (non-recursively, so without the
// overlays) on a private staging tmpfs in stagingDir, and dir's directory
// inside it is bound at target. That works when dir is a plain directory
// of its parent mount; when dir is itself a mountpoint (NixOS mounts the
// store read-only on itself) under the overlays, no path reaches it any
// more and BindBelow returns an error.
func BindBelow(ctx context.Context, dir, target, stagingDir string, covers func(mountinfo.Mount) bool) error {
	fail := func(err error) error { return fmt.Errorf("bind the store below %s at %s: %w", dir, target, err) }
	if err := ctx.Err(); err != nil {
		return fail(err)
	}
	dir, target = filepath.Clean(dir), filepath.Clean(target)
	if !filepath.IsAbs(dir) || !filepath.IsAbs(target) {
		return fail(errors.New("paths must be absolute"))
	}
	if rel, err := filepath.Rel(dir, target); err == nil && !strings.HasPrefix(rel, "..") {
		return fail(errors.New("target is inside the store dir"))
	}
	mounts, err := mountinfo.Read()
	if err != nil {
		return fail(err)
	}
	var bottom mountinfo.Mount
	found := false
	for _, m := range mountinfo.At(mounts, dir) {
		if covers(m) {
			if p, ok := mountinfo.ByID(mounts, m.ParentID); !ok || p.Mountpoint != dir || !covers(p) {
				bottom, found = m, true
			}
		}
	}
	bind := func(src string) error {
		if err := retryEINTR(func() error { return unix.Mount(src, target, "", unix.MS_BIND, "") }); err != nil {
			return fmt.Errorf("bind %s: %w", src, err)
		}
		if err := unix.Mount("", target, "", unix.MS_PRIVATE, ""); err != nil {
			_ = retryEINTR(func() error { return unix.Unmount(target, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW) })
			return fmt.Errorf("make %s private: %w", target, err)
		}
		return nil
	}
	if !found {
		if top, ok := mountinfo.Top(mounts, dir); ok && top.FSType == "overlay" && top.Source == Source {
			return fail(fmt.Errorf("the top mount %d at %s is a strata overlay that is not the caller's", top.ID, dir))
		}
		if err := bind(dir); err != nil {
			return fail(err)
		}
		return nil
	}
	parent, ok := mountinfo.ByID(mounts, bottom.ParentID)
	if !ok {
		return fail(fmt.Errorf("parent mount %d of overlay %d is outside this process's root", bottom.ParentID, bottom.ID))
	}
	if parent.Mountpoint == dir {
		return fail(fmt.Errorf("the local store is mount %d (%s) on %s itself, covered by overlay %d: unmount the overlays (or reboot) so it can be reached",
			parent.ID, parent.FSType, dir, bottom.ID))
	}
	if top, ok := mountinfo.Top(mounts, parent.Mountpoint); !ok || top.ID != parent.ID {
		return fail(fmt.Errorf("parent mount %d at %s is covered by mount %d", parent.ID, parent.Mountpoint, top.ID))
	}
	rel, err := filepath.Rel(parent.Mountpoint, dir)
	if err != nil || strings.HasPrefix(rel, "..") {
		return fail(fmt.Errorf("%s is not inside its parent mount %s", dir, parent.Mountpoint))
	}
	if err := ensureStaging(stagingDir); err != nil {
		return fail(err)
	}
	s, err := os.MkdirTemp(stagingDir, "local-")
	if err != nil {
		return fail(fmt.Errorf("staging: %w", err))
	}
	defer os.Remove(s)
	if err := unix.Mount(parent.Mountpoint, s, "", unix.MS_BIND, ""); err != nil {
		return fail(fmt.Errorf("bind parent %s on staging %s: %w", parent.Mountpoint, s, err))
	}
	// Private before it goes, or its unmount propagates to its peers.
	if err := unix.Mount("", s, "", unix.MS_PRIVATE, ""); err != nil {
		return fail(fmt.Errorf("make staging bind %s private (left mounted): %w", s, err))
	}
	berr := bind(filepath.Join(s, rel))
	if err := retryEINTR(func() error { return unix.Unmount(s, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW) }); err != nil && berr == nil {
		berr = fmt.Errorf("detach staging bind %s: %w", s, err)
	}
	if berr != nil {
		return fail(berr)
	}
	return nil
}
