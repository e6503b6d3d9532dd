package builder

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/mountinfo"

	"github.com/strata-nix/strata/overlay"
)

// Mounter is every mount operation the agent makes. The kernel's mount
// table (Mounts) is the truth the agent reconciles its state file with.
// System is the real one; unit tests use a fake.
type Mounter interface {
	// MountGeneration mounts generation gen of the server whose NFS
	// address is nfs (host:port) read-only at dir (an existing directory).
	MountGeneration(ctx context.Context, nfs string, gen uint64, dir string) error
	// MountOverlay mounts an overlay of l at target.
	MountOverlay(ctx context.Context, target string, l overlay.Layers) error
	// Swap atomically replaces the overlay at target by one of l. With an
	// error, the result's Switched still says whether the new overlay
	// became the visible one before the error.
	Swap(ctx context.Context, target string, l overlay.Layers) (overlay.SwapResult, error)
	// BindLocal bind-mounts at dir what storeDir shows below the overlays
	// ours accepts (overlay.BindBelow): the local store as it was before
	// strata covered it.
	BindLocal(ctx context.Context, storeDir, dir string, ours func(mountinfo.Mount) bool) error
	// Detach lazily unmounts the top mount at target.
	Detach(ctx context.Context, target string) error
	// ForceUnmount releases the NFS mount at target of a server that is
	// gone, so that nothing waits on it for ever: calls still pending on
	// it fail (MNT_FORCE), and it leaves the namespace (MNT_DETACH). It
	// never waits for the server.
	ForceUnmount(ctx context.Context, target string) error
	// Mounts returns the mount table of the agent's mount namespace.
	Mounts() ([]mountinfo.Mount, error)
}

// GenerationMounter mounts generation gen of the server at NFS address
// nfs (host:port) read-only at dir. NFSGenerations returns the production
// one; tests substitute a bind mount of the server's snapshot (same
// semantics as the read-only NFS lower, minus NFS).
type GenerationMounter func(ctx context.Context, nfs string, gen uint64, dir string) error

// NFSGenerations mounts /gen/<N> from the strata NFS server at nfs with
// overlay.MountNFS (nosharecache, since two generations are mounted
// during a rotation, and the same generation of two servers during a
// failover). A mount that answers no POSIX ACL query (overlay.CheckNFSACL)
// is kept, since root reads work, and logged as an error: build users
// cannot read it through the overlay.
func NFSGenerations(nconnect int, extra []string, log *slog.Logger) GenerationMounter {
	return func(ctx context.Context, nfs string, gen uint64, dir string) error {
		if nfs == "" {
			return fmt.Errorf("mount generation %d: no NFS address", gen)
		}
		host, p, err := net.SplitHostPort(nfs)
		port, perr := strconv.Atoi(p)
		if err != nil || perr != nil {
			return fmt.Errorf("mount generation %d: nfs address %q: want host:port", gen, nfs)
		}
		if err := overlay.MountNFS(ctx, host, fmt.Sprintf("/gen/%d", gen), dir,
			overlay.NFSOptions{Port: port, NConnect: nconnect, Extra: extra}); err != nil {
			return err
		}
		if err := overlay.CheckNFSACL(dir); err != nil {
			log.Error("build users cannot read this generation through the overlay", "generation", gen, "nfs", nfs, "err", err)
		}
		return nil
	}
}

// System is the Mounter of a real host: generations through Generation,
// overlays and swaps through package overlay.
type System struct {
	Generation  GenerationMounter
	SwapOptions overlay.SwapOptions
	// DeadDir is where ForceUnmount keeps the mounts of dead servers it
	// reaps (kernels without the NFS shutdown knob); empty: no reaping.
	DeadDir string

	reaper reaper
}

var _ Mounter = (*System)(nil)

// NewSystem returns a System that mounts generations with gen and swaps
// with method, staging propagation swaps under stagingDir.
func NewSystem(gen GenerationMounter, method overlay.Method, stagingDir string, log *slog.Logger) *System {
	return &System{Generation: gen, SwapOptions: overlay.SwapOptions{Method: method, StagingDir: stagingDir, Logger: log}}
}

func (s *System) MountGeneration(ctx context.Context, nfs string, gen uint64, dir string) error {
	if s.Generation == nil {
		return fmt.Errorf("mount generation %d: no generation mounter", gen)
	}
	return s.Generation(ctx, nfs, gen, dir)
}

func (s *System) MountOverlay(ctx context.Context, target string, l overlay.Layers) error {
	return overlay.Mount(ctx, target, l)
}

func (s *System) Swap(ctx context.Context, target string, l overlay.Layers) (overlay.SwapResult, error) {
	return overlay.Swap(ctx, target, l, s.SwapOptions)
}

func (s *System) BindLocal(ctx context.Context, storeDir, dir string, ours func(mountinfo.Mount) bool) error {
	staging := s.SwapOptions.StagingDir
	if staging == "" {
		staging = overlay.DefaultStagingDir
	}
	return overlay.BindBelow(ctx, storeDir, dir, staging, ours)
}

func (s *System) Detach(ctx context.Context, target string) error { return overlay.Detach(ctx, target) }

// ForceUnmount shuts the NFS client of the mount at target down where the
// kernel offers it (/sys/fs/nfs/<major>:<minor>/shutdown, Linux 6.7+:
// every call on it, pending or later, fails with EIO at once). Where it
// does not (measured on 6.1: calls made after a forced unmount hang on the
// hard mount again), the mount is handed to a reaper first (see reaper):
// a bind of it under DeadDir, held busy, that is force-unmounted every
// second, so a call waiting on the dead server fails within a second. Then
// target is unmounted with MNT_FORCE (pending calls fail; EBUSY while a
// detached overlay still uses it is expected) and detached (MNT_DETACH).
// None of this waits for the server; target itself is never stat-ed.
func (s *System) ForceUnmount(ctx context.Context, target string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("force unmount %s: %w", target, err)
	}
	log := s.SwapOptions.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	shut := false
	if ms, err := mountinfo.Read(); err == nil {
		if m, ok := mountinfo.Top(ms, target); ok && strings.HasPrefix(m.FSType, "nfs") {
			knob := fmt.Sprintf("/sys/fs/nfs/%d:%d/shutdown", m.Major, m.Minor)
			if err := os.WriteFile(knob, []byte("1\n"), 0); err == nil {
				shut = true
				log.Info("shut the NFS client of a dead server's mount down", "dir", target, "knob", knob)
			}
		}
	}
	if !shut && s.DeadDir != "" {
		if err := s.reaper.adopt(ctx, target, s.DeadDir, log); err != nil {
			log.Warn("no reaper for a dead server's mount: calls made on it later may hang", "dir", target, "err", err)
		}
	}
	err := unix.Unmount(target, unix.MNT_FORCE|unix.UMOUNT_NOFOLLOW)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EBUSY) && !errors.Is(err, unix.EINTR) {
		log.Warn("forced unmount", "dir", target, "err", err)
	}
	return overlay.Detach(ctx, target)
}

func (s *System) Mounts() ([]mountinfo.Mount, error) { return mountinfo.Read() }

// AdoptDead reaps, until ctx ends, the dead servers' mounts an earlier
// agent left bound under DeadDir (see reaper): a restart keeps failing the
// calls of processes that still hold files on them, instead of letting
// them hang again.
func (s *System) AdoptDead(ctx context.Context) {
	if s.DeadDir == "" {
		return
	}
	log := s.SwapOptions.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s.reaper.adoptLeft(ctx, s.DeadDir, log)
}

func mkdirs(dirs ...string) error {
	for _, d := range dirs {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	return nil
}
