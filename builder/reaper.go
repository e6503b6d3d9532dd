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
// 6.1), and the bind stays because it is busy.
//
// Every 10 s it asks each bind's server for its file system statistics
// (statfs, in a goroutine of its own); once one answers, the server is
// back, calls on the mount no longer hang, and the bind is released. When
// the agent stops the binds stay mounted: the next agent adopts them again
// (System.AdoptDead), so a restart does not make held files hang again.
type reaper struct {
	mu      sync.Mutex
	n       int
	dirs    map[string]int  // bind under DeadDir -> O_PATH fd
	asking  map[string]bool // statfs of the bind under way
	running bool
	// exited is closed when the reaping goroutine ends.
	exited chan struct{}
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
	if err := r.hold(ctx, dir, log); err != nil {
		unix.Unmount(dir, unix.MNT_DETACH)
		os.Remove(dir)
		return err
	}
	log.Info("reaping a dead server's mount: calls waiting on it fail every second", "dir", target, "kept_at", dir)
	return nil
}

// hold opens the bind at dir (O_PATH: the server is not asked) and reaps
// it until ctx ends.
func (r *reaper) hold(ctx context.Context, dir string, log *slog.Logger) error {
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("hold %s: %w", dir, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.dirs == nil {
		r.dirs, r.asking = map[string]int{}, map[string]bool{}
	}
	if old, ok := r.dirs[dir]; ok {
		unix.Close(old)
	}
	r.dirs[dir] = fd
	if !r.running {
		r.running = true
		r.exited = make(chan struct{})
		go r.run(ctx.Done(), log)
	}
	return nil
}

// adoptLeft reaps the binds left under dead by an agent that stopped (or
// died): they stay reaped until their server answers again.
func (r *reaper) adoptLeft(ctx context.Context, dead string, log *slog.Logger) {
	ms, err := mountinfo.Read()
	if err != nil {
		log.Warn("adopt dead servers' mounts", "err", err)
		return
	}
	for _, m := range mountinfo.Under(ms, filepath.Clean(dead)) {
		if filepath.Dir(m.Mountpoint) != filepath.Clean(dead) {
			continue
		}
		if err := r.hold(ctx, m.Mountpoint, log); err != nil {
			log.Warn("adopt a dead server's mount left by an earlier agent; calls on it may hang", "dir", m.Mountpoint, "err", err)
			continue
		}
		log.Info("reaping a dead server's mount left by an earlier agent", "kept_at", m.Mountpoint)
	}
	// Directories without a mount are leftovers of released binds.
	if ents, err := os.ReadDir(dead); err == nil {
		for _, e := range ents {
			_ = unix.Rmdir(filepath.Join(dead, e.Name())) // fails on a mountpoint
		}
	}
}

func (r *reaper) run(done <-chan struct{}, log *slog.Logger) {
	defer close(r.exited)
	t := time.NewTicker(time.Second)
	defer t.Stop()
	answered := make(chan string, 16)
	for tick := 1; ; tick++ {
		select {
		case <-done:
			// The binds stay for the next agent (AdoptDead).
			r.mu.Lock()
			for _, fd := range r.dirs {
				unix.Close(fd)
			}
			r.dirs, r.running = nil, false
			r.mu.Unlock()
			return
		case dir := <-answered:
			r.release(dir, log)
			continue
		case <-t.C:
		}
		r.mu.Lock()
		for dir := range r.dirs {
			// EBUSY is the expected answer: the bind is held.
			if err := unix.Unmount(dir, unix.MNT_FORCE|unix.UMOUNT_NOFOLLOW); err != nil && !errors.Is(err, unix.EBUSY) {
				log.Debug("reap", "dir", dir, "err", err)
			}
			if tick%10 == 0 && !r.asking[dir] {
				r.asking[dir] = true
				go func(dir string) {
					var st unix.Statfs_t
					err := unix.Statfs(dir, &st)
					r.mu.Lock()
					delete(r.asking, dir)
					r.mu.Unlock()
					if err == nil {
						select {
						case answered <- dir:
						case <-done:
						}
					}
				}(dir)
			}
		}
		r.mu.Unlock()
	}
}

// release stops reaping the bind at dir (its server answers again) and
// detaches it.
func (r *reaper) release(dir string, log *slog.Logger) {
	r.mu.Lock()
	fd, ok := r.dirs[dir]
	delete(r.dirs, dir)
	r.mu.Unlock()
	if !ok {
		return
	}
	unix.Close(fd)
	if err := unix.Unmount(dir, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW); err != nil {
		log.Warn("detach reaped mount", "dir", dir, "err", err)
		return
	}
	os.Remove(dir)
	log.Info("a dead server's mount answers again: no longer reaped", "kept_at", dir)
}
