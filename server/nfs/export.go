// Package nfs exports strata's live generations read-only over NFSv3.
//
// One TCP listener serves the NFS (100003) and MOUNT (100005) programs with
// github.com/willscott/go-nfs, used unmodified through its extension points.
// MOUNT "/gen/N" gives generation N's store directory; "/gen/N/a/b" gives the
// directory a/b inside it (libnfs's nfs-cat and nfs-cp MOUNT the directory
// part of their URL). Every live generation is mountable at once.
//
// File handles are the kernel's own (name_to_handle_at), sealed with the
// generation id and an HMAC keyed by a file in the state directory, and are
// resolved with open_by_handle_at against the generation's directory fd. They
// hold no server state, so they stay valid across restarts; memory does not
// grow with the number of files served. A forged handle, a handle of another
// generation (on btrfs: another subvolume of the same filesystem) and a handle
// of a removed generation all get NFS3ERR_STALE. The process needs
// CAP_DAC_READ_SEARCH for open_by_handle_at.
//
// The export is read-only and confined: every mutating procedure gets
// NFS3ERR_ROFS (COMMIT gets NFS3ERR_SERVERFAULT, go-nfs's answer for a
// filesystem without write capability), nothing follows a symlink
// server-side, LOOKUP names are validated, and ".." at the root is the root.
//
// go-nfs serves each TCP connection strictly one request at a time, so
// builders mount with nconnect (see the overlay package for the options).
// go-nfs has no bound on XDR lengths, no recover and no connection limit:
// Serve takes only a listener of the connection guard (server/nfs/guard),
// and Listen builds the one strata server uses.
package nfs

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	billy "github.com/go-git/go-billy/v5"
	"github.com/prometheus/client_golang/prometheus"
	gonfs "github.com/willscott/go-nfs"
	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/server/nfs/busypoll"
	"github.com/strata-nix/strata/server/nfs/guard"
)

// Options configure an Export.
type Options struct {
	// StateDir holds the handle MAC key (nfs-handle.key), created 0600 on
	// first start and reused after, so handles survive restarts. Required.
	StateDir string
	// Logger receives the export's logs; nil discards them.
	Logger *slog.Logger
	// Registry receives the export's Prometheus collectors
	// (strata_nfs_*); nil keeps them unregistered.
	Registry *prometheus.Registry
	// DirCacheEntries bounds the directory entries kept in the READDIR
	// listing cache, summed over all cached directories (default 1<<20,
	// roughly 150 MB at worst).
	DirCacheEntries int
}

// Export is the NFS export of every live generation. It implements go-nfs's
// Handler and CachingHandler; its methods are safe for concurrent use.
type Export struct {
	log     *slog.Logger
	key     []byte
	metrics *metrics
	dirs    *dirCache

	mu     sync.RWMutex
	gens   map[uint64]*gen
	dead   *genFS // returned by Mount on error: go-nfs needs a non-nil fs
	closed bool

	connMu sync.Mutex
	conns  map[*conn]struct{}

	// noFastPath makes go-nfs answer every call (tests compare the two).
	noFastPath bool
	fastCalls  atomic.Uint64 // calls the fast path answered
}

var (
	_ gonfs.Handler        = (*Export)(nil)
	_ gonfs.CachingHandler = (*Export)(nil)
)

// New loads (or creates) the handle key in opts.StateDir and registers the
// metrics. The export has no generations until Add.
func New(opts Options) (*Export, error) {
	if opts.StateDir == "" {
		return nil, errors.New("new nfs export: no state dir")
	}
	key, err := loadKey(opts.StateDir)
	if err != nil {
		return nil, fmt.Errorf("new nfs export: %w", err)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var reg prometheus.Registerer = prometheus.NewRegistry()
	if opts.Registry != nil {
		reg = opts.Registry
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, fmt.Errorf("new nfs export: register metrics: %w", err)
	}
	n := opts.DirCacheEntries
	if n <= 0 {
		n = 1 << 20
	}
	e := &Export{
		log: log, key: key, metrics: m, dirs: newDirCache(n),
		gens: make(map[uint64]*gen), conns: make(map[*conn]struct{}),
	}
	// id 0 owns no handle; root nil: every call fails
	e.dead = &genFS{g: &gen{e: e, attrs: newAttrCache(1), fds: newFDCache(1)}}
	return e, nil
}

// Add exports generation id from storeDir (the snapshot's store directory).
// It opens an O_RDONLY directory fd on it and records its identity (st_dev,
// and on btrfs the subvolume id). Calling it again with the same id and
// directory does nothing; a different directory for a live id is an error.
func (e *Export) Add(id uint64, storeDir string) error {
	if id == 0 {
		return errors.New("add generation 0: generations start at 1")
	}
	dir := filepath.Clean(storeDir)
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return fmt.Errorf("add generation %d: export closed", id)
	}
	if old, ok := e.gens[id]; ok {
		if old.dir == dir {
			return nil
		}
		return fmt.Errorf("add generation %d: already exported from %s, not %s", id, old.dir, dir)
	}
	g, err := e.openGen(id, dir)
	if err != nil {
		return fmt.Errorf("add generation %d: %w", id, err)
	}
	e.gens[id] = g
	e.metrics.generations.Inc()
	e.log.Info("nfs export added", "generation", id, "dir", dir, "btrfs_subvol", g.subvol)
	return nil
}

func (e *Export) openGen(id uint64, dir string) (*gen, error) {
	f, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			f.Close()
		}
	}()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil, fmt.Errorf("stat %s: %w", dir, err)
	}
	fh, _, err := unix.NameToHandleAt(int(f.Fd()), "", unix.AT_EMPTY_PATH)
	if err != nil {
		return nil, fmt.Errorf("name_to_handle_at %s (filesystem without file handles?): %w", dir, err)
	}
	g := &gen{id: id, dir: dir, e: e, root: f, dev: st.Dev, ino: st.Ino,
		attrs: newAttrCache(0), fds: newFDCache(0)}
	g.subvol, _ = btrfsSubvol(fh.Type(), fh.Bytes())
	if g.rootHandle, err = seal(e.key, id, fh.Type(), fh.Bytes()); err != nil {
		return nil, fmt.Errorf("%s: %w", dir, err)
	}
	// Fail now, not on the first client request, without the capability.
	fd, err := g.openHandle(g.rootHandle, unix.O_PATH)
	if err != nil {
		return nil, fmt.Errorf("open %s by handle: %w", dir, err)
	}
	unix.Close(fd)
	g.view = &genFS{g: g, mountHandle: g.rootHandle}
	ok = true
	return g, nil
}

// Remove stops exporting generation id: its handles become NFS3ERR_STALE and
// MOUNT /gen/id fails. It waits for requests using the generation's fd.
func (e *Export) Remove(id uint64) {
	e.mu.Lock()
	g, ok := e.gens[id]
	delete(e.gens, id)
	e.mu.Unlock()
	if !ok {
		return
	}
	e.metrics.generations.Dec()
	g.mu.Lock()
	g.root.Close()
	g.root = nil
	g.mu.Unlock()
	g.fds.purge() // descriptors in use close when their request ends
	g.attrs.purge()
	e.log.Info("nfs export removed", "generation", id)
}

// Generations returns the ids currently exported, in no particular order.
func (e *Export) Generations() []uint64 {
	e.mu.RLock()
	defer e.mu.RUnlock()
	ids := make([]uint64, 0, len(e.gens))
	for id := range e.gens {
		ids = append(ids, id)
	}
	return ids
}

func (e *Export) gen(id uint64) *gen {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.gens[id]
}

// ListenOptions configure the export's listener as strata server runs it.
type ListenOptions struct {
	// Addr is the TCP address (config key nfs.listen).
	Addr string
	// Inner, if set, is a bound listener used instead of binding Addr.
	Inner net.Listener
	// BusyPoll is how long a connection waiting for its next call spins
	// first (nfs.busy_poll); 0 disables busy polling.
	BusyPoll time.Duration
	// Guard are the admission and record limits (nfs.allow, nfs.max_conns,
	// nfs.max_conns_per_client, nfs.idle_timeout); Allow must not be empty.
	Guard guard.Options
}

// Listen binds the export's TCP listener the way strata server does: busy
// polling under the connection guard. log and reg may be nil.
func Listen(o ListenOptions, log *slog.Logger, reg prometheus.Registerer) (*guard.Listener, error) {
	l := o.Inner
	if l == nil {
		var err error
		if l, err = net.Listen("tcp", o.Addr); err != nil {
			return nil, fmt.Errorf("listen nfs %s: %w", o.Addr, err)
		}
	}
	window := o.BusyPoll
	if window == 0 {
		window = -1 // disabled
	}
	bl := busypoll.Listen(l, window)
	if reg != nil {
		if err := reg.Register(bl); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) {
				l.Close()
				return nil, fmt.Errorf("register busy-poll metrics: %w", err)
			}
		}
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	gl, err := guard.Listen(bl, o.Guard, log.With("component", "nfs-guard"), reg)
	if err != nil {
		l.Close()
		return nil, fmt.Errorf("listen nfs %s: %w", l.Addr(), err)
	}
	return gl, nil
}

// Serve answers NFS and MOUNT calls on l until ctx is cancelled, then closes l
// and every connection it accepted and returns nil. Each connection is owned
// by one conn from accept to close (see conn).
func (e *Export) Serve(ctx context.Context, l *guard.Listener) error {
	srv := &gonfs.Server{Handler: e, Context: ctx}
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-ctx.Done():
			l.Close()
			e.closeConns()
		case <-done:
		}
	}()
	e.log.Info("nfs serving", "addr", l.Addr().String())
	err := srv.Serve(&connListener{l: l, e: e})
	if ctx.Err() != nil {
		return nil
	}
	e.closeConns()
	return fmt.Errorf("serve nfs on %s: %w", l.Addr(), err)
}

// Close stops exporting every generation (as Remove) and refuses further Add.
// Stop Serve (cancel its context) first.
func (e *Export) Close() error {
	e.mu.Lock()
	e.closed = true
	ids := make([]uint64, 0, len(e.gens))
	for id := range e.gens {
		ids = append(ids, id)
	}
	e.mu.Unlock()
	for _, id := range ids {
		e.Remove(id)
	}
	e.closeConns()
	return nil
}

// Conns returns the number of open connections.
func (e *Export) Conns() int {
	e.connMu.Lock()
	defer e.connMu.Unlock()
	return len(e.conns)
}

func (e *Export) closeConns() {
	e.connMu.Lock()
	conns := make([]*conn, 0, len(e.conns))
	for c := range e.conns {
		conns = append(conns, c)
	}
	e.connMu.Unlock()
	for _, c := range conns {
		c.Close() // its onClose removes it from e.conns
	}
}

// connListener hands go-nfs connections owned by a conn.
type connListener struct {
	l *guard.Listener
	e *Export
}

func (l *connListener) Addr() net.Addr { return l.l.Addr() }
func (l *connListener) Close() error   { return l.l.Close() }

func (l *connListener) Accept() (net.Conn, error) {
	c, err := l.l.Accept()
	if err != nil {
		return nil, err
	}
	e := l.e
	var s *conn
	s = newConn(c.(*guard.Conn), e, func() {
		e.connMu.Lock()
		delete(e.conns, s)
		e.connMu.Unlock()
	})
	e.connMu.Lock()
	e.conns[s] = struct{}{}
	e.connMu.Unlock()
	return s, nil
}

// Mount answers MOUNT: "/gen/N[/sub/dir]" of a live generation N gives that
// directory's handle; anything else a MOUNT error status (never a nil fs).
func (e *Export) Mount(_ context.Context, c net.Conn, req gonfs.MountRequest) (gonfs.MountStatus, billy.Filesystem, []gonfs.AuthFlavor) {
	p := string(req.Dirpath)
	st, f, err := e.mount(p)
	if err != nil {
		e.log.Info("nfs mount refused", "path", p, "client", remote(c), "err", err)
		return st, e.dead, nil
	}
	e.log.Debug("nfs mount", "path", p, "client", remote(c))
	return gonfs.MountStatusOk, f, []gonfs.AuthFlavor{gonfs.AuthFlavorUnix, gonfs.AuthFlavorNull}
}

func remote(c net.Conn) string {
	if c == nil || c.RemoteAddr() == nil {
		return ""
	}
	return c.RemoteAddr().String()
}

func (e *Export) mount(p string) (gonfs.MountStatus, *genFS, error) {
	id, sub, err := parseMountPath(p)
	if err != nil {
		return gonfs.MountStatusErrNoEnt, nil, err
	}
	g := e.gen(id)
	if g == nil {
		return gonfs.MountStatusErrNoEnt, nil, fmt.Errorf("generation %d is not exported", id)
	}
	if len(sub) == 0 {
		return gonfs.MountStatusOk, &genFS{g: g, mountHandle: g.rootHandle}, nil
	}
	h, err := g.subdirHandle(sub)
	if err != nil {
		switch {
		case errors.Is(err, unix.ENOENT):
			return gonfs.MountStatusErrNoEnt, nil, err
		case errors.Is(err, unix.ENOTDIR), errors.Is(err, unix.ELOOP):
			return gonfs.MountStatusErrNotDir, nil, err
		case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM):
			return gonfs.MountStatusErrAcces, nil, err
		case errors.Is(err, syscall.ESTALE):
			return gonfs.MountStatusErrNoEnt, nil, err
		}
		return gonfs.MountStatusErrIO, nil, err
	}
	return gonfs.MountStatusOk, &genFS{g: g, mountHandle: h}, nil
}

// subdirHandle walks validated components from the generation root with
// openat(O_DIRECTORY|O_NOFOLLOW), so a symlink anywhere on the way fails.
func (g *gen) subdirHandle(comps []string) ([]byte, error) {
	rootfd, err := g.acquire()
	if err != nil {
		return nil, err
	}
	fd, err := unix.Openat(rootfd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	g.mu.RUnlock()
	if err != nil {
		return nil, err
	}
	for _, c := range comps {
		nfd, err := unix.Openat(fd, c, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		unix.Close(fd)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", c, err)
		}
		fd = nfd
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil || st.Dev != g.dev {
			unix.Close(fd)
			return nil, fmt.Errorf("%s: not in the generation: %w", c, unix.ENOENT)
		}
	}
	defer unix.Close(fd)
	fh, _, err := unix.NameToHandleAt(fd, "", unix.AT_EMPTY_PATH)
	if err != nil {
		return nil, err
	}
	return seal(g.e.key, g.id, fh.Type(), fh.Bytes())
}

// Change returns nil: the export is read-only.
func (e *Export) Change(billy.Filesystem) billy.Change { return nil }

// FSStat reports the generation filesystem's sizes. Nothing is available
// (read-only), and attributes may be cached for an hour: a generation never
// changes.
func (e *Export) FSStat(_ context.Context, f billy.Filesystem, s *gonfs.FSStat) error {
	s.CacheHint = time.Hour
	gf, ok := f.(*genFS)
	if !ok {
		return nil
	}
	fd, err := gf.g.acquire()
	if err != nil {
		return &gonfs.NFSStatusError{NFSStatus: gonfs.NFSStatusStale, WrappedErr: err}
	}
	defer gf.g.mu.RUnlock()
	var sf unix.Statfs_t
	if err := unix.Fstatfs(fd, &sf); err != nil {
		return nil // keep go-nfs's defaults
	}
	bs := uint64(sf.Bsize)
	s.TotalSize, s.FreeSize, s.AvailableSize = sf.Blocks*bs, sf.Bfree*bs, 0
	s.TotalFiles, s.FreeFiles, s.AvailableFiles = sf.Files, sf.Ffree, 0
	return nil
}

// ToHandle returns the sealed handle for a token path (see name.go), or nil
// when it cannot (go-nfs then sends an empty handle).
func (e *Export) ToHandle(f billy.Filesystem, path []string) []byte {
	gf, ok := f.(*genFS)
	if !ok || gf.g.id == 0 {
		return nil
	}
	if len(path) == 0 {
		return gf.mountHandle
	}
	h, err := gf.g.handleOf(gf.Join(path...))
	if err != nil {
		e.log.Debug("nfs handle", "generation", gf.g.id, "err", err)
		return nil
	}
	return h
}

// FromHandle unseals a handle: a bad MAC, an unknown or removed generation
// or a handle of another subvolume is an error (NFS3ERR_STALE).
func (e *Export) FromHandle(b []byte) (billy.Filesystem, []string, error) {
	g, err := e.genOf(b)
	if err != nil {
		return nil, nil, err
	}
	return g.view, handlePath(b), nil
}

// genOf returns the live generation handle b belongs to, or errBadHandle.
func (e *Export) genOf(b []byte) (*gen, error) {
	if len(b) < handleHeader || len(b) > maxHandle {
		return nil, errBadHandle
	}
	g := e.gen(binary.BigEndian.Uint64(b[4:12]))
	if g == nil {
		return nil, errBadHandle
	}
	if _, err := g.unseal(b); err != nil {
		return nil, err
	}
	return g, nil
}

// InvalidateHandle does nothing: handles are stateless.
func (e *Export) InvalidateHandle(billy.Filesystem, []byte) error { return nil }

// HandleLimit is effectively unlimited: handles cost no memory. go-nfs also
// caps READDIR replies at HandleLimit()/2 entries.
func (e *Export) HandleLimit() int { return 1 << 30 }

// VerifierFor caches a directory listing and returns its cookie verifier. The
// verifier is a hash of the directory's token path (generation, kernel handle
// and MAC), so it is the same after a restart and a client can resume a
// READDIR with an old cookie: generations never change, and go-nfs's cookies
// are indexes into the sorted listing.
func (e *Export) VerifierFor(path string, contents []fs.FileInfo) uint64 {
	v := verifier(path)
	e.dirs.add(v, path, contents)
	return v
}

// DataForVerifier returns the cached listing, or nil (go-nfs then re-reads
// the directory and calls VerifierFor).
func (e *Export) DataForVerifier(path string, v uint64) []fs.FileInfo {
	return e.dirs.get(v, path)
}

func verifier(path string) uint64 {
	sum := sha256.Sum256([]byte("strata-nfs-readdir\x00" + path))
	return binary.BigEndian.Uint64(sum[:8]) | 1 // never 0: 0 means "no verifier"
}
