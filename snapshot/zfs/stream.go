package zfs

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	gozfs "github.com/mistifyio/go-zfs/v3"

	"github.com/strata-nix/strata/internal/feed"
	"github.com/strata-nix/strata/snapshot"
)

// Replication: `zfs send -c [-i @strata-M] dataset@strata-N` on the primary,
// `zfs receive -u -s` on the replica. go-zfs's SendSnapshot and
// ReceiveSnapshot take no context and no flags (-i, -s, -u, -t), so both
// ends run zfs(8) directly with exec.CommandContext: a client that goes
// away or a cancelled pull kills the command.
//
// A replica's dataset is made by the first whole stream (it must not exist
// before: zfs cannot receive a whole stream over a dataset that has
// snapshots). Receives are resumable (-s): an interrupted one keeps its
// partial state in the dataset, whose receive_resume_token lets the primary
// send only the rest (`zfs send -t`); until it finishes or is aborted
// (`zfs receive -A`) no generation appears. Incremental receives use -F,
// which rolls the replica's dataset back to its newest snapshot first (it is
// never written, but a mount could have touched it).

var _ snapshot.Resumer = (*Backend)(nil)

// NewReplica returns a backend for a replica server: one that only receives
// snapshots (Create fails) into dataset, which need not exist yet (the first
// whole stream makes it), mounting them under mountDir (created if missing).
func NewReplica(dataset, mountDir string, log *slog.Logger) (*Backend, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if dataset == "" || strings.ContainsAny(dataset, "@#% ") || strings.HasPrefix(dataset, "/") || !strings.Contains(dataset, "/") {
		return nil, fmt.Errorf("zfs dataset %q: not a child filesystem dataset name (pool/name): %w", dataset, snapshot.ErrUnsupported)
	}
	mountDir, err := filepath.Abs(mountDir)
	if err != nil {
		return nil, fmt.Errorf("zfs mount dir: %w", err)
	}
	if err := os.MkdirAll(mountDir, 0o755); err != nil {
		return nil, fmt.Errorf("zfs mount dir: %w", err)
	}
	if ds, err := gozfs.GetDataset(dataset); err == nil && ds.Type != gozfs.DatasetFilesystem {
		return nil, fmt.Errorf("zfs dataset %s: is a %s, not a filesystem: %w", dataset, ds.Type, snapshot.ErrUnsupported)
	}
	return &Backend{
		dataset:   dataset,
		mountDir:  mountDir,
		replica:   true,
		log:       log.With("backend", "zfs", "replica", dataset),
		mountinfo: "/proc/self/mountinfo",
	}, nil
}

// datasetExists reports whether the backend's dataset exists.
func (b *Backend) datasetExists() bool {
	_, err := gozfs.GetDataset(b.dataset)
	return err == nil
}

// Send writes `zfs send -c` of generation id's snapshot to w, incremental
// against generation from's snapshot (-i) unless from is 0. -c sends blocks
// as the dataset stores them (compressed, when the primary's dataset has
// compression on): fewer bytes, and neither end decompresses or compresses
// again; the replica stores them as they came.
func (b *Backend) Send(ctx context.Context, w io.Writer, id, from uint64) error {
	if err := snapshot.ValidID(id); err != nil {
		return fmt.Errorf("zfs send: %w", err)
	}
	snaps, err := b.lockedSnapshots(ctx)
	if err != nil {
		return fmt.Errorf("zfs send %s: %w", b.full(snapshot.Name(id)), err)
	}
	if _, ok := snaps[id]; !ok {
		return fmt.Errorf("zfs send %s: %w", b.full(snapshot.Name(id)), snapshot.ErrNotFound)
	}
	args := []string{"send", "-c"}
	if from != 0 {
		if _, ok := snaps[from]; !ok {
			return fmt.Errorf("zfs send %s: parent %s: %w", b.full(snapshot.Name(id)), snapshot.Name(from), snapshot.ErrNotFound)
		}
		args = append(args, "-i", "@"+snapshot.Name(from))
	}
	args = append(args, b.full(snapshot.Name(id)))
	return b.send(ctx, w, args)
}

func (b *Backend) send(ctx context.Context, w io.Writer, args []string) error {
	cmd := exec.CommandContext(ctx, "zfs", args...)
	cmd.Stdout = w
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("zfs %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

func (b *Backend) lockedSnapshots(ctx context.Context) (map[uint64]string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.snapshots(ctx)
}

// Receive runs `zfs receive -u -s` of r into dataset@strata-N after checking
// the stream's BEGIN record (it must make a snapshot named strata-N, whole
// when from is 0, incremental otherwise), then mounts the snapshot.
func (b *Backend) Receive(ctx context.Context, r io.Reader, id, from uint64) (snapshot.Snapshot, error) {
	if err := snapshot.ValidID(id); err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("zfs receive: %w", err)
	}
	if b.inspect {
		return snapshot.Snapshot{}, fmt.Errorf("zfs receive %s: %w", snapshot.Name(id), errInspect)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	name := snapshot.Name(id)
	full := b.full(name)
	snaps, err := b.snapshots(ctx)
	if err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("zfs receive %s: %w", full, err)
	}
	if _, ok := snaps[id]; ok {
		return snapshot.Snapshot{}, fmt.Errorf("zfs receive %s: %w", full, snapshot.ErrExists)
	}
	args := []string{"receive", "-u", "-s"}
	if from != 0 {
		if _, ok := snaps[from]; !ok {
			return snapshot.Snapshot{}, fmt.Errorf("zfs receive %s: incremental from generation %d: %w", full, from, snapshot.ErrNotFound)
		}
		args = append(args, "-F")
	} else if b.datasetExists() {
		return snapshot.Snapshot{}, fmt.Errorf("zfs receive %s: a whole stream needs a dataset that does not exist yet, and %s exists (with %d generations): destroy it or name another snapshot.dataset", full, b.dataset, len(snaps))
	} else {
		args = append(args, "-o", "canmount=noauto")
	}
	br := bufio.NewReaderSize(r, 64<<10)
	got, incremental, err := zstreamHead(br)
	if err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("zfs receive %s: %w", full, err)
	}
	if !strings.HasSuffix(got, "@"+name) {
		return snapshot.Snapshot{}, fmt.Errorf("zfs receive %s: the stream carries snapshot %q, want one named %s", full, got, name)
	}
	if incremental != (from != 0) {
		return snapshot.Snapshot{}, fmt.Errorf("zfs receive %s: incremental stream %v, want %v (from generation %d)", full, incremental, from != 0, from)
	}
	args = append(args, full)
	if err := feed.Run(ctx, exec.CommandContext(ctx, "zfs", args...), br); err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("zfs receive %s: %w", full, err)
	}
	return b.finishReceive(ctx, id)
}

// finishReceive mounts a received snapshot; if that fails the snapshot is
// destroyed, so a failed receive leaves no generation.
func (b *Backend) finishReceive(ctx context.Context, id uint64) (snapshot.Snapshot, error) {
	name := snapshot.Name(id)
	created, path, err := b.finishCreate(ctx, name, snapshot.Labels{"generation": strconv.FormatUint(id, 10)})
	if err != nil {
		if derr := b.destroy(context.WithoutCancel(ctx), name, path); derr != nil {
			b.log.Error("destroy snapshot after failed receive", "snapshot", b.full(name), "err", derr)
		}
		return snapshot.Snapshot{}, fmt.Errorf("zfs receive %s: %w", b.full(name), err)
	}
	b.log.Info("snapshot received", "id", id, "snapshot", b.full(name), "path", path)
	return snapshot.Snapshot{ID: id, Name: name, Path: path, Created: created}, nil
}

// ResumeToken returns the dataset's receive_resume_token, "" if there is
// none (or no dataset).
func (b *Backend) ResumeToken(ctx context.Context) (string, error) {
	cmd := exec.CommandContext(ctx, "zfs", "get", "-Hp", "-o", "value", "receive_resume_token", b.dataset)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	if err != nil && strings.Contains(string(out), "dataset does not exist") {
		return "", nil // one zfs(8) call instead of asking first
	}
	if err != nil {
		return "", fmt.Errorf("zfs get receive_resume_token %s: %w: %s", b.dataset, err, strings.TrimSpace(string(out)))
	}
	tok := strings.TrimSpace(string(out))
	if tok == "-" {
		return "", nil
	}
	return tok, nil
}

// Has reports whether generation id's snapshot exists, with one zfs(8)
// call (List makes several): a replica asks before each stream.
func (b *Backend) Has(ctx context.Context, id uint64) (bool, error) {
	if err := snapshot.ValidID(id); err != nil {
		return false, fmt.Errorf("zfs has: %w", err)
	}
	full := b.full(snapshot.Name(id))
	cmd := exec.CommandContext(ctx, "zfs", "list", "-H", "-o", "name", "-t", "snapshot", full)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	if err != nil {
		if strings.Contains(string(out), "does not exist") {
			return false, nil
		}
		return false, fmt.Errorf("zfs list %s: %w: %s", full, err, strings.TrimSpace(string(out)))
	}
	return strings.TrimSpace(string(out)) == full, nil
}

var tokenRE = regexp.MustCompile(`^[0-9]+-[0-9a-f]+-[0-9a-f]+-[0-9a-f]+$`)

// SendResume writes `zfs send -t token` to w once `zfs send -nv -t` shows
// the token names one of this dataset's strata snapshots.
func (b *Backend) SendResume(ctx context.Context, w io.Writer, token string) error {
	if !tokenRE.MatchString(token) {
		return fmt.Errorf("zfs send -t: malformed resume token")
	}
	out, err := exec.CommandContext(ctx, "zfs", "send", "-nv", "-t", token).CombinedOutput()
	if err != nil {
		return fmt.Errorf("zfs send -nv -t: %w: %s", err, strings.TrimSpace(string(out)))
	}
	toname := ""
	for line := range strings.Lines(string(out)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "toname = "); ok {
			toname = v
		}
	}
	rest, ok := strings.CutPrefix(toname, b.dataset+"@")
	if _, isOurs := snapshot.ParseName(rest); !ok || !isOurs {
		return fmt.Errorf("zfs send -t: the token resumes %q, not a strata snapshot of %s", toname, b.dataset)
	}
	return b.send(ctx, w, []string{"send", "-t", token})
}

// ResumeReceive runs `zfs receive -u -s dataset` of a stream SendResume
// made, then mounts generation id's snapshot, which it must have made.
func (b *Backend) ResumeReceive(ctx context.Context, r io.Reader, id uint64) (snapshot.Snapshot, error) {
	if err := snapshot.ValidID(id); err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("zfs receive: %w", err)
	}
	if b.inspect {
		return snapshot.Snapshot{}, fmt.Errorf("zfs receive %s: %w", snapshot.Name(id), errInspect)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	name := snapshot.Name(id)
	br := bufio.NewReaderSize(r, 64<<10)
	got, _, err := zstreamHead(br)
	if err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("zfs receive %s (resumed): %w", b.full(name), err)
	}
	if !strings.HasSuffix(got, "@"+name) {
		return snapshot.Snapshot{}, fmt.Errorf("zfs receive %s (resumed): the stream carries snapshot %q", b.full(name), got)
	}
	if err := feed.Run(ctx, exec.CommandContext(ctx, "zfs", "receive", "-u", "-s", b.dataset), br); err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("zfs receive %s (resumed): %w", b.full(name), err)
	}
	snaps, err := b.snapshots(ctx)
	if err != nil {
		return snapshot.Snapshot{}, fmt.Errorf("zfs receive %s (resumed): %w", b.full(name), err)
	}
	if _, ok := snaps[id]; !ok {
		return snapshot.Snapshot{}, fmt.Errorf("zfs receive %s (resumed): no such snapshot after the receive", b.full(name))
	}
	return b.finishReceive(ctx, id)
}

// AbortReceive discards an interrupted receive's partial state
// (`zfs receive -A`), if there is one.
func (b *Backend) AbortReceive(ctx context.Context) error {
	tok, err := b.ResumeToken(ctx)
	if err != nil || tok == "" {
		return err
	}
	if b.inspect {
		return fmt.Errorf("zfs receive -A %s: %w", b.dataset, errInspect)
	}
	if out, err := exec.CommandContext(ctx, "zfs", "receive", "-A", b.dataset).CombinedOutput(); err != nil {
		return fmt.Errorf("zfs receive -A %s: %w: %s", b.dataset, err, strings.TrimSpace(string(out)))
	}
	b.log.Warn("aborted an interrupted receive", "dataset", b.dataset)
	return nil
}

// The zfs send stream starts with a DRR_BEGIN record: le/be32 type (0),
// u32 payload length, then drr_begin: u64 magic (0x2F5bacbac, which gives
// the byte order), u64 versioninfo, u64 creation time, u32 objset type, u32
// flags, u64 toguid, u64 fromguid (0: a whole stream), char toname[256].
const (
	zfsMagic    = 0x2F5bacbac
	zBeginBytes = 56 + 256
)

// zstreamHead reads (without consuming) the stream's BEGIN record and
// returns the snapshot it makes ("pool/fs@snap") and whether it is
// incremental.
func zstreamHead(br *bufio.Reader) (toname string, incremental bool, err error) {
	b, err := br.Peek(zBeginBytes)
	if err != nil {
		return "", false, fmt.Errorf("read stream header: %w", err)
	}
	var order binary.ByteOrder = binary.LittleEndian
	if order.Uint64(b[8:16]) != zfsMagic {
		order = binary.BigEndian
		if order.Uint64(b[8:16]) != zfsMagic {
			return "", false, errors.New("not a zfs send stream")
		}
	}
	if order.Uint32(b[0:4]) != 0 {
		return "", false, errors.New("zfs stream does not start with a BEGIN record")
	}
	name := b[56:zBeginBytes]
	if i := strings.IndexByte(string(name), 0); i >= 0 {
		name = name[:i]
	}
	return string(name), order.Uint64(b[48:56]) != 0, nil
}

// InspectReplica opens a replica's dataset for looking only (it need not
// exist yet): nothing is mounted, received or destroyed. `strata server
// --check-config` of a replica uses it.
func InspectReplica(dataset, mountDir string, log *slog.Logger) (*Backend, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if dataset == "" || strings.ContainsAny(dataset, "@#% ") || strings.HasPrefix(dataset, "/") || !strings.Contains(dataset, "/") {
		return nil, fmt.Errorf("zfs dataset %q: not a child filesystem dataset name (pool/name): %w", dataset, snapshot.ErrUnsupported)
	}
	mountDir, err := filepath.Abs(mountDir)
	if err != nil {
		return nil, fmt.Errorf("zfs mount dir: %w", err)
	}
	return &Backend{dataset: dataset, mountDir: mountDir, replica: true, inspect: true,
		log: log.With("backend", "zfs", "replica", dataset), mountinfo: "/proc/self/mountinfo"}, nil
}
