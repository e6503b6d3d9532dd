package builder

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/mountinfo"
)

// reaper keeps dead servers' NFS mounts from hanging processes on kernels
// without the NFS client's shutdown knob (before Linux 6.7). A forced
// unmount (MNT_FORCE) fails the calls pending on a mount at that moment,
// but the mount is hard: a process that still holds a file or a cwd on the
// old overlay blocks again on its next call, for as long as the server is
// gone. So the reaper bind-mounts each such mount under DeadDir, holds it
// busy with an O_PATH descriptor (neither step asks the server), and calls
// umount2(MNT_FORCE) on it every second: the kernel then fails every call
// waiting on the dead server (EIO, or ERESTARTSYS (512) leaking through on
// 6.1), and the bind stays because it is busy. It reaps until ctx ends
// (the agent stops); then it detaches what it kept. A restarted agent
// detaches leftovers under DeadDir (Reset).
type reaper struct {
	mu      sync.Mutex
	n       int
	dirs    map[string]int // bind under DeadDir -> O_PATH fd
	running bool
}

// adopt binds the mount at target under dead and starts reaping it.
func (r *reaper) adopt(ctx context.Context, target, dead string, log *slog.Logger) error {
	if err := os.MkdirAll(dead, 0o700); err != nil {
		return err
	}
	r.mu.Lock()
	r.n++
	dir := filepath.Join(dead, strconv.Itoa(os.Getpid())+"-"+strconv.Itoa(r.n)+"-"+filepath.Base(target))
	r.mu.Unlock()
	if err := os.Mkdir(dir, 0o700); err != nil {
		return err
	}
	if err := unix.Mount(target, dir, "", unix.MS_BIND, ""); err != nil {
		os.Remove(dir)
		return fmt.Errorf("bind %s at %s: %w", target, dir, err)
	}
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Unmount(dir, unix.MNT_DETACH)
		os.Remove(dir)
		return fmt.Errorf("hold %s: %w", dir, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.dirs == nil {
		r.dirs = map[string]int{}
	}
	r.dirs[dir] = fd
	log.Info("reaping a dead server's mount: calls waiting on it fail every second", "dir", target, "kept_at", dir)
	if !r.running {
		r.running = true
		go r.run(ctx.Done(), log)
	}
	return nil
}

func (r *reaper) run(done <-chan struct{}, log *slog.Logger) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-done:
			r.mu.Lock()
			for dir, fd := range r.dirs {
				unix.Close(fd)
				if err := unix.Unmount(dir, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW); err != nil {
					log.Warn("detach reaped mount", "dir", dir, "err", err)
				}
				os.Remove(dir)
			}
			r.dirs, r.running = nil, false
			r.mu.Unlock()
			return
		case <-t.C:
		}
		r.mu.Lock()
		for dir := range r.dirs {
			// EBUSY is the expected answer: the bind is held.
			if err := unix.Unmount(dir, unix.MNT_FORCE|unix.UMOUNT_NOFOLLOW); err != nil && !errors.Is(err, unix.EBUSY) {
				log.Debug("reap", "dir", dir, "err", err)
			}
		}
		r.mu.Unlock()
	}
}

// ResetDead detaches every mount left under dead by an agent that is gone
// (force first, so nothing waiting on them stays hung) and removes the
// directories.
func ResetDead(dead string, log *slog.Logger) {
	ms, err := mountinfo.Read()
	if err != nil {
		return
	}
	for _, m := range mountinfo.Under(ms, filepath.Clean(dead)) {
		unix.Unmount(m.Mountpoint, unix.MNT_FORCE|unix.UMOUNT_NOFOLLOW)
		if err := unix.Unmount(m.Mountpoint, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW); err == nil {
			log.Info("released a dead server's mount left by an earlier agent", "dir", m.Mountpoint)
		}
	}
	if ents, err := os.ReadDir(dead); err == nil {
		for _, e := range ents {
			os.Remove(filepath.Join(dead, e.Name()))
		}
	}
}
