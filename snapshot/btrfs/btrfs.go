// Package btrfs is the snapshot.Backend for a central store on a btrfs
// subvolume. It drives the btrfs-progs CLI (no cgo) for every change and
// reads subvolume facts with two read-only ioctls.
//
// Layout: root is a subvolume root holding store/ and var/nix/db/ in that
// same subvolume, so one snapshot captures files and database together.
// Generation N is the read-only snapshot snapshotDir/strata-N, made with
// `btrfs subvolume snapshot -r`, and that directory is its Path. snapshotDir
// is a directory on the same btrfs filesystem, outside root.
//
// Crash safety: a snapshot is taken writable under the temporary name
// snapshotDir/.tmp-strata-N, the labels given to Create are written as
// user.strata.<key> xattrs of its root directory (so they are inside the
// snapshot and travel with btrfs send), it is made read-only (`btrfs
// property set ro true`) and only then renamed (RENAME_NOREPLACE) to
// strata-N, then the directory is fsynced. List never shows a temporary
// name; New deletes leftovers from a crash. List shows only read-only
// subvolume roots named strata-N: a plain directory or writable subvolume
// of that name made by hand is skipped with a warning.
//
// A read-only snapshot is never made writable again: that would change it
// under incremental sends that use it as parent (btrfs receive then fails,
// e.g. removing an xattr its copy never had). SetLabels therefore writes
// its changes to snapshotDir/strata-N.labels beside the snapshot (JSON,
// written atomically), tied to the snapshot's subvolume UUID so that a
// file left over from a snapshot of the same name deleted by hand is
// ignored; Destroy removes it, and so does RemoveLabels for a snapshot
// that is gone (the server forgets its generation). A snapshot's labels are its xattrs with
// that file's changes on top.
package btrfs

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"

	"github.com/strata-nix/strata/internal/atomicfile"
	"github.com/strata-nix/strata/mountinfo"

	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/snapshot"
)

// tmpPrefix starts the name of a snapshot that is still being made.
const tmpPrefix = ".tmp-"

// Backend snapshots one central store on btrfs. It is safe for concurrent
// use; Create and Destroy are serialised.
type Backend struct {
	root    string
	snapDir string
	log     *slog.Logger
	mu      sync.Mutex
	// inspect: opened by Inspect, nothing may change.
	inspect bool
}

// xattrPrefix starts the name of every label xattr.
const xattrPrefix = "user.strata."

// errInspect is returned by every change through a Backend made by Inspect.
var errInspect = errors.New("backend opened by Inspect changes nothing")

var _ snapshot.Backend = (*Backend)(nil)

// New returns the backend for the central store at root whose snapshots
// live in snapshotDir (created if missing). It fails, wrapping
// snapshot.ErrUnsupported and naming the offending path, when root is not on
// btrfs, root is not a subvolume root, store/ or var/nix/db (or var, var/nix)
// is missing, not a directory, a nested subvolume or a mount point, or
// snapshotDir is not on the same btrfs filesystem or lies inside root.
// It deletes half-made snapshots (.tmp-strata-N) left by a crash.
func New(root, snapshotDir string, log *slog.Logger) (*Backend, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var err error
	if root, err = realDir(root); err != nil {
		return nil, fmt.Errorf("btrfs store root: %w", err)
	}
	if err := checkRoot(root); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(snapshotDir, 0o755); err != nil {
		return nil, fmt.Errorf("btrfs snapshot dir: %w", err)
	}
	if snapshotDir, err = realDir(snapshotDir); err != nil {
		return nil, fmt.Errorf("btrfs snapshot dir: %w", err)
	}
	if err := checkSnapDir(root, snapshotDir); err != nil {
		return nil, err
	}
	b := &Backend{root: root, snapDir: snapshotDir, log: log.With("backend", "btrfs", "root", root)}
	if err := b.removeLeftovers(context.Background()); err != nil {
		return nil, err
	}
	return b, nil
}

// Inspect returns a backend over the same layout as New that changes
// nothing: it checks root and snapshotDir the way New does, but does not
// create snapshotDir (a missing one is an error wrapping fs.ErrNotExist),
// does not delete leftovers, and its Create, SetLabels and
// Destroy fail. `strata server --check-config` uses it.
func Inspect(root, snapshotDir string, log *slog.Logger) (*Backend, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var err error
	if root, err = realDir(root); err != nil {
		return nil, fmt.Errorf("btrfs store root: %w", err)
	}
	if err := checkRoot(root); err != nil {
		return nil, err
	}
	if snapshotDir, err = realDir(snapshotDir); err != nil {
		return nil, fmt.Errorf("btrfs snapshot dir: %w", err)
	}
	if err := checkSnapDir(root, snapshotDir); err != nil {
		return nil, err
	}
	return &Backend{root: root, snapDir: snapshotDir, inspect: true, log: log.With("backend", "btrfs", "root", root)}, nil
}

// CheckRoot checks root the way New does (a btrfs subvolume root holding
// store/ and var/nix/db/ in that subvolume), changing nothing.
func CheckRoot(root string) error {
	root, err := realDir(root)
	if err != nil {
		return fmt.Errorf("btrfs store root: %w", err)
	}
	return checkRoot(root)
}

// realDir returns the absolute, symlink-free form of dir.
func realDir(dir string) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	return filepath.EvalSymlinks(abs)
}

func unsupported(path, format string, args ...any) error {
	return fmt.Errorf("btrfs %s: %s: %w", path, fmt.Sprintf(format, args...), snapshot.ErrUnsupported)
}

func checkRoot(root string) error {
	var sfs unix.Statfs_t
	if err := unix.Statfs(root, &sfs); err != nil {
		return fmt.Errorf("btrfs statfs %s: %w", root, err)
	}
	if uint32(sfs.Type) != superMagic {
		return unsupported(root, "store root is not on btrfs (filesystem magic %#x)", uint32(sfs.Type))
	}
	var st unix.Stat_t
	if err := unix.Lstat(root, &st); err != nil {
		return fmt.Errorf("btrfs stat %s: %w", root, err)
	}
	if st.Ino != firstFreeObjectID {
		return unsupported(root, "store root is not a subvolume root (inode %d, want %d); make it with `btrfs subvolume create`", st.Ino, firstFreeObjectID)
	}
	mounts, err := mountPoints()
	if err != nil {
		return err
	}
	for _, rel := range []string{"store", "var", "var/nix", "var/nix/db"} {
		p := filepath.Join(root, rel)
		var cst unix.Stat_t
		if err := unix.Lstat(p, &cst); err != nil {
			return unsupported(p, "store root must hold store/ and var/nix/db/: %v", err)
		}
		if cst.Mode&unix.S_IFMT != unix.S_IFDIR {
			return unsupported(p, "not a directory")
		}
		if cst.Dev != st.Dev || cst.Ino == firstFreeObjectID {
			return unsupported(p, "is a nested subvolume or another filesystem, not part of the store root's subvolume %s (a snapshot would not capture it)", root)
		}
		if mounts[p] {
			return unsupported(p, "is a mount point, not part of the store root's subvolume %s (a snapshot would not capture it)", root)
		}
	}
	return nil
}

func checkSnapDir(root, dir string) error {
	var sfs unix.Statfs_t
	if err := unix.Statfs(dir, &sfs); err != nil {
		return fmt.Errorf("btrfs statfs %s: %w", dir, err)
	}
	if uint32(sfs.Type) != superMagic {
		return unsupported(dir, "snapshot dir is not on btrfs (filesystem magic %#x)", uint32(sfs.Type))
	}
	rootFS, err := fsID(root)
	if err != nil {
		return err
	}
	dirFS, err := fsID(dir)
	if err != nil {
		return err
	}
	if rootFS != dirFS {
		return unsupported(dir, "snapshot dir is on another btrfs filesystem than store root %s", root)
	}
	if rel, err := filepath.Rel(root, dir); err == nil && rel != ".." && !strings.HasPrefix(rel, "../") {
		return unsupported(dir, "snapshot dir is inside store root %s (every snapshot would show the older ones)", root)
	}
	return nil
}

// mountPoints returns the mount points of this mount namespace.
func mountPoints() (map[string]bool, error) {
	ms, err := mountinfo.Read()
	if err != nil {
		return nil, err
	}
	m := make(map[string]bool, len(ms))
	for _, x := range ms {
		m[x.Mountpoint] = true
	}
	return m, nil
}

// Kind returns "btrfs".
func (b *Backend) Kind() string { return "btrfs" }

// Root returns the central store root (absolute, symlinks resolved).
func (b *Backend) Root() string { return b.root }

// SnapshotDir returns the directory holding the snapshots.
func (b *Backend) SnapshotDir() string { return b.snapDir }

func (b *Backend) path(id uint64) string { return filepath.Join(b.snapDir, snapshot.Name(id)) }

// Create takes the read-only snapshot snapshotDir/strata-N of the store
// root. It fails with snapshot.ErrExists if anything named strata-N exists.
func (b *Backend) Create(ctx context.Context, id uint64, labels snapshot.Labels) (snapshot.Snapshot, error) {
	if err := snapshot.ValidID(id); err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs create: %w", err)
	}
	if err := snapshot.CheckLabels(labels); err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs create %s: %w", snapshot.Name(id), err)
	}
	if b.inspect {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs create %s: %w", snapshot.Name(id), errInspect)
	}
	if b.root == "" {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs create %s: a replica receives its snapshots and takes none", snapshot.Name(id))
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	name := snapshot.Name(id)
	final := b.path(id)
	if _, err := os.Lstat(final); err == nil {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs create %s: %w", final, snapshot.ErrExists)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs create %s: %w", final, err)
	}
	tmp := filepath.Join(b.snapDir, tmpPrefix+name)
	if err := b.removeTmp(ctx, tmp); err != nil {
		return snapshot.Snapshot{}, err
	}
	if err := ctx.Err(); err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs create %s: %w", final, err)
	}
	if err := b.run(ctx, "subvolume", "snapshot", b.root, tmp); err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs create %s: %w", final, err)
	}
	// From here on the snapshot exists under its temporary name; it must
	// become strata-N or disappear. Cleanup ignores ctx: a cancelled
	// caller must not leave a half-made snapshot behind.
	if err := b.sealTmp(context.WithoutCancel(ctx), tmp, labels); err != nil {
		if derr := b.run(context.WithoutCancel(ctx), "subvolume", "delete", tmp); derr != nil {
			b.log.Error("remove half-made snapshot", "path", tmp, "err", derr)
		}
		return snapshot.Snapshot{}, fmt.Errorf("btrfs create %s: %w", final, err)
	}
	if err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, final, unix.RENAME_NOREPLACE); err != nil {
		if derr := b.run(context.WithoutCancel(ctx), "subvolume", "delete", tmp); derr != nil {
			b.log.Error("remove half-made snapshot", "path", tmp, "err", derr)
		}
		if errors.Is(err, unix.EEXIST) {
			return snapshot.Snapshot{}, fmt.Errorf("btrfs create %s: %w", final, snapshot.ErrExists)
		}
		return snapshot.Snapshot{}, fmt.Errorf("btrfs create %s: rename %s: %w", final, tmp, err)
	}
	if err := syncDir(b.snapDir); err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs create %s: %w", final, err)
	}
	info, err := getSubvolInfo(final)
	if err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs create %s: %w", final, err)
	}
	if !info.ReadOnly {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs create %s: snapshot is not read-only", final)
	}
	got, err := readLabels(final)
	if err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs create %s: %w", final, err)
	}
	b.log.Info("snapshot created", "id", id, "path", final)
	return snapshot.Snapshot{ID: id, Name: name, Path: final, Created: info.Created, Labels: got}, nil
}

// sealTmp writes labels into the writable snapshot at tmp and makes it
// read-only.
func (b *Backend) sealTmp(ctx context.Context, tmp string, labels snapshot.Labels) error {
	// A snapshot of a root that itself carries labels would inherit them.
	if err := clearLabels(tmp); err != nil {
		return err
	}
	if err := writeLabels(tmp, labels); err != nil {
		return err
	}
	return b.run(ctx, "property", "set", "-t", "subvol", tmp, "ro", "true")
}

// writeLabels sets (non-empty value) or removes (empty value) labels as
// xattrs of dir.
func writeLabels(dir string, labels snapshot.Labels) error {
	for k, v := range labels {
		name := xattrPrefix + k
		if v == "" {
			if err := unix.Removexattr(dir, name); err != nil && !errors.Is(err, unix.ENODATA) {
				return fmt.Errorf("remove label %s of %s: %w", k, dir, err)
			}
			continue
		}
		if err := unix.Setxattr(dir, name, []byte(v), 0); err != nil {
			return fmt.Errorf("set label %s of %s: %w", k, dir, err)
		}
	}
	return nil
}

// clearLabels removes every label xattr of dir.
func clearLabels(dir string) error {
	l, err := readXattrLabels(dir)
	if err != nil {
		return err
	}
	for k := range l {
		l[k] = ""
	}
	return writeLabels(dir, l)
}

// sidecar is the file strata-N.labels: label changes made after the
// snapshot became read-only.
type sidecar struct {
	// UUID is the subvolume UUID of the snapshot the changes belong to.
	UUID string `json:"subvolume_uuid"`
	// Labels are the changes; an empty value removes an xattr label.
	Labels snapshot.Labels `json:"labels"`
}

func sidecarPath(snap string) string { return snap + ".labels" }

// readSidecar returns the changes recorded for the snapshot at snap, whose
// subvolume UUID is uuid; none if there is no file or it belongs to
// another subvolume.
func readSidecar(snap string, uuid [16]byte) (snapshot.Labels, error) {
	b, err := os.ReadFile(sidecarPath(snap))
	if errors.Is(err, fs.ErrNotExist) {
		return snapshot.Labels{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read labels %s: %w", sidecarPath(snap), err)
	}
	var sc sidecar
	if err := json.Unmarshal(b, &sc); err != nil {
		return nil, fmt.Errorf("read labels %s: %w", sidecarPath(snap), err)
	}
	if sc.UUID != hex.EncodeToString(uuid[:]) || sc.Labels == nil {
		return snapshot.Labels{}, nil
	}
	return sc.Labels, nil
}

// readLabels returns the labels of the snapshot (or half-made snapshot) at
// dir: its xattrs with the changes of its strata-N.labels on top. Never
// nil.
func readLabels(dir string) (snapshot.Labels, error) {
	l, err := readXattrLabels(dir)
	if err != nil {
		return nil, err
	}
	if _, err := os.Lstat(sidecarPath(dir)); errors.Is(err, fs.ErrNotExist) {
		return l, nil
	}
	info, err := getSubvolInfo(dir)
	if err != nil {
		return nil, err
	}
	changes, err := readSidecar(dir, info.UUID)
	if err != nil {
		return nil, err
	}
	for k, v := range changes {
		if v == "" {
			delete(l, k)
		} else {
			l[k] = v
		}
	}
	return l, nil
}

// readXattrLabels returns the label xattrs of dir (never nil).
func readXattrLabels(dir string) (snapshot.Labels, error) {
	out := snapshot.Labels{}
	buf := make([]byte, 4096)
	n, err := unix.Listxattr(dir, buf)
	if errors.Is(err, unix.ERANGE) {
		if n, err = unix.Listxattr(dir, nil); err == nil {
			buf = make([]byte, n)
			n, err = unix.Listxattr(dir, buf)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("list labels of %s: %w", dir, err)
	}
	for _, name := range strings.Split(string(buf[:n]), "\x00") {
		k, ok := strings.CutPrefix(name, xattrPrefix)
		if !ok || k == "" {
			continue
		}
		v := make([]byte, snapshot.MaxLabelValue+1)
		m, err := unix.Getxattr(dir, name, v)
		if errors.Is(err, unix.ERANGE) { // set by hand, longer than strata writes
			if m, err = unix.Getxattr(dir, name, nil); err == nil {
				v = make([]byte, m)
				m, err = unix.Getxattr(dir, name, v)
			}
		}
		if err != nil {
			return nil, fmt.Errorf("read label %s of %s: %w", k, dir, err)
		}
		out[k] = string(v[:m])
	}
	return out, nil
}

// SetLabels changes generation id's labels by recording the changes in
// snapshotDir/strata-N.labels (written to a temp file, synced, renamed);
// the snapshot itself, read-only, is not touched.
func (b *Backend) SetLabels(ctx context.Context, id uint64, labels snapshot.Labels) error {
	if err := snapshot.ValidID(id); err != nil {
		return fmt.Errorf("btrfs set labels: %w", err)
	}
	p := b.path(id)
	if err := snapshot.CheckLabels(labels); err != nil {
		return fmt.Errorf("btrfs set labels %s: %w", p, err)
	}
	if b.inspect {
		return fmt.Errorf("btrfs set labels %s: %w", p, errInspect)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, err := os.Lstat(p); errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("btrfs set labels %s: %w", p, snapshot.ErrNotFound)
	}
	info, err := b.snapshotInfo(p)
	if err != nil {
		return fmt.Errorf("btrfs set labels %s: %w", p, err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("btrfs set labels %s: %w", p, err)
	}
	changes, err := readSidecar(p, info.UUID)
	if err != nil {
		return fmt.Errorf("btrfs set labels: %w", err)
	}
	maps.Copy(changes, labels)
	data, err := json.MarshalIndent(sidecar{UUID: hex.EncodeToString(info.UUID[:]), Labels: changes}, "", "  ")
	if err != nil {
		return fmt.Errorf("btrfs set labels %s: %w", p, err)
	}
	if err := atomicfile.WriteFile(sidecarPath(p), append(data, '\n'), 0o644); err != nil {
		return fmt.Errorf("btrfs set labels %s: %w", p, err)
	}
	if err := syncDir(b.snapDir); err != nil {
		return fmt.Errorf("btrfs set labels %s: %w", p, err)
	}
	b.log.Debug("snapshot labels set", "id", id, "labels", labels)
	return nil
}

// List returns the read-only subvolumes named strata-N in snapshotDir,
// ordered by N.
func (b *Backend) List(ctx context.Context) ([]snapshot.Snapshot, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("btrfs list %s: %w", b.snapDir, err)
	}
	entries, err := os.ReadDir(b.snapDir)
	if err != nil {
		return nil, fmt.Errorf("btrfs list %s: %w", b.snapDir, err)
	}
	var out []snapshot.Snapshot
	for _, e := range entries {
		id, ok := snapshot.ParseName(e.Name())
		if !ok {
			continue
		}
		p := filepath.Join(b.snapDir, e.Name())
		info, err := b.snapshotInfo(p)
		if err != nil {
			b.log.Warn("not listing snapshot", "path", p, "err", err)
			continue
		}
		labels, err := readLabels(p)
		if err != nil {
			return nil, fmt.Errorf("btrfs list %s: %w", b.snapDir, err)
		}
		out = append(out, snapshot.Snapshot{ID: id, Name: e.Name(), Path: p, Created: info.Created, Labels: labels})
	}
	slices.SortFunc(out, func(a, b snapshot.Snapshot) int {
		switch {
		case a.ID < b.ID:
			return -1
		case a.ID > b.ID:
			return 1
		}
		return 0
	})
	return out, nil
}

// snapshotInfo checks that p is a read-only subvolume root and describes it.
func (b *Backend) snapshotInfo(p string) (subvolInfo, error) {
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		return subvolInfo{}, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR || st.Ino != firstFreeObjectID {
		return subvolInfo{}, errors.New("not a btrfs subvolume")
	}
	info, err := getSubvolInfo(p)
	if err != nil {
		return subvolInfo{}, err
	}
	if !info.ReadOnly {
		return subvolInfo{}, errors.New("subvolume is not read-only")
	}
	return info, nil
}

// Destroy deletes generation id's snapshot with `btrfs subvolume delete`
// and waits for the deletion to be committed.
func (b *Backend) Destroy(ctx context.Context, id uint64) error {
	if err := snapshot.ValidID(id); err != nil {
		return fmt.Errorf("btrfs destroy: %w", err)
	}
	if b.inspect {
		return fmt.Errorf("btrfs destroy %s: %w", b.path(id), errInspect)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	p := b.path(id)
	if _, err := os.Lstat(p); errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("btrfs destroy %s: %w", p, snapshot.ErrNotFound)
	}
	if _, err := b.snapshotInfo(p); err != nil {
		return fmt.Errorf("btrfs destroy %s: refusing: %w", p, err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("btrfs destroy %s: %w", p, err)
	}
	if err := b.run(ctx, "subvolume", "delete", "--commit-after", p); err != nil {
		return fmt.Errorf("btrfs destroy %s: %w", p, err)
	}
	if err := os.Remove(sidecarPath(p)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		b.log.Warn("remove labels file of destroyed snapshot", "path", sidecarPath(p), "err", err)
	}
	b.log.Info("snapshot destroyed", "id", id, "path", p)
	return nil
}

// RemoveLabels removes strata-N.labels of generation id, whose snapshot is
// gone (the server forgets the generation): nothing else reads it, and a
// snapshot of that name made later has another subvolume UUID, which
// ignores it. While a snapshot strata-N exists (one List skipped, or one
// received since) its labels file is its own and is kept: an error.
func (b *Backend) RemoveLabels(ctx context.Context, id uint64) error {
	if err := snapshot.ValidID(id); err != nil {
		return fmt.Errorf("btrfs remove labels: %w", err)
	}
	p := b.path(id)
	if b.inspect {
		return fmt.Errorf("btrfs remove labels %s: %w", sidecarPath(p), errInspect)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("btrfs remove labels %s: %w", sidecarPath(p), err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("btrfs remove labels %s: refusing: %s exists", sidecarPath(p), p)
	}
	err := os.Remove(sidecarPath(p))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("btrfs remove labels: %w", err)
	}
	if err := syncDir(b.snapDir); err != nil {
		return fmt.Errorf("btrfs remove labels %s: %w", sidecarPath(p), err)
	}
	b.log.Info("labels file of a forgotten generation removed", "id", id, "path", sidecarPath(p))
	return nil
}

// removeLeftovers deletes the temporary snapshots of Creates that a crash
// interrupted.
func (b *Backend) removeLeftovers(ctx context.Context) error {
	entries, err := os.ReadDir(b.snapDir)
	if err != nil {
		return fmt.Errorf("btrfs read %s: %w", b.snapDir, err)
	}
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), tmpPrefix)
		if _, isOurs := snapshot.ParseName(rest); !ok || !isOurs {
			continue
		}
		if err := b.removeTmp(ctx, filepath.Join(b.snapDir, e.Name())); err != nil {
			return err
		}
	}
	return nil
}

// removeTmp deletes a half-made snapshot at tmp, if there is one.
func (b *Backend) removeTmp(ctx context.Context, tmp string) error {
	var st unix.Stat_t
	if err := unix.Lstat(tmp, &st); errors.Is(err, unix.ENOENT) {
		return nil
	} else if err != nil {
		return fmt.Errorf("btrfs stat %s: %w", tmp, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR || st.Ino != firstFreeObjectID {
		return fmt.Errorf("btrfs remove half-made snapshot %s: not a subvolume, remove it by hand", tmp)
	}
	b.log.Warn("removing half-made snapshot from an interrupted create", "path", tmp)
	if err := b.run(ctx, "subvolume", "delete", tmp); err != nil {
		return fmt.Errorf("btrfs remove half-made snapshot %s: %w", tmp, err)
	}
	return nil
}

// run runs btrfs(8) and returns its output in the error when it fails.
func (b *Backend) run(ctx context.Context, args ...string) error {
	cmd := exec.CommandContext(ctx, "btrfs", args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("btrfs %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	b.log.Debug("btrfs", "args", args)
	return nil
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil && !errors.Is(err, syscall.EINVAL) {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}
