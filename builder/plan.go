package builder

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"
)

// removal is what a rotation does with the local paths that are not in the
// new generation.
type removal struct {
	// Invalidate are removed from the local DB before the swap.
	Invalidate []string
	// Keep maps a generation to the paths it stays mounted for (as a
	// lower below the new generation): they are valid locally, not in the
	// upper, and valid paths that stay refer to them.
	Keep map[uint64][]string
	// InUpper stay valid: the upper holds them (built locally).
	InUpper []string
}

// planRemoval decides for each candidate path (mapped to the generation
// whose lower holds it) whether it is invalidated, kept valid because the
// upper holds it, or kept valid through its old generation's lower because
// a path that stays valid refers to it, directly or through other kept
// candidates. valid and referrers describe the local DB; candidates that are
// not valid are ignored.
func planRemoval(cands map[string]uint64, valid map[string]bool, referrers map[string][]string, inUpper func(string) bool) removal {
	stays := map[string]bool{} // candidate stays valid
	var r removal
	for p := range cands {
		if valid[p] && inUpper(p) {
			stays[p] = true
			r.InUpper = append(r.InUpper, p)
		}
	}
	kept := map[string]bool{}
	for changed := true; changed; {
		changed = false
		for p := range cands {
			if !valid[p] || stays[p] {
				continue
			}
			for _, ref := range referrers[p] {
				if _, isCand := cands[ref]; !isCand || stays[ref] {
					stays[p], kept[p], changed = true, true, true
					break
				}
			}
		}
	}
	for p, g := range cands {
		switch {
		case !valid[p] || (stays[p] && !kept[p]):
		case kept[p]:
			if r.Keep == nil {
				r.Keep = map[uint64][]string{}
			}
			r.Keep[g] = append(r.Keep[g], p)
		default:
			r.Invalidate = append(r.Invalidate, p)
		}
	}
	slices.Sort(r.Invalidate)
	slices.Sort(r.InUpper)
	for g := range r.Keep {
		slices.Sort(r.Keep[g])
	}
	return r
}

// localHolds reports whether store path p lives locally, outside every
// generation: the upper holds it (upperHolds) or the local store layer
// below the generations does, and the upper does not hide it.
func localHolds(upper, local, p string) bool {
	if upperHolds(upper, p) {
		return true
	}
	if isWhiteout(filepath.Join(upper, filepath.Base(p))) {
		return false
	}
	_, err := os.Lstat(filepath.Join(local, filepath.Base(p)))
	return err == nil
}

// isWhiteout reports whether q is an overlayfs whiteout: a character
// device 0/0.
func isWhiteout(q string) bool {
	var st unix.Stat_t
	return unix.Lstat(q, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == 0
}

// upperHolds reports whether the upper layer holds store path p as a
// local path of its own: an entry exists, is not a whiteout, and is not a
// copy-up of a lower entry (overlayfs marks those with the
// trusted.overlay.origin xattr; a copied-up directory holds only what was
// changed, the rest is still in the lower).
func upperHolds(upper, p string) bool {
	q := filepath.Join(upper, filepath.Base(p))
	fi, err := os.Lstat(q)
	if err != nil {
		return false
	}
	if fi.Mode()&fs.ModeCharDevice != 0 {
		var st unix.Stat_t
		if unix.Lstat(q, &st) == nil && st.Rdev == 0 {
			return false // whiteout
		}
	}
	_, err = unix.Lgetxattr(q, "trusted.overlay.origin", nil)
	return errors.Is(err, unix.ENODATA) || errors.Is(err, unix.ENOTSUP)
}
