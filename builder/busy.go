package builder

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Busy reports whether a Nix build is running on this store, and names the
// lock that shows it.
//
// How: for every output it builds, Nix (nix-build, nix build, nix-daemon
// workers alike) holds an exclusive flock(2) on "<store path>.lock" in the
// store directory for the whole build and deletes the file afterwards. Lock
// files are new files, so they live in the overlay's upper; Busy lists the
// upper (local and small, never the NFS lower) for "*.lock" and tries a
// non-blocking shared flock on each through the store dir (the lock is on
// the overlay's inode, so it must be taken through the same mount as Nix
// took it). A lock it cannot get means a build runs. A stale lock file
// left by a killed build is not locked, so it does not count.
func Busy(storeDir, upper string) (bool, string, error) {
	ents, err := os.ReadDir(upper)
	if err != nil {
		return false, "", fmt.Errorf("look for build locks in %s: %w", upper, err)
	}
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".lock") || !e.Type().IsRegular() {
			continue
		}
		p := filepath.Join(storeDir, e.Name())
		fd, err := unix.Open(p, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW|unix.O_NONBLOCK, 0)
		if err != nil {
			continue // gone since the listing
		}
		err = unix.Flock(fd, unix.LOCK_SH|unix.LOCK_NB)
		unix.Close(fd)
		if errors.Is(err, unix.EWOULDBLOCK) {
			return true, p, nil
		}
	}
	return false, "", nil
}
