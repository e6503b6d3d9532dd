// Package zfs is the snapshot.Backend for a central store on a ZFS
// filesystem dataset. It is the only importer of github.com/mistifyio/go-zfs.
//
// Generation N is the snapshot dataset@strata-N. Its files are served from
// an explicit read-only mount, `mount -t zfs -o ro dataset@strata-N
// mountDir/strata-N`, which is the Snapshot's Path, and never from the
// .zfs/snapshot automount: a ZFS file handle does not name its snapshot, so
// the NFS export needs a mount of its own per generation, and unmounting an
// automounted snapshot by hand breaks it until the pool is re-imported
// (OpenZFS #4514). List mounts any strata snapshot that is not mounted (after
// a reboot, say); Destroy unmounts it, then destroys it.
//
// Labels (snapshot.Labels) are user properties strata:<key> of the
// snapshot, set right after `zfs snapshot` and read back by List with one
// `zfs get` over every snapshot of the dataset. They travel with `zfs send
// -p`.
//
// go-zfs takes no context: ctx is checked before each call, and zfs's stderr
// (from *zfs.Error, kept in the error chain) is put into returned errors.
// Besides go-zfs the backend runs `zfs get -Hp creation` (go-zfs has no
// creation time, and its GetProperty prints the locale's date format),
// mount(8) and umount(8): the host needs zfs, mount and umount on PATH.
package zfs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/strata-nix/strata/mountinfo"

	gozfs "github.com/mistifyio/go-zfs/v3"

	"github.com/strata-nix/strata/snapshot"
)

// Backend snapshots one ZFS filesystem dataset. It is safe for concurrent
// use; Create, List and Destroy are serialised.
type Backend struct {
	dataset  string
	mountDir string
	// replica: snapshots only arrive by Receive; the dataset may not exist.
	replica bool
	log     *slog.Logger
	mu      sync.Mutex
	// mountinfo is the mount table read to find snapshot mounts.
	mountinfo string
	// inspect: opened by Inspect, nothing may change.
	inspect bool
}

// propPrefix starts the name of every label's user property.
const propPrefix = "strata:"

// errInspect is returned by every change through a Backend made by Inspect.
var errInspect = errors.New("backend opened by Inspect changes nothing")

var _ snapshot.Backend = (*Backend)(nil)

// New returns the backend for the filesystem dataset (e.g. "tank/nix")
// whose snapshots are mounted under mountDir (created if missing). It fails,
// wrapping snapshot.ErrUnsupported, when the dataset does not exist or is not
// a filesystem, when a child dataset is mounted on its store/ or var/ (one
// snapshot would not capture it), or, if the dataset has a mountpoint, when
// store/ or var/nix/db is missing there or mountDir lies inside it.
func New(dataset, mountDir string, log *slog.Logger) (*Backend, error) {
	b, err := open(dataset, mountDir, log)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(b.mountDir, 0o755); err != nil {
		return nil, fmt.Errorf("zfs mount dir: %w", err)
	}
	return b, nil
}

// Inspect returns a backend over the same dataset as New that changes
// nothing: it checks the layout the way New does but does not create
// mountDir, its List mounts nothing (a Path may then be unreadable), and its
// Create, SetLabels and Destroy fail. `strata server --check-config` uses it.
func Inspect(dataset, mountDir string, log *slog.Logger) (*Backend, error) {
	b, err := open(dataset, mountDir, log)
	if err != nil {
		return nil, err
	}
	b.inspect = true
	return b, nil
}

// open checks what New and Inspect both require (a filesystem dataset whose
// layout one snapshot captures) and returns the backend, changing nothing.
func open(dataset, mountDir string, log *slog.Logger) (*Backend, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if dataset == "" || strings.ContainsAny(dataset, "@#") || strings.HasPrefix(dataset, "/") {
		return nil, fmt.Errorf("zfs dataset %q: not a filesystem dataset name: %w", dataset, snapshot.ErrUnsupported)
	}
	ds, err := gozfs.GetDataset(dataset)
	if err != nil {
		return nil, fmt.Errorf("zfs dataset %s: %w: %w", dataset, snapshot.ErrUnsupported, zfsErr("zfs list", dataset, err))
	}
	if ds.Type != gozfs.DatasetFilesystem {
		return nil, fmt.Errorf("zfs dataset %s: is a %s, not a filesystem: %w", dataset, ds.Type, snapshot.ErrUnsupported)
	}
	if mountDir, err = filepath.Abs(mountDir); err != nil {
		return nil, fmt.Errorf("zfs mount dir: %w", err)
	}
	if err := checkLayout(ds, mountDir); err != nil {
		return nil, err
	}
	return &Backend{
		dataset:   dataset,
		mountDir:  mountDir,
		log:       log.With("backend", "zfs", "dataset", dataset),
		mountinfo: "/proc/self/mountinfo",
	}, nil
}

// within reports whether p is dir or below it.
func within(p, dir string) bool {
	rel, err := filepath.Rel(dir, p)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

func checkLayout(ds *gozfs.Dataset, mountDir string) error {
	all, err := gozfs.Filesystems(ds.Name)
	if err != nil {
		return zfsErr("zfs list", ds.Name, err)
	}
	mp := ds.Mountpoint
	if !filepath.IsAbs(mp) {
		// legacy or none: mounted elsewhere by fstab, nothing to check.
		return nil
	}
	for _, c := range all {
		if c.Name == ds.Name || !filepath.IsAbs(c.Mountpoint) {
			continue
		}
		if within(c.Mountpoint, filepath.Join(mp, "store")) || within(c.Mountpoint, filepath.Join(mp, "var")) {
			return fmt.Errorf("zfs dataset %s: child dataset %s is mounted at %s inside the store (a snapshot of %s would not capture it): %w",
				ds.Name, c.Name, c.Mountpoint, ds.Name, snapshot.ErrUnsupported)
		}
	}
	for _, rel := range []string{"store", "var/nix/db"} {
		p := filepath.Join(mp, rel)
		if st, err := os.Stat(p); err != nil || !st.IsDir() {
			return fmt.Errorf("zfs dataset %s: %s: store root must hold store/ and var/nix/db/ (is the dataset mounted?): %w", ds.Name, p, snapshot.ErrUnsupported)
		}
	}
	if within(mountDir, mp) {
		return fmt.Errorf("zfs mount dir %s: inside dataset %s's mountpoint %s: %w", mountDir, ds.Name, mp, snapshot.ErrUnsupported)
	}
	return nil
}

// Kind returns "zfs".
func (b *Backend) Kind() string { return "zfs" }

// Dataset returns the central store's dataset name.
func (b *Backend) Dataset() string { return b.dataset }

// MountDir returns the directory under which snapshots are mounted.
func (b *Backend) MountDir() string { return b.mountDir }

func (b *Backend) full(name string) string { return b.dataset + "@" + name }

// Create takes the snapshot dataset@strata-N and mounts it read-only at
// mountDir/strata-N. If mounting fails the snapshot is destroyed again, so a
// failed Create leaves nothing behind.
func (b *Backend) Create(ctx context.Context, id uint64, labels snapshot.Labels) (snapshot.Snapshot, error) {
	if err := snapshot.ValidID(id); err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("zfs create: %w", err)
	}
	if b.replica {
		return snapshot.Snapshot{}, fmt.Errorf("zfs create %s: a replica receives its snapshots and takes none", b.full(snapshot.Name(id)))
	}
	name := snapshot.Name(id)
	full := b.full(name)
	if err := snapshot.CheckLabels(labels); err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("zfs create %s: %w", full, err)
	}
	if b.inspect {
		return snapshot.Snapshot{}, fmt.Errorf("zfs create %s: %w", full, errInspect)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	existing, err := b.snapshots(ctx)
	if err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("zfs create %s: %w", full, err)
	}
	if _, ok := existing[id]; ok {
		return snapshot.Snapshot{}, fmt.Errorf("zfs create %s: %w", full, snapshot.ErrExists)
	}
	if err := ctx.Err(); err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("zfs create %s: %w", full, err)
	}
	ds := &gozfs.Dataset{Name: b.dataset, Type: gozfs.DatasetFilesystem}
	if _, err := ds.Snapshot(name, false); err != nil {
		err = zfsErr("zfs snapshot", full, err)
		if strings.Contains(err.Error(), "dataset already exists") {
			return snapshot.Snapshot{}, fmt.Errorf("%w: %w", snapshot.ErrExists, err)
		}
		return snapshot.Snapshot{}, err
	}
	// The snapshot exists: it must end up mounted or destroyed. Cleanup
	// ignores ctx, a cancelled caller must not leave it behind.
	set := snapshot.Labels{}
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		if labels[k] != "" {
			set[k] = labels[k]
		}
	}
	created, path, err := b.finishCreate(ctx, name, set)
	if err != nil {
		if derr := b.destroy(context.WithoutCancel(ctx), name, path); derr != nil {
			b.log.Error("destroy snapshot after failed create", "snapshot", full, "err", derr)
		}
		return snapshot.Snapshot{}, fmt.Errorf("zfs create %s: %w", full, err)
	}
	b.log.Info("snapshot created", "id", id, "snapshot", full, "path", path)
	return snapshot.Snapshot{ID: id, Name: name, Path: path, Created: created, Labels: set}, nil
}

func (b *Backend) finishCreate(ctx context.Context, name string, labels snapshot.Labels) (time.Time, string, error) {
	if err := b.setLabels(ctx, name, labels); err != nil {
		return time.Time{}, "", err
	}
	times, err := b.creation(ctx, b.full(name))
	if err != nil {
		return time.Time{}, "", err
	}
	path := filepath.Join(b.mountDir, name)
	mounts, err := b.mounts()
	if err != nil {
		return time.Time{}, path, err
	}
	if err := b.ensureMounted(ctx, name, mounts); err != nil {
		return time.Time{}, path, err
	}
	return times[b.full(name)], path, nil
}

// List returns the dataset's strata snapshots ordered by ID, mounting any
// that is not mounted at its Path.
func (b *Backend) List(ctx context.Context) ([]snapshot.Snapshot, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	snaps, err := b.snapshots(ctx)
	if err != nil {
		return nil, fmt.Errorf("zfs list %s: %w", b.dataset, err)
	}
	if len(snaps) == 0 {
		return nil, nil
	}
	times, err := b.creation(ctx, b.dataset)
	if err != nil {
		return nil, fmt.Errorf("zfs list %s: %w", b.dataset, err)
	}
	labels, err := b.labels(ctx, b.dataset)
	if err != nil {
		return nil, fmt.Errorf("zfs list %s: %w", b.dataset, err)
	}
	mounts, err := b.mounts()
	if err != nil {
		return nil, fmt.Errorf("zfs list %s: %w", b.dataset, err)
	}
	out := make([]snapshot.Snapshot, 0, len(snaps))
	for id, name := range snaps {
		if !b.inspect {
			if err := b.ensureMounted(ctx, name, mounts); err != nil {
				return nil, fmt.Errorf("zfs list %s: %w", b.dataset, err)
			}
		}
		l := labels[b.full(name)]
		if l == nil {
			l = snapshot.Labels{}
		}
		out = append(out, snapshot.Snapshot{
			ID: id, Name: name, Path: filepath.Join(b.mountDir, name), Created: times[b.full(name)], Labels: l,
		})
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

// SetLabels sets (zfs set) or removes (zfs inherit) the user properties
// strata:<key> of generation id's snapshot.
func (b *Backend) SetLabels(ctx context.Context, id uint64, labels snapshot.Labels) error {
	if err := snapshot.ValidID(id); err != nil {
		return fmt.Errorf("zfs set labels: %w", err)
	}
	name := snapshot.Name(id)
	if err := snapshot.CheckLabels(labels); err != nil {
		return fmt.Errorf("zfs set labels %s: %w", b.full(name), err)
	}
	if b.inspect {
		return fmt.Errorf("zfs set labels %s: %w", b.full(name), errInspect)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	snaps, err := b.snapshots(ctx)
	if err != nil {
		return fmt.Errorf("zfs set labels %s: %w", b.full(name), err)
	}
	if _, ok := snaps[id]; !ok {
		return fmt.Errorf("zfs set labels %s: %w", b.full(name), snapshot.ErrNotFound)
	}
	if err := b.setLabels(ctx, name, labels); err != nil {
		return fmt.Errorf("zfs set labels %s: %w", b.full(name), err)
	}
	return nil
}

// setLabels sets or removes snapshot name's label properties, in key order.
func (b *Backend) setLabels(ctx context.Context, name string, labels snapshot.Labels) error {
	snap := &gozfs.Dataset{Name: b.full(name), Type: gozfs.DatasetSnapshot}
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		if err := ctx.Err(); err != nil {
			return err
		}
		if v := labels[k]; v != "" {
			if err := snap.SetProperty(propPrefix+k, v); err != nil {
				return zfsErr("zfs set", snap.Name, err)
			}
			continue
		}
		if err := b.cmd(ctx, "zfs", "inherit", propPrefix+k, snap.Name); err != nil {
			return err
		}
	}
	return nil
}

// labels returns the strata:<key> user properties of target (a snapshot)
// or of every snapshot of target (a dataset), by full snapshot name.
func (b *Backend) labels(ctx context.Context, target string) (map[string]snapshot.Labels, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	args := []string{"get", "-Hp", "-o", "name,property,value", "-s", "local,received", "-t", "snapshot"}
	if !strings.Contains(target, "@") {
		args = append(args, "-d", "1")
	}
	args = append(args, "all", target)
	cmd := exec.CommandContext(ctx, "zfs", args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("zfs %s: %s: %w", strings.Join(args, " "), strings.TrimSpace(stderr.String()), err)
	}
	res := map[string]snapshot.Labels{}
	for line := range strings.Lines(string(out)) {
		f := strings.SplitN(strings.TrimSuffix(line, "\n"), "\t", 3)
		if len(f) != 3 {
			return nil, fmt.Errorf("zfs get labels %s: unexpected line %q", target, line)
		}
		k, ok := strings.CutPrefix(f[1], propPrefix)
		if !ok {
			continue
		}
		if res[f[0]] == nil {
			res[f[0]] = snapshot.Labels{}
		}
		res[f[0]][k] = f[2]
	}
	return res, nil
}

// Destroy unmounts generation id's snapshot and destroys it.
func (b *Backend) Destroy(ctx context.Context, id uint64) error {
	if err := snapshot.ValidID(id); err != nil {
		return fmt.Errorf("zfs destroy: %w", err)
	}
	if b.inspect {
		return fmt.Errorf("zfs destroy %s: %w", b.full(snapshot.Name(id)), errInspect)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	name := snapshot.Name(id)
	snaps, err := b.snapshots(ctx)
	if err != nil {
		return fmt.Errorf("zfs destroy %s: %w", b.full(name), err)
	}
	if _, ok := snaps[id]; !ok {
		return fmt.Errorf("zfs destroy %s: %w", b.full(name), snapshot.ErrNotFound)
	}
	if err := b.destroy(ctx, name, filepath.Join(b.mountDir, name)); err != nil {
		return fmt.Errorf("zfs destroy %s: %w", b.full(name), err)
	}
	b.log.Info("snapshot destroyed", "id", id, "snapshot", b.full(name))
	return nil
}

// destroy unmounts path if the snapshot is mounted there, removes the
// directory and destroys the snapshot.
func (b *Backend) destroy(ctx context.Context, name, path string) error {
	mounts, err := b.mounts()
	if err != nil {
		return err
	}
	if m, ok := mounts[path]; ok && m.fstype == "zfs" && m.source == b.full(name) {
		if err := b.cmd(ctx, "umount", path); err != nil {
			return err
		}
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		b.log.Warn("remove snapshot mount dir", "path", path, "err", err)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	snap := &gozfs.Dataset{Name: b.full(name), Type: gozfs.DatasetSnapshot}
	if err := snap.Destroy(gozfs.DestroyDefault); err != nil {
		return zfsErr("zfs destroy", snap.Name, err)
	}
	return nil
}

// snapshots returns the dataset's own strata snapshots by id (not those of
// child datasets, not foreign names).
func (b *Backend) snapshots(ctx context.Context) (map[uint64]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if b.replica && !b.datasetExists() {
		return map[uint64]string{}, nil
	}
	all, err := gozfs.Snapshots(b.dataset)
	if err != nil {
		return nil, zfsErr("zfs list snapshots", b.dataset, err)
	}
	out := map[uint64]string{}
	for _, s := range all {
		name, ok := strings.CutPrefix(s.Name, b.dataset+"@")
		if !ok {
			continue
		}
		if id, ok := snapshot.ParseName(name); ok {
			out[id] = name
		}
	}
	return out, nil
}

// creation returns the creation time of target (a snapshot) or of every
// snapshot of target (a dataset), by full snapshot name.
func (b *Backend) creation(ctx context.Context, target string) (map[string]time.Time, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	args := []string{"get", "-Hp", "-o", "name,value", "-t", "snapshot"}
	if !strings.Contains(target, "@") {
		args = append(args, "-d", "1")
	}
	args = append(args, "creation", target)
	cmd := exec.CommandContext(ctx, "zfs", args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("zfs %s: %s: %w", strings.Join(args, " "), strings.TrimSpace(stderr.String()), err)
	}
	times := map[string]time.Time{}
	for line := range strings.Lines(string(out)) {
		name, value, ok := strings.Cut(strings.TrimSuffix(line, "\n"), "\t")
		if !ok {
			return nil, fmt.Errorf("zfs get creation %s: unexpected line %q", target, line)
		}
		sec, err := strconv.ParseInt(value, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("zfs get creation %s: bad time %q for %s", target, value, name)
		}
		times[name] = time.Unix(sec, 0)
	}
	return times, nil
}

// ensureMounted mounts snapshot name read-only at mountDir/name unless it is
// mounted there already.
func (b *Backend) ensureMounted(ctx context.Context, name string, mounts map[string]mount) error {
	path := filepath.Join(b.mountDir, name)
	src := b.full(name)
	if m, ok := mounts[path]; ok {
		if m.fstype == "zfs" && m.source == src {
			return nil
		}
		return fmt.Errorf("mount %s at %s: %s %s is mounted there", src, path, m.fstype, m.source)
	}
	if err := os.MkdirAll(path, 0o755); err != nil {
		return fmt.Errorf("mount %s: %w", src, err)
	}
	if err := b.cmd(ctx, "mount", "-t", "zfs", "-o", "ro", src, path); err != nil {
		return err
	}
	b.log.Info("snapshot mounted", "snapshot", src, "path", path)
	return nil
}

// cmd runs a mount helper, returning its output in the error.
func (b *Backend) cmd(ctx context.Context, name string, args ...string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

type mount struct{ fstype, source string }

// mounts reads the mount table: mountpoint -> filesystem type and source.
// Later entries win, as they are mounted on top.
func (b *Backend) mounts() (map[string]mount, error) {
	f, err := os.Open(b.mountinfo)
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	defer f.Close()
	ms, err := mountinfo.Parse(f)
	if err != nil {
		return nil, err
	}
	out := make(map[string]mount, len(ms))
	for _, m := range ms {
		out[m.Mountpoint] = mount{fstype: m.FSType, source: m.Source}
	}
	return out, nil
}

// cmdError is a failed zfs(8) call made through go-zfs: "op object: stderr".
// It unwraps to the *zfs.Error.
type cmdError struct {
	op, obj, stderr string
	err             error
}

func (e *cmdError) Error() string { return e.op + " " + e.obj + ": " + e.stderr }
func (e *cmdError) Unwrap() error { return e.err }

func zfsErr(op, obj string, err error) error {
	var ze *gozfs.Error
	if errors.As(err, &ze) {
		msg := strings.TrimSpace(ze.Stderr)
		if msg == "" {
			msg = ze.Err.Error()
		}
		return &cmdError{op: op, obj: obj, stderr: msg, err: err}
	}
	return fmt.Errorf("%s %s: %w", op, obj, err)
}
