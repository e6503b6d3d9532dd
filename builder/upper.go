package builder

import (
	"errors"
	"io/fs"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// UpperUsage is what the overlay's upper holds, as `strata status` shows
// it. The upper should grow only by local work; FromLowers says how much
// of it is generation data copied up anyway (a write to a generation
// file, a hard link made without metacopy).
type UpperUsage struct {
	// Bytes is the disk space the upper uses (allocated blocks).
	Bytes int64 `json:"bytes"`
	// Files counts its regular files.
	Files int `json:"files"`
	// FromLowersBytes and FromLowersFiles are the regular files copied up
	// from a lower with their data (trusted.overlay.origin without
	// trusted.overlay.metacopy).
	FromLowersBytes int64 `json:"from_lowers_bytes"`
	FromLowersFiles int   `json:"from_lowers_files"`
	// MetacopyFiles are files copied up without their data (metacopy=on):
	// they use no data blocks.
	MetacopyFiles int `json:"metacopy_files"`
	// Whiteouts count deleted lower entries.
	Whiteouts int `json:"whiteouts"`
	// Measured is when the upper was walked (at most every 5 seconds).
	Measured time.Time `json:"measured"`
}

// usageCache keeps the last walk of the upper.
type usageCache struct {
	mu   sync.Mutex
	last UpperUsage
}

// upperUsage walks the upper (local and small; never a lower), reusing
// a walk younger than 5 seconds.
func (a *Agent) upperUsage() UpperUsage {
	a.usage.mu.Lock()
	defer a.usage.mu.Unlock()
	if time.Since(a.usage.last.Measured) < 5*time.Second {
		return a.usage.last
	}
	a.usage.last = measureUpper(a.cfg.upperDir())
	return a.usage.last
}

func measureUpper(upper string) UpperUsage {
	u := UpperUsage{Measured: time.Now()}
	_ = filepath.WalkDir(upper, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		var st unix.Stat_t
		if unix.Lstat(p, &st) != nil {
			return nil
		}
		u.Bytes += st.Blocks * 512
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFCHR:
			if st.Rdev == 0 {
				u.Whiteouts++
			}
		case unix.S_IFREG:
			u.Files++
			if !hasXattr(p, "trusted.overlay.origin") {
				break
			}
			if hasXattr(p, "trusted.overlay.metacopy") {
				u.MetacopyFiles++
			} else {
				u.FromLowersFiles++
				u.FromLowersBytes += st.Blocks * 512
			}
		}
		return nil
	})
	return u
}

func hasXattr(p, name string) bool {
	_, err := unix.Lgetxattr(p, name, nil)
	return err == nil || errors.Is(err, unix.ERANGE)
}
