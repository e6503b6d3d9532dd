package builder

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/nixstore"
)

// Garbage collection on a builder (nix-collect-garbage, nix.gc.automatic,
// min-free) deletes every store path no GC root reaches, and every
// invalid entry of the store dir. On the overlay a deletion is a whiteout
// in the upper that hides the path in every later generation too. So the
// agent keeps the mounted generation alive for Nix:
//
//   - A root path per generation, <hash>-strata-generation-<N>: a small
//     text file in the upper, registered in the local DB with every path
//     of the generation as a reference (in the import's own SQLite
//     transaction), and one GC root, <nix.state_dir>/gcroots/strata, a
//     symlink to it. GC keeps the root's closure, so it never deletes,
//     whiteouts or invalidates a generation path; paths built locally are
//     collected as before. Rotation renames the previous root's DB row to
//     the next root path and changes only the references of paths that
//     came or went (a million-path generation is not re-referenced on
//     every rotation), replaces the symlink by rename(2) (atomic), then
//     removes the old root's file. Invalidating a path that left drops the
//     root's reference to it in the same transaction.
//   - The GC lock. Nix's collector holds an exclusive flock on
//     <nix.state_dir>/gc.lock for its whole run; the agent holds a shared
//     one from before the swap until the new generation's paths are
//     registered and rooted, so a GC never sees them unregistered (it
//     would delete them as invalid) and never runs with a half-swapped
//     root.
//
// Paths that a GC hid before (whiteouts in the upper) are repaired before
// the overlay that shows their generation is built: the whiteout is
// removed and the path registered again (repairWhiteouts).

// rootName is the name part of the per-generation root path.
func rootName(gen uint64) string { return fmt.Sprintf("strata-generation-%d", gen) }

// isRootPath reports whether p is a generation's root path.
func isRootPath(p string) bool {
	n := filepath.Base(p)
	i := strings.IndexByte(n, '-')
	return i == 32 && strings.HasPrefix(n[i+1:], "strata-generation-")
}

// gcRootLink is the GC root symlink: <nix.state_dir>/gcroots/strata.
func (c Config) gcRootLink() string { return filepath.Join(c.NixStateDir, "gcroots", "strata") }

// logicalStoreDir is the store dir store paths are named in: store.dir,
// or /nix/store for a chroot store (nix.store set to a directory).
func (c Config) logicalStoreDir() string {
	if c.NixStore != "" {
		return "/nix/store"
	}
	return filepath.Clean(c.StoreDir)
}

// gcLock takes a shared flock on <nix.state_dir>/gc.lock, waiting while a
// garbage collection runs, and returns its release.
func (a *Agent) gcLock(ctx context.Context) (func(), error) {
	p := filepath.Join(a.cfg.NixStateDir, "gc.lock")
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return nil, fmt.Errorf("gc lock %s: %w", p, err)
	}
	fd, err := unix.Open(p, unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("gc lock %s: %w", p, err)
	}
	logged := false
	for {
		err := unix.Flock(fd, unix.LOCK_SH|unix.LOCK_NB)
		if err == nil {
			return func() { unix.Close(fd) }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			unix.Close(fd)
			return nil, fmt.Errorf("gc lock %s: %w", p, err)
		}
		if !logged {
			a.log.Info("waiting for a garbage collection to finish", "lock", p)
			logged = true
		}
		select {
		case <-ctx.Done():
			unix.Close(fd)
			return nil, fmt.Errorf("gc lock %s: %w", p, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// rootUpdate writes generation gen's root path (a small text file in the
// upper, named after the generation only) and returns the update that
// registers it with the import (nixstore.RootUpdate), replacing the root
// the GC root link names: with full its references become exactly the
// imported rows' paths; without, the previous root's row is renamed and
// only remove (paths that left) and the rows' paths change, so a rotation
// writes as many references as paths changed, not one per path of the
// generation.
func (a *Agent) rootUpdate(gen uint64, full bool, remove []string) (*nixstore.RootUpdate, error) {
	r, err := a.writeRoot(gen)
	if err != nil {
		return nil, err
	}
	prev, _ := os.Readlink(a.cfg.gcRootLink())
	if !isRootPath(prev) || prev == r.Path {
		prev = ""
	}
	return &nixstore.RootUpdate{Path: r.Path, NarHash: r.NarHash, NarSize: r.NarSize, Prev: prev, Full: full, Remove: remove}, nil
}

// writeRoot writes generation gen's root path file (nixstore.RootOf)
// into the store dir unless it is there already.
func (a *Agent) writeRoot(gen uint64) (nixstore.GenerationRoot, error) {
	r := nixstore.RootOf(a.cfg.logicalStoreDir(), gen)
	phys := filepath.Join(a.cfg.StoreDir, filepath.Base(r.Path))
	if b, err := os.ReadFile(phys); err != nil || string(b) != string(r.Content) {
		if err := writeStoreFile(phys, r.Content); err != nil {
			return r, fmt.Errorf("root generation %d: %w", gen, err)
		}
	}
	return r, nil
}

// importRooted registers rows (see load) and, in the same transaction,
// points generation gen's root path at them (see rootUpdate), then the GC
// root link at the root path. It returns how many paths it registered,
// those it skipped, and what status should say (skipped paths, a root
// that could not be made; the import itself succeeded). Call it with the
// GC lock held.
func (a *Agent) importRooted(ctx context.Context, gen uint64, rows *nixstore.Rows, full bool, remove []string) (int, []string, string, error) {
	root, rerr := a.rootUpdate(gen, full, remove)
	began := time.Now()
	n, skipped, err := a.load(ctx, rows, root)
	if err != nil {
		return 0, nil, "", err
	}
	a.met.imported(importRows, time.Since(began))
	msg := skippedError(gen, skipped)
	if rerr == nil {
		rerr = a.linkRoot(ctx, gen, root.Path)
	}
	if rerr != nil {
		a.log.Error("generation not rooted: a garbage collection may delete its paths", "generation", gen, "err", rerr)
		msg = strings.TrimPrefix(msg+"; "+rerr.Error(), "; ")
	}
	return n, skipped, msg, nil
}

// linkRoot points the GC root link at root path p (registered) and drops
// the earlier roots.
func (a *Agent) linkRoot(ctx context.Context, gen uint64, p string) error {
	link := a.cfg.gcRootLink()
	old, _ := os.Readlink(link)
	if old != p {
		if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
			return fmt.Errorf("root generation %d: %w", gen, err)
		}
		tmp := link + ".tmp"
		_ = os.Remove(tmp)
		if err := os.Symlink(p, tmp); err != nil {
			return fmt.Errorf("root generation %d: %w", gen, err)
		}
		if err := os.Rename(tmp, link); err != nil {
			os.Remove(tmp)
			return fmt.Errorf("root generation %d: %w", gen, err)
		}
	}
	a.log.Info("generation rooted for garbage collection", "generation", gen, "root", p, "link", link)
	a.dropOldRoots(ctx, p, old)
	return nil
}

// dropOldRoots invalidates and removes the root paths of earlier
// generations (they live in the upper, so the upper is listed, never the
// lowers).
func (a *Agent) dropOldRoots(ctx context.Context, keep, prev string) {
	var old []string
	if prev != "" && prev != keep && isRootPath(prev) {
		old = append(old, prev)
	}
	ents, _ := os.ReadDir(a.cfg.upperDir())
	for _, e := range ents {
		n := e.Name()
		if p := filepath.Join(a.cfg.logicalStoreDir(), n); isRootPath(n) && e.Type().IsRegular() && n != filepath.Base(keep) && p != prev {
			old = append(old, p)
		}
	}
	if len(old) == 0 {
		return
	}
	valid, refs, err := a.nix.Referrers(ctx, old)
	if err != nil {
		a.log.Warn("drop old generation roots", "err", err)
		return
	}
	var drop []string
	for _, p := range old {
		if len(refs[p]) == 0 {
			drop = append(drop, p)
		}
	}
	var inv []string
	for _, p := range drop {
		if valid[p] {
			inv = append(inv, p)
		}
	}
	if err := a.nix.Invalidate(ctx, inv); err != nil {
		a.log.Warn("drop old generation roots", "err", err)
		return
	}
	for _, p := range drop {
		if err := os.Remove(filepath.Join(a.cfg.StoreDir, filepath.Base(p))); err != nil && !errors.Is(err, fs.ErrNotExist) {
			a.log.Warn("remove old generation root", "path", p, "err", err)
		}
	}
}

// rooted reports whether the GC root names a valid root path.
func (a *Agent) rooted(ctx context.Context) bool {
	p, err := os.Readlink(a.cfg.gcRootLink())
	if err != nil || !isRootPath(p) {
		return false
	}
	valid, _, err := a.nix.Referrers(ctx, []string{p})
	return err == nil && valid[p]
}

// writeStoreFile writes a store file as Nix leaves one: mode 0444, mtime
// 1, through a temp file renamed into place.
func writeStoreFile(path string, b []byte) error {
	tmp := path + ".strata-tmp"
	if err := os.WriteFile(tmp, b, 0o444); err != nil {
		return err
	}
	t := time.Unix(1, 0)
	if err := os.Chtimes(tmp, t, t); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// narOfFile returns the base16 SHA-256 and size of the NAR serialisation
// of a non-executable regular file with contents b.
func narOfFile(b []byte) (string, uint64) { return nixstore.NarOfFile(b) }

// textPath is the store path Nix gives a text file with these contents and
// references (Store::makeTextPath).
func textPath(storeDir, name string, contents []byte, refs []string) string {
	return nixstore.TextPath(storeDir, name, contents, refs)
}

// repairWhiteouts removes the whiteouts in the upper whose name is one of
// paths' (paths hidden by a garbage collection before the generation was
// rooted), so the next overlay shows them from the generation again, and
// returns the paths repaired. Call it before building that overlay: an
// overlay already mounted may keep the name cached as absent.
func repairWhiteouts(upper string, paths []string) ([]string, error) {
	ents, err := os.ReadDir(upper)
	if err != nil {
		return nil, fmt.Errorf("look for whiteouts in %s: %w", upper, err)
	}
	wh := map[string]bool{}
	for _, e := range ents {
		if e.Type()&fs.ModeCharDevice != 0 && isWhiteout(filepath.Join(upper, e.Name())) {
			wh[e.Name()] = true
		}
	}
	if len(wh) == 0 {
		return nil, nil
	}
	var fixed []string
	for _, p := range paths {
		n := filepath.Base(p)
		if !wh[n] {
			continue
		}
		if err := os.Remove(filepath.Join(upper, n)); err != nil {
			return fixed, fmt.Errorf("remove whiteout of %s: %w", p, err)
		}
		fixed = append(fixed, p)
	}
	return fixed, nil
}

// load registers rows (only paths not valid yet) and returns how many it
// registered. When Nix refuses them and some are not readable under the
// store dir (hidden by a whiteout that could not be repaired, missing from
// a lower), those and every path that refers to them are skipped and the
// rest registered: an import never wedges on a path that vanished
// locally. The skipped paths are returned; the caller reports them.
func (a *Agent) load(ctx context.Context, rows *nixstore.Rows, root *nixstore.RootUpdate) (int, []string, error) {
	n, err := a.nix.Load(ctx, rows, root)
	if err == nil {
		return n, nil, nil
	}
	bad := map[string]bool{}
	for _, r := range rows.Paths {
		if _, lerr := os.Lstat(filepath.Join(a.cfg.StoreDir, filepath.Base(r.Path))); lerr != nil {
			bad[r.Path] = true
		}
	}
	if len(bad) == 0 {
		return 0, nil, err
	}
	for changed := true; changed; {
		changed = false
		for _, r := range rows.Paths {
			if bad[r.Path] {
				continue
			}
			for _, ref := range r.References {
				if bad[ref] {
					bad[r.Path], changed = true, true
					break
				}
			}
		}
	}
	keep := &nixstore.Rows{}
	for _, r := range rows.Paths {
		if !bad[r.Path] {
			keep.Paths = append(keep.Paths, r)
		}
	}
	for _, re := range rows.Realisations {
		if !bad[re.OutPath] {
			keep.Realisations = append(keep.Realisations, re)
		}
	}
	skipped := make([]string, 0, len(bad))
	for p := range bad {
		skipped = append(skipped, p)
	}
	slices.Sort(skipped)
	a.log.Error("skipping paths that are not readable on this builder, and the paths that refer to them",
		"count", len(skipped), "paths", firstFew(skipped), "load_error", err)
	n, err2 := a.nix.Load(ctx, keep, root)
	if err2 != nil {
		return 0, nil, fmt.Errorf("%w (and without the %d unreadable paths: %v)", err, len(skipped), err2)
	}
	return n, skipped, nil
}

// skippedError is what status shows after an import that skipped paths.
func skippedError(gen uint64, skipped []string) string {
	if len(skipped) == 0 {
		return ""
	}
	return fmt.Sprintf("generation %d: %d paths are not readable on this builder and were not registered (with the paths that refer to them): %s",
		gen, len(skipped), firstFew(skipped))
}

func firstFew(ps []string) string {
	if len(ps) <= 3 {
		return strings.Join(ps, ", ")
	}
	return strings.Join(ps[:3], ", ") + fmt.Sprintf(" and %d more", len(ps)-3)
}

// repairHidden removes the whiteouts in the upper that hide a path of the
// generation mounted at lowerDir (a garbage collection before the
// generation was rooted deleted it) and returns those paths. One lookup
// in the lower per whiteout; none without whiteouts.
func (a *Agent) repairHidden(lowerDir string) ([]string, error) {
	upper := a.cfg.upperDir()
	ents, err := os.ReadDir(upper)
	if err != nil {
		return nil, fmt.Errorf("look for whiteouts in %s: %w", upper, err)
	}
	var hidden []string
	for _, e := range ents {
		if e.Type()&fs.ModeCharDevice == 0 || !isWhiteout(filepath.Join(upper, e.Name())) {
			continue
		}
		if _, err := os.Lstat(filepath.Join(lowerDir, e.Name())); err == nil {
			hidden = append(hidden, filepath.Join(a.cfg.logicalStoreDir(), e.Name()))
		}
	}
	if len(hidden) == 0 {
		return nil, nil
	}
	fixed, err := repairWhiteouts(upper, hidden)
	if len(fixed) > 0 {
		a.log.Warn("removed whiteouts that hid generation paths (deleted by an earlier garbage collection); they are registered again",
			"count", len(fixed), "paths", firstFew(fixed))
	}
	return fixed, err
}

func pathsOf(infos []nixstore.PathInfo) []string {
	out := make([]string, len(infos))
	for i := range infos {
		out[i] = infos[i].Path
	}
	return out
}

func rowPaths(rows *nixstore.Rows) []string {
	out := make([]string, len(rows.Paths))
	for i := range rows.Paths {
		out[i] = rows.Paths[i].Path
	}
	return out
}
