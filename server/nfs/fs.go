package nfs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	billy "github.com/go-git/go-billy/v5"
	"golang.org/x/sys/unix"
)

// btrfs kernel handle types (include/linux/exportfs.h): every one starts with
// u64 objectid, u64 root_objectid (the subvolume), u32 generation, little endian.
const (
	fileidBtrfsWithoutParent    = 0x4d
	fileidBtrfsWithParent       = 0x4e
	fileidBtrfsWithParentRoot   = 0x4f
	btrfsRootObjectidOffset     = 8
	btrfsMinHandle              = 20
	openByHandleFlags           = unix.O_CLOEXEC | unix.O_NOFOLLOW
	errNeedsCapDacReadSearchFmt = "open_by_handle_at needs CAP_DAC_READ_SEARCH: %w"
)

// gen is one exported generation: an O_RDONLY directory fd on its store
// directory (the mount fd for open_by_handle_at; it must not be O_PATH), and
// the identity every resolved object must share.
type gen struct {
	id   uint64
	dir  string
	e    *Export
	mu   sync.RWMutex // held for reading while the fd is in use; Remove takes it for writing
	root *os.File     // nil once removed
	dev  uint64       // st_dev of the store directory: every object must be on it
	ino  uint64       // st_ino of the store directory
	// subvol is the btrfs subvolume (root objectid) of the store directory,
	// or 0 when it is not on btrfs. On btrfs any fd of the filesystem opens
	// any subvolume's handle, so a handle must name this subvolume.
	subvol     uint64
	rootHandle []byte // sealed handle of the store directory

	attrs *attrCache // what is known about its objects (cache.go)
	fds   *fdCache   // open descriptors of recently used directories and files
	view  *genFS     // the generation-root view FromHandle hands go-nfs
}

func isBtrfsHandle(t int32) bool {
	return t == fileidBtrfsWithoutParent || t == fileidBtrfsWithParent || t == fileidBtrfsWithParentRoot
}

func btrfsSubvol(t int32, kh []byte) (uint64, bool) {
	if !isBtrfsHandle(t) || len(kh) < btrfsMinHandle {
		return 0, false
	}
	return binary.LittleEndian.Uint64(kh[btrfsRootObjectidOffset:]), true
}

// owns reports whether kernel handle kh may belong to this generation
// (checked before opening; the st_dev check after opening is the other half).
func (g *gen) owns(s sealed) bool {
	if s.gen != g.id {
		return false
	}
	if g.subvol != 0 {
		sv, ok := btrfsSubvol(s.ktype, s.kh)
		return ok && sv == g.subvol
	}
	return true
}

// acquire returns the root fd, or an error once the generation is removed.
// The caller must call g.mu.RUnlock when done with the fd.
func (g *gen) acquire() (int, error) {
	g.mu.RLock()
	if g.root == nil {
		g.mu.RUnlock()
		return -1, fmt.Errorf("generation %d: %w", g.id, syscall.ESTALE)
	}
	return int(g.root.Fd()), nil
}

// openHandle opens the object sealed in h with flags (plus O_CLOEXEC,
// O_NOFOLLOW) and checks it is this generation's. Symlinks open only with
// O_PATH; directories and files with any read flags.
func (g *gen) openHandle(h []byte, flags int) (int, error) {
	var st unix.Stat_t
	return g.openHandleStat(h, flags, &st)
}

// known reports whether h is in the attribute cache: those bytes were
// unsealed (MAC checked) or sealed here, for this generation.
func (g *gen) known(h []byte) bool {
	var kb keyBuf
	_, ok := g.attrs.get(kb.view(keyObject, h, ""))
	return ok
}

// unseal is unseal with the generation's checks, skipping the MAC for a
// known handle.
func (g *gen) unseal(h []byte) (sealed, error) {
	var s sealed
	var err error
	if g.known(h) {
		s, err = parseSealed(h)
	} else {
		s, err = unseal(g.e.key, h)
	}
	if err != nil || !g.owns(s) {
		return sealed{}, errBadHandle
	}
	return s, nil
}

// openHandleStat is openHandle that also returns the object's fstat; with
// st nil it neither stats nor checks the device (for a handle whose checked
// attributes are cached).
func (g *gen) openHandleStat(h []byte, flags int, st *unix.Stat_t) (int, error) {
	s, err := g.unseal(h)
	if err != nil {
		return -1, syscall.ESTALE
	}
	rootfd, err := g.acquire()
	if err != nil {
		return -1, err
	}
	defer g.mu.RUnlock()
	fd, err := unix.OpenByHandleAt(rootfd, unix.NewFileHandle(s.ktype, s.kh), flags|openByHandleFlags)
	if err != nil {
		if errors.Is(err, unix.EPERM) {
			return -1, fmt.Errorf(errNeedsCapDacReadSearchFmt, err)
		}
		return -1, err
	}
	if st == nil {
		return fd, nil
	}
	if err := unix.Fstat(fd, st); err != nil {
		unix.Close(fd)
		return -1, err
	}
	if st.Dev != g.dev {
		unix.Close(fd)
		return -1, syscall.ESTALE
	}
	return fd, nil
}

// openRef opens what r names: the object itself (flags), its parent directory
// or, for an entry name, its directory (O_RDONLY|O_DIRECTORY; the caller uses
// *at calls with r.name).
func (g *gen) openRef(r ref, flags int) (int, error) {
	switch {
	case r.root:
		return g.openHandle(g.rootHandle, flags)
	case r.name != "":
		return g.openHandle(r.handle, unix.O_RDONLY|unix.O_DIRECTORY)
	case r.parent:
		fd, err := g.openHandle(r.handle, unix.O_RDONLY|unix.O_DIRECTORY)
		if err != nil {
			return -1, err
		}
		defer unix.Close(fd)
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return -1, err
		}
		if st.Ino == g.ino { // the generation root is its own parent
			return unix.Openat(fd, ".", flags|unix.O_CLOEXEC, 0)
		}
		pfd, err := unix.Openat(fd, "..", flags|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
		if err != nil {
			return -1, err
		}
		if err := unix.Fstat(pfd, &st); err != nil || st.Dev != g.dev {
			unix.Close(pfd)
			return -1, syscall.ESTALE
		}
		return pfd, nil
	default:
		return g.openHandle(r.handle, flags)
	}
}

// handleOf returns the sealed handle for path p (ToHandle).
func (g *gen) handleOf(p string) ([]byte, error) {
	r, err := parseRef(p)
	if err != nil {
		return nil, err
	}
	if r.root {
		return g.rootHandle, nil
	}
	if !r.parent && r.name == "" {
		return r.handle, nil // already sealed and checked by FromHandle
	}
	e, err := g.resolve(r)
	if err != nil {
		return nil, err
	}
	if e.handle == nil {
		return nil, syscall.EXDEV // a nested subvolume or mount: not part of this generation
	}
	return e.handle, nil
}

// resolve returns the attributes and sealed handle of what r names, from
// the attribute cache when it can; a miss opens and stats the object
// (checking MAC, generation and device as openHandle does) and caches it.
func (g *gen) resolve(r ref) (attrEntry, error) {
	h := r.handle
	if r.root {
		h = g.rootHandle
	}
	kind := byte(keyObject)
	switch {
	case r.name != "":
		kind = keyChild
	case r.parent:
		kind = keyParent
	}
	var kb keyBuf
	if e, ok := g.attrs.get(kb.view(kind, h, r.name)); ok {
		return e, nil
	}
	key := cacheKey(kind, h, r.name)
	var e attrEntry
	var err error
	switch {
	case r.name != "":
		e, err = g.statChild(h, r.name)
	case r.parent:
		e, err = g.statParent(ref{handle: h, parent: true})
	default:
		e, err = g.statObject(h)
	}
	if err != nil {
		return attrEntry{}, err
	}
	g.attrs.add(key, e)
	if r.name != "" && e.handle != nil {
		// The child's own handle is what the client asks about next.
		obj := *e.info
		obj.name = ""
		g.attrs.add(cacheKey(keyObject, e.handle, ""), attrEntry{handle: e.handle, info: &obj})
	}
	return e, nil
}

// statObject stats the object sealed in h without following it.
func (g *gen) statObject(h []byte) (attrEntry, error) {
	var st unix.Stat_t
	fd, err := g.openHandleStat(h, unix.O_PATH, &st)
	if err != nil {
		return attrEntry{}, err
	}
	unix.Close(fd)
	return attrEntry{handle: h, info: newInfo("", &st)}, nil
}

// statChild stats entry name of directory h (never following it) and makes
// its handle.
func (g *gen) statChild(h []byte, name string) (attrEntry, error) {
	d, err := g.dirFD(h)
	if err != nil {
		return attrEntry{}, err
	}
	defer g.fds.release(d)
	var st unix.Stat_t
	if err := unix.Fstatat(d.fd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return attrEntry{}, err
	}
	if st.Dev != g.dev {
		return attrEntry{}, syscall.ENOENT // a mount point inside: not exported
	}
	e := attrEntry{info: newInfo(name, &st)}
	fh, _, err := unix.NameToHandleAt(d.fd, name, 0) // 0: never follows a final symlink
	if err != nil {
		return attrEntry{}, err
	}
	if e.handle, err = g.sealOwn(fh); err != nil && !errors.Is(err, syscall.EXDEV) {
		return attrEntry{}, err
	}
	return e, nil
}

// statParent stats the parent directory of r.handle and makes its handle.
func (g *gen) statParent(r ref) (attrEntry, error) {
	fd, err := g.openRef(r, unix.O_PATH)
	if err != nil {
		return attrEntry{}, err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return attrEntry{}, err
	}
	fh, _, err := unix.NameToHandleAt(fd, "", unix.AT_EMPTY_PATH)
	if err != nil {
		return attrEntry{}, err
	}
	e := attrEntry{info: newInfo("", &st)}
	if e.handle, err = g.sealOwn(fh); err != nil && !errors.Is(err, syscall.EXDEV) {
		return attrEntry{}, err
	}
	return e, nil
}

// sealOwn seals a kernel handle of this generation; a handle of another
// btrfs subvolume (a nested subvolume) is EXDEV.
func (g *gen) sealOwn(fh unix.FileHandle) ([]byte, error) {
	if g.subvol != 0 {
		if sv, ok := btrfsSubvol(fh.Type(), fh.Bytes()); !ok || sv != g.subvol {
			return nil, syscall.EXDEV
		}
	}
	return seal(g.e.key, g.id, fh.Type(), fh.Bytes())
}

// dirFD returns an O_RDONLY descriptor of directory h, cached.
func (g *gen) dirFD(h []byte) (*sharedFD, error) {
	key := cacheKey(keyDirFD, h, "")
	if d := g.fds.get(key); d != nil {
		return d, nil
	}
	fd, err := g.openHandle(h, unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return nil, err
	}
	return g.fds.put(key, fd), nil
}

// genFS is the billy.Filesystem go-nfs sees for one generation: read-only and
// fd-relative. Every name it gets is a token path (see name.go); it never
// follows a symlink (open_by_handle_at never does; openat uses O_NOFOLLOW,
// fstatat AT_SYMLINK_NOFOLLOW; readlinkat reads the link itself).
type genFS struct {
	g *gen
	// mountHandle is the handle MOUNT returned for this view (the generation
	// root, or a directory below it for MOUNT /gen/N/sub/dir).
	mountHandle []byte
}

var _ billy.Filesystem = (*genFS)(nil)
var _ billy.Capable = (*genFS)(nil)

func pathErr(op, p string, err error) error {
	if _, ok := err.(*os.PathError); ok {
		return err
	}
	if errors.Is(err, errBadName) {
		err = syscall.ENOENT
	}
	return &os.PathError{Op: op, Path: p, Err: err}
}

// Capabilities has no WriteCapability: go-nfs answers every mutating procedure
// with NFS3ERR_ROFS (COMMIT with NFS3ERR_SERVERFAULT, a go-nfs choice).
func (f *genFS) Capabilities() billy.Capability {
	return billy.ReadCapability | billy.SeekCapability
}

// Join joins elements with "/" and nothing else: no cleaning, so ".." and
// empty names reach parseRef and are judged there.
func (f *genFS) Join(elem ...string) string { return strings.Join(elem, "/") }

// Lstat stats the object without following a symlink.
func (f *genFS) Lstat(p string) (os.FileInfo, error) {
	r, err := parseRef(p)
	if err != nil {
		return nil, pathErr("lstat", p, err)
	}
	e, err := f.g.resolve(r)
	if err != nil {
		return nil, pathErr("lstat", p, err)
	}
	return e.info, nil
}

// Stat is Lstat: the export never follows symlinks server-side.
func (f *genFS) Stat(p string) (os.FileInfo, error) { return f.Lstat(p) }

// Readlink returns a symlink's target verbatim.
func (f *genFS) Readlink(p string) (string, error) {
	r, err := parseRef(p)
	if err != nil {
		return "", pathErr("readlink", p, err)
	}
	fd, err := f.g.openRef(r, unix.O_PATH)
	if err != nil {
		return "", pathErr("readlink", p, err)
	}
	defer unix.Close(fd)
	buf := make([]byte, unix.PathMax)
	n, err := unix.Readlinkat(fd, r.name, buf) // "" reads the O_PATH fd's own link
	if err != nil {
		return "", pathErr("readlink", p, err)
	}
	return string(buf[:n]), nil
}

// Open opens a regular file for reading. Directories, symlinks and special
// files are refused, so READ never returns data from anything else. Files
// opened by handle stay open in the generation's descriptor cache, so the
// READs that follow one another on a large file reuse the descriptor.
func (f *genFS) Open(p string) (billy.File, error) {
	r, err := parseRef(p)
	if err != nil {
		return nil, pathErr("open", p, err)
	}
	g := f.g
	if !r.root && !r.parent && r.name == "" {
		rf, _, err := g.openFile(r.handle, p)
		if err != nil {
			return nil, pathErr("open", p, err)
		}
		return rf, nil
	}
	var fd int
	if r.name == "" {
		fd, err = g.openRef(r, unix.O_RDONLY|unix.O_NONBLOCK)
	} else {
		var d *sharedFD
		d, err = g.dirFD(r.handle)
		if err == nil {
			fd, err = unix.Openat(d.fd, r.name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
			g.fds.release(d)
		}
	}
	if err != nil {
		return nil, pathErr("open", p, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, pathErr("open", p, err)
	}
	if err := g.checkReadable(&st); err != nil {
		unix.Close(fd)
		return nil, pathErr("open", p, err)
	}
	return &roFile{name: p, s: &sharedFD{fd: fd, refs: 1}, c: g.fds, m: g.e.metrics}, nil
}

// checkReadable refuses all but regular files of the generation.
func (g *gen) checkReadable(st *unix.Stat_t) error {
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Dev != g.dev {
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			return syscall.EISDIR
		}
		return syscall.EACCES
	}
	return nil
}

// openFile opens the regular file sealed in h for reading, from the
// descriptor cache when it can, and returns its attributes (go-nfs's READ
// stats the file right after opening it: they are cached too).
func (g *gen) openFile(h []byte, name string) (*roFile, *info, error) {
	var kb, fb keyBuf
	e, known := g.attrs.get(kb.view(keyObject, h, ""))
	known = known && e.info.mode&unix.S_IFMT == unix.S_IFREG
	if s := g.fds.get(fb.view(keyFileFD, h, "")); s != nil {
		if known {
			return &roFile{name: name, s: s, c: g.fds, m: g.e.metrics}, e.info, nil
		}
		g.fds.release(s)
	}
	in := e.info
	var fd int
	var err error
	if known {
		// The cached attributes are this object's, taken (and checked for
		// device and type) when its handle was made or first opened.
		fd, err = g.openHandleStat(h, unix.O_RDONLY|unix.O_NONBLOCK, nil)
	} else {
		var st unix.Stat_t
		if fd, err = g.openHandleStat(h, unix.O_RDONLY|unix.O_NONBLOCK, &st); err == nil {
			if err = g.checkReadable(&st); err != nil {
				unix.Close(fd)
			}
		}
		if err == nil {
			in = newInfo("", &st)
			g.attrs.add(cacheKey(keyObject, h, ""), attrEntry{handle: h, info: in})
		}
	}
	if err != nil {
		return nil, nil, err
	}
	s := g.fds.put(cacheKey(keyFileFD, h, ""), fd)
	return &roFile{name: name, s: s, c: g.fds, m: g.e.metrics}, in, nil
}

// OpenFile opens for reading only; any write flag is EROFS.
func (f *genFS) OpenFile(p string, flag int, _ os.FileMode) (billy.File, error) {
	if flag&(os.O_WRONLY|os.O_RDWR|os.O_CREATE|os.O_TRUNC|os.O_APPEND) != 0 {
		return nil, pathErr("open", p, syscall.EROFS)
	}
	return f.Open(p)
}

// ReadDir lists a directory with lstat information, sorted by name. Names
// come from getdents, attributes from fstatat(AT_SYMLINK_NOFOLLOW) relative
// to the directory fd.
func (f *genFS) ReadDir(p string) ([]os.FileInfo, error) {
	r, err := parseRef(p)
	if err != nil {
		return nil, pathErr("readdir", p, err)
	}
	var fd int
	if r.name == "" {
		fd, err = f.g.openRef(r, unix.O_RDONLY|unix.O_DIRECTORY)
	} else {
		var dfd int
		dfd, err = f.g.openRef(r, 0)
		if err == nil {
			fd, err = unix.Openat(dfd, r.name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			unix.Close(dfd)
		}
	}
	if err != nil {
		return nil, pathErr("readdir", p, err)
	}
	dir := os.NewFile(uintptr(fd), p)
	defer dir.Close()
	names, err := dir.Readdirnames(-1)
	if err != nil {
		return nil, pathErr("readdir", p, err)
	}
	sort.Strings(names)
	out := make([]os.FileInfo, 0, len(names))
	var st unix.Stat_t
	for _, n := range names {
		if err := unix.Fstatat(fd, n, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			if errors.Is(err, unix.ENOENT) {
				continue
			}
			return nil, pathErr("readdir", p+"/"+n, err)
		}
		out = append(out, newInfo(n, &st))
	}
	return out, nil
}

// Every mutating call is EROFS. go-nfs does not call them on a filesystem
// without WriteCapability; they exist to satisfy billy.Filesystem.
func (f *genFS) Create(p string) (billy.File, error) { return nil, pathErr("create", p, syscall.EROFS) }
func (f *genFS) Rename(a, _ string) error            { return pathErr("rename", a, syscall.EROFS) }
func (f *genFS) Remove(p string) error               { return pathErr("remove", p, syscall.EROFS) }
func (f *genFS) MkdirAll(p string, _ os.FileMode) error {
	return pathErr("mkdir", p, syscall.EROFS)
}
func (f *genFS) Symlink(_, l string) error { return pathErr("symlink", l, syscall.EROFS) }
func (f *genFS) TempFile(d, _ string) (billy.File, error) {
	return nil, pathErr("tempfile", d, syscall.EROFS)
}
func (f *genFS) Chroot(p string) (billy.Filesystem, error) {
	return nil, pathErr("chroot", p, billy.ErrNotSupported)
}
func (f *genFS) Root() string { return "/" }

// roFile is an open regular file, read-only. Its descriptor may be shared
// with the descriptor cache, so it reads with pread and keeps its own offset.
type roFile struct {
	name string
	s    *sharedFD
	c    *fdCache
	m    *metrics
	mu   sync.Mutex // guards off and closed
	off  int64
	done bool
}

func (r *roFile) Name() string { return r.name }

func (r *roFile) Read(b []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.done {
		return 0, os.ErrClosed
	}
	n, err := r.readAt(b, r.off)
	r.off += int64(n)
	return n, err
}

// ReadAt reads len(b) bytes at off, or fewer and io.EOF at the end of the file.
func (r *roFile) ReadAt(b []byte, off int64) (int, error) {
	if off < 0 {
		return 0, syscall.EINVAL
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.done {
		return 0, os.ErrClosed
	}
	return r.readAt(b, off)
}

func (r *roFile) readAt(b []byte, off int64) (int, error) {
	n := 0
	for n < len(b) {
		m, err := unix.Pread(r.s.fd, b[n:], off+int64(n))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			r.m.readBytes.Add(float64(n))
			return n, &os.PathError{Op: "read", Path: r.name, Err: err}
		}
		if m == 0 {
			r.m.readBytes.Add(float64(n))
			return n, io.EOF
		}
		n += m
	}
	r.m.readBytes.Add(float64(n))
	return n, nil
}

func (r *roFile) Seek(off int64, whence int) (int64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		off += r.off
	case io.SeekEnd:
		var st unix.Stat_t
		if err := unix.Fstat(r.s.fd, &st); err != nil {
			return 0, err
		}
		off += st.Size
	default:
		return 0, syscall.EINVAL
	}
	if off < 0 {
		return 0, syscall.EINVAL
	}
	r.off = off
	return off, nil
}

func (r *roFile) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.done {
		return os.ErrClosed
	}
	r.done = true
	r.c.release(r.s)
	return nil
}

func (r *roFile) Write([]byte) (int, error) { return 0, syscall.EROFS }
func (r *roFile) Truncate(int64) error      { return syscall.EROFS }
func (r *roFile) Lock() error               { return nil }
func (r *roFile) Unlock() error             { return nil }

var _ io.ReaderAt = (*roFile)(nil)

// info is a compact lstat result. go-nfs reads nlink, uid, gid, rdev and the
// inode (its fileid) from Sys(), which must be a *syscall.Stat_t.
type info struct {
	name  string
	mode  uint32 // st_mode
	nlink uint32
	uid   uint32
	gid   uint32
	size  int64
	mtime int64 // seconds
	mnsec int32
	ino   uint64
	rdev  uint64
}

func newInfo(name string, st *unix.Stat_t) *info {
	return &info{
		name: name, mode: st.Mode, nlink: uint32(st.Nlink), uid: st.Uid, gid: st.Gid,
		size: st.Size, mtime: st.Mtim.Sec, mnsec: int32(st.Mtim.Nsec), ino: st.Ino, rdev: st.Rdev,
	}
}

func (i *info) Name() string       { return i.name }
func (i *info) Size() int64        { return i.size }
func (i *info) ModTime() time.Time { return time.Unix(i.mtime, int64(i.mnsec)) }
func (i *info) IsDir() bool        { return i.mode&unix.S_IFMT == unix.S_IFDIR }

// Mode is the Go file mode with one deliberate extension: the setuid, setgid
// and sticky bits are kept as raw Unix bits 0o7000 (unused by os.FileMode),
// because go-nfs sends uint32(Mode()) as the NFS mode and would otherwise
// drop them. Perm() is unaffected.
func (i *info) Mode() fs.FileMode {
	m := fs.FileMode(i.mode & 0o7777)
	switch i.mode & unix.S_IFMT {
	case unix.S_IFDIR:
		m |= fs.ModeDir
	case unix.S_IFLNK:
		m |= fs.ModeSymlink
	case unix.S_IFCHR:
		m |= fs.ModeDevice | fs.ModeCharDevice
	case unix.S_IFBLK:
		m |= fs.ModeDevice
	case unix.S_IFIFO:
		m |= fs.ModeNamedPipe
	case unix.S_IFSOCK:
		m |= fs.ModeSocket
	}
	return m
}

func (i *info) Sys() any {
	return &syscall.Stat_t{
		Ino: i.ino, Nlink: uint64(i.nlink), Mode: i.mode, Uid: i.uid, Gid: i.gid,
		Rdev: i.rdev, Size: i.size,
		Mtim: syscall.Timespec{Sec: i.mtime, Nsec: int64(i.mnsec)},
	}
}

// weight is the approximate memory an info holds, for the listing cache.
func (i *info) weight() int { return 80 + len(i.name) }
