package btrfs

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/internal/feed"
	"github.com/strata-nix/strata/internal/phase"
	"github.com/strata-nix/strata/mountinfo"
	"github.com/strata-nix/strata/snapshot"
)

// Replication: `btrfs send [-p parent]` on the primary, `btrfs receive` on
// the replica. A received subvolume has its own UUID and records the
// sender's as its Received UUID, which is how an incremental stream finds
// its parent here; inode numbers and subvolume ids differ from the
// primary's, so NFS handles never carry over between servers.
//
// Crash safety: btrfs receive makes the subvolume writable and sets it
// read-only (with its Received UUID) only at the stream's end, so List never
// shows a half-received strata-N; a failed Receive deletes it, and so does
// NewReplica after a crash. A stream that stops cleanly between two commands
// could still look whole to btrfs: callers check the stream's end themselves
// (the replica checks the primary's trailer and the registration) and
// Destroy what fails.

var _ snapshot.Streamer = (*Backend)(nil)

// NewReplica returns a backend for a replica server: one that only receives
// snapshots (Create fails) into snapshotDir (created if missing), which must
// be on btrfs. It deletes half-received snapshots left by a crash.
func NewReplica(snapshotDir string, log *slog.Logger) (*Backend, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(snapshotDir, 0o755); err != nil {
		return nil, fmt.Errorf("btrfs snapshot dir: %w", err)
	}
	dir, err := realDir(snapshotDir)
	if err != nil {
		return nil, fmt.Errorf("btrfs snapshot dir: %w", err)
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(dir, &sfs); err != nil {
		return nil, fmt.Errorf("btrfs statfs %s: %w", dir, err)
	}
	if uint32(sfs.Type) != superMagic {
		return nil, unsupported(dir, "snapshot dir is not on btrfs (filesystem magic %#x)", uint32(sfs.Type))
	}
	b := &Backend{snapDir: dir, log: log.With("backend", "btrfs", "replica", dir)}
	// Half-received first: removeLeftovers would make a writable strata-N
	// whose generation label arrived before the crash read-only.
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("btrfs read %s: %w", dir, err)
	}
	for _, e := range ents {
		if _, ok := snapshot.ParseName(e.Name()); !ok {
			continue
		}
		p := filepath.Join(dir, e.Name())
		if info, err := getSubvolInfo(p); err == nil && !info.ReadOnly && info.ReceivedUUID == ([16]byte{}) {
			if err := b.removeHalf(context.Background(), p); err != nil {
				return nil, err
			}
		}
	}
	if err := b.removeLeftovers(context.Background()); err != nil {
		return nil, err
	}
	return b, nil
}

// Send writes `btrfs send` of generation id's snapshot to w, incremental
// against generation from's snapshot (-p) unless from is 0.
func (b *Backend) Send(ctx context.Context, w io.Writer, id, from uint64) error {
	if err := snapshot.ValidID(id); err != nil {
		return fmt.Errorf("btrfs send: %w", err)
	}
	p := b.path(id)
	if err := b.exists(p); err != nil {
		return fmt.Errorf("btrfs send %s: %w", p, err)
	}
	args := []string{"send", "-q"}
	if from != 0 {
		parent := b.path(from)
		if err := b.exists(parent); err != nil {
			return fmt.Errorf("btrfs send %s: parent: %w", p, err)
		}
		args = append(args, "-p", parent)
	}
	args = append(args, p)
	cmd := exec.CommandContext(ctx, "btrfs", args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	cmd.Stdout = w
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("btrfs %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

// exists checks that p is a read-only snapshot, ErrNotFound if absent.
func (b *Backend) exists(p string) error {
	if _, err := os.Lstat(p); errors.Is(err, fs.ErrNotExist) {
		return snapshot.ErrNotFound
	}
	if _, err := b.snapshotInfo(p); err != nil {
		return err
	}
	return nil
}

// Receive checks the stream's first command (it must create the subvolume
// strata-N, whole when from is 0, as a snapshot of from's otherwise) and
// runs `btrfs receive` into snapshotDir. A receive that fails deletes the
// subvolume it began. (btrfs cannot rename a read-only subvolume into
// another directory, so there is no staging directory: a half-received
// strata-N is writable, List skips it, and NewReplica deletes it.)
func (b *Backend) Receive(ctx context.Context, r io.Reader, id, from uint64) (snapshot.Snapshot, error) {
	if err := snapshot.ValidID(id); err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs receive: %w", err)
	}
	if b.inspect {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs receive %s: %w", snapshot.Name(id), errInspect)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	name := snapshot.Name(id)
	final := b.path(id)
	if _, err := os.Lstat(final); err == nil {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs receive %s: %w", final, snapshot.ErrExists)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs receive %s: %w", final, err)
	}
	if from != 0 {
		if err := b.exists(b.path(from)); err != nil {
			return snapshot.Snapshot{}, fmt.Errorf("btrfs receive %s: incremental from generation %d: %w", final, from, err)
		}
	}
	br := bufio.NewReaderSize(r, maxHead)
	endHead := phase.Begin(ctx, "replica: btrfs stream head (first bytes)")
	got, incremental, err := streamHead(br)
	endHead()
	if err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs receive %s: %w", final, err)
	}
	if got != name {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs receive %s: the stream carries snapshot %q, want %s", final, got, name)
	}
	if incremental != (from != 0) {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs receive %s: incremental stream %v, want %v (from generation %d)", final, incremental, from != 0, from)
	}
	// From here on strata-N is ours: it must end up received in full or
	// gone. Cleanup ignores ctx: a cancelled receive must not leave it.
	ok := false
	defer func() {
		if !ok {
			if err := b.removeHalf(context.WithoutCancel(ctx), final); err != nil {
				b.log.Error("remove half-received snapshot", "path", final, "err", err)
			}
		}
	}()
	endRecv := phase.Begin(ctx, "replica: btrfs receive process")
	if err := b.receive(ctx, br); err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs receive %s: %w", final, err)
	}
	endRecv()
	endSettle := phase.Begin(ctx, "replica: received subvolume info, labels, fsync dir")
	defer endSettle()
	info, err := b.snapshotInfo(final)
	if err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs receive %s: received subvolume: %w", final, err)
	}
	if info.ReceivedUUID == ([16]byte{}) {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs receive %s: received subvolume has no received UUID", final)
	}
	labels, err := readLabels(final)
	if err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs receive %s: %w", final, err)
	}
	if err := syncDir(b.snapDir); err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("btrfs receive %s: %w", final, err)
	}
	ok = true
	b.log.Info("snapshot received", "id", id, "from", from, "path", final)
	return snapshot.Snapshot{ID: id, Name: name, Path: final, Created: info.Created, Labels: labels}, nil
}

// receive runs `btrfs receive -e snapshotDir` fed from r (see feed.Run),
// with -m when the snapshot dir's own mount would mislead it (receiveMount).
func (b *Backend) receive(ctx context.Context, r io.Reader) error {
	args := []string{"receive", "-e"}
	if ms, err := mountinfo.Read(); err == nil {
		if m := receiveMount(ms, b.snapDir); m != "" {
			args = append(args, "-m", m)
		}
	}
	cmd := exec.CommandContext(ctx, "btrfs", append(args, b.snapDir)...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	return feed.Run(ctx, cmd, r)
}

// receiveMount returns the mount point to give `btrfs receive -m` for
// snapshot dir dir (absolute, symlinks resolved), or "" when receive's own
// choice is right. Receive finds an incremental stream's parent by its path
// from the filesystem's top, made relative to the subvolume whose root is
// mounted at the mount dir lies on. When that mount is a bind mount of a
// directory inside a subvolume instead (systemd's ReadWritePaths= makes one
// of the snapshot dir itself, on itself), the path does not resolve and
// every incremental receive fails ("It seems that you have changed your
// default subvolume"). A mount of the same filesystem further up whose root
// is its subvolume's root, with dir at the same place below it, gives
// receive the right paths; it may be read-only (the writes go through dir).
func receiveMount(ms []mountinfo.Mount, dir string) string {
	dir = filepath.Clean(dir)
	subvolRoot := func(m mountinfo.Mount) bool {
		sv, ok := m.Option("subvol")
		return ok && filepath.Clean(sv) == filepath.Clean(m.Root)
	}
	// The mount dir lies on: the top mount at its nearest mounted ancestor.
	var on mountinfo.Mount
	found := false
	for p := dir; ; p = filepath.Dir(p) {
		if m, ok := mountinfo.Top(ms, p); ok {
			on, found = m, true
			break
		}
		if p == "/" {
			break
		}
	}
	if !found || on.FSType != "btrfs" || subvolRoot(on) {
		return ""
	}
	// dir's path from the filesystem's top.
	rel, err := filepath.Rel(on.Mountpoint, dir)
	if err != nil {
		return ""
	}
	fsPath := filepath.Join(on.Root, rel)
	for p := filepath.Dir(on.Mountpoint); ; p = filepath.Dir(p) {
		if m, ok := mountinfo.Top(ms, p); ok {
			if m.FSType != "btrfs" || m.Major != on.Major || m.Minor != on.Minor {
				return "" // another filesystem covers the way up
			}
			under, err1 := filepath.Rel(m.Mountpoint, dir)
			inFS, err2 := filepath.Rel(m.Root, fsPath)
			if subvolRoot(m) && err1 == nil && err2 == nil && under == inFS && !strings.HasPrefix(inFS, "..") {
				return m.Mountpoint
			}
		}
		if p == "/" {
			return ""
		}
	}
}

// removeHalf deletes the subvolume a failed receive began at p, if any.
func (b *Backend) removeHalf(ctx context.Context, p string) error {
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); errors.Is(err, unix.ENOENT) {
		return nil
	} else if err != nil {
		return fmt.Errorf("btrfs stat %s: %w", p, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR || st.Ino != firstFreeObjectID {
		return fmt.Errorf("btrfs remove half-received snapshot %s: not a subvolume, remove it by hand", p)
	}
	b.log.Warn("removing half-received snapshot", "path", p)
	return b.run(ctx, "subvolume", "delete", p)
}

// The btrfs send stream (v1, v2): "btrfs-stream\0", le32 version, then
// commands: le32 length, le16 command, le32 crc, then length bytes of
// attributes (le16 type, le16 length, data). The first command creates the
// subvolume: SUBVOL (whole) or SNAPSHOT (incremental), with its PATH.
const (
	streamMagic   = "btrfs-stream\x00"
	cmdSubvol     = 1
	cmdSnapshot   = 2
	attrPath      = 15
	cmdHeaderSize = 10
	maxHead       = 64 << 10
)

// streamHead reads (without consuming) the stream's first command and
// returns the name of the subvolume it creates and whether it is a
// snapshot of a parent (an incremental stream).
func streamHead(br *bufio.Reader) (name string, incremental bool, err error) {
	hdr := len(streamMagic) + 4
	b, err := br.Peek(hdr + cmdHeaderSize)
	if err != nil {
		return "", false, fmt.Errorf("read stream header: %w", err)
	}
	if string(b[:len(streamMagic)]) != streamMagic {
		return "", false, errors.New("not a btrfs send stream")
	}
	c := b[hdr:]
	n := int(binary.LittleEndian.Uint32(c[0:4]))
	cmd := binary.LittleEndian.Uint16(c[4:6])
	if cmd != cmdSubvol && cmd != cmdSnapshot {
		return "", false, fmt.Errorf("stream starts with command %d, want a subvolume or snapshot", cmd)
	}
	if n > maxHead-hdr-cmdHeaderSize {
		return "", false, fmt.Errorf("stream's first command is %d bytes long", n)
	}
	b, err = br.Peek(hdr + cmdHeaderSize + n)
	if err != nil {
		return "", false, fmt.Errorf("read stream header: %w", err)
	}
	attrs := b[hdr+cmdHeaderSize:]
	for len(attrs) >= 4 {
		typ := binary.LittleEndian.Uint16(attrs[0:2])
		l := int(binary.LittleEndian.Uint16(attrs[2:4]))
		if 4+l > len(attrs) {
			break
		}
		if typ == attrPath {
			return string(attrs[4 : 4+l]), cmd == cmdSnapshot, nil
		}
		attrs = attrs[4+l:]
	}
	return "", false, errors.New("stream's first command names no subvolume")
}

// InspectReplica opens a replica's snapshot dir for looking only, as
// Inspect does for a primary: it deletes and repairs nothing, and its
// Create, SetLabels, Receive and Destroy fail. `strata server --check-config`
// of a replica uses it.
func InspectReplica(snapshotDir string, log *slog.Logger) (*Backend, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	dir, err := realDir(snapshotDir)
	if err != nil {
		return nil, fmt.Errorf("btrfs snapshot dir: %w", err)
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(dir, &sfs); err != nil {
		return nil, fmt.Errorf("btrfs statfs %s: %w", dir, err)
	}
	if uint32(sfs.Type) != superMagic {
		return nil, unsupported(dir, "snapshot dir is not on btrfs (filesystem magic %#x)", uint32(sfs.Type))
	}
	return &Backend{snapDir: dir, inspect: true, log: log.With("backend", "btrfs", "replica", dir)}, nil
}

// Leftovers names, changing nothing, what a start removes from the snapshot
// dir before anything else (New, NewReplica): half-made snapshots of a
// create a crash cut short (.tmp-strata-N) and, when replica is set,
// half-received ones (a writable strata-N without a Received UUID: a
// receive a crash cut short). A .tmp-strata-N that is not a subvolume stops
// the start; it is returned as that error. `strata server --check-config`
// reports them.
func (b *Backend) Leftovers(replica bool) ([]string, error) {
	ents, err := os.ReadDir(b.snapDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, fmt.Errorf("btrfs read %s: %w", b.snapDir, err)
	}
	var out []string
	for _, e := range ents {
		p := filepath.Join(b.snapDir, e.Name())
		if rest, ok := strings.CutPrefix(e.Name(), tmpPrefix); ok {
			if _, ours := snapshot.ParseName(rest); !ours {
				continue
			}
			var st unix.Stat_t
			if err := unix.Lstat(p, &st); err != nil {
				return nil, fmt.Errorf("btrfs stat %s: %w", p, err)
			}
			if st.Mode&unix.S_IFMT != unix.S_IFDIR || st.Ino != firstFreeObjectID {
				return nil, fmt.Errorf("btrfs remove half-made snapshot %s: not a subvolume, remove it by hand", p)
			}
			out = append(out, fmt.Sprintf("half-made snapshot %s (a snapshot create a crash cut short)", p))
			continue
		}
		if _, ok := snapshot.ParseName(e.Name()); !ok || !replica {
			continue
		}
		if info, err := getSubvolInfo(p); err == nil && !info.ReadOnly && info.ReceivedUUID == ([16]byte{}) {
			out = append(out, fmt.Sprintf("half-received snapshot %s (a receive a crash cut short; the next sync asks for it again)", p))
		}
	}
	return out, nil
}
