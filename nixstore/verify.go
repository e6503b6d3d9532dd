package nixstore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// VerifyError lists what Verify found wrong. Each list is complete and
// sorted in the order of the registration; Error shows the first few.
type VerifyError struct {
	// Outside are registered paths not directly under the logical store
	// directory.
	Outside []string
	// Missing are registered paths with no entry in the physical store
	// directory.
	Missing []string
	// Unregistered are references (as "REF (referenced by PATH)") to paths
	// that are not registered: the closure is incomplete.
	Unregistered []string
}

// maxListed is how many items of each kind a VerifyError message shows.
const maxListed = 5

func (e *VerifyError) Error() string {
	var parts []string
	add := func(list []string, one, many string) {
		if len(list) == 0 {
			return
		}
		what := many
		if len(list) == 1 {
			what = one
		}
		shown := list[:min(len(list), maxListed)]
		s := fmt.Sprintf("%d %s: %s", len(list), what, strings.Join(shown, ", "))
		if len(list) > len(shown) {
			s += fmt.Sprintf(", … and %d more", len(list)-len(shown))
		}
		parts = append(parts, s)
	}
	add(e.Outside, "registered path outside the store directory", "registered paths outside the store directory")
	add(e.Missing, "registered path missing from snapshot", "registered paths missing from snapshot")
	add(e.Unregistered, "reference not registered", "references not registered")
	return "verify registration: " + strings.Join(parts, "; ")
}

// Verify checks that a registration describes the store it comes with:
// every path in infos is directly under logicalStoreDir (the store
// directory the paths are named in, e.g. /nix/store), exists in storeDir
// (the physical directory holding that store, e.g. SNAP/store: it has an
// entry of that name, whatever its type; a symlink is not followed), and every reference is itself
// registered, so the registration is closure-complete. Derivers need not be
// registered. It returns nil or a *VerifyError listing every problem; other
// errors (say, storeDir unreadable) are returned as they are.
func Verify(storeDir, logicalStoreDir string, infos []PathInfo) error {
	paths := make([]string, len(infos))
	for i := range infos {
		paths[i] = infos[i].Path
	}
	ve, err := present(storeDir, logicalStoreDir, paths)
	if err != nil {
		return err
	}
	registered := make(map[string]struct{}, len(infos))
	for _, p := range paths {
		registered[p] = struct{}{}
	}
	for i := range infos {
		for _, r := range infos[i].References {
			if _, ok := registered[r]; !ok {
				ve.Unregistered = append(ve.Unregistered, r+" (referenced by "+infos[i].Path+")")
			}
		}
	}
	if len(ve.Outside)+len(ve.Missing)+len(ve.Unregistered) > 0 {
		return ve
	}
	return nil
}

// VerifyPresent is the part of Verify that looks at the store: every path
// of paths is directly under logicalStoreDir and has an entry in storeDir.
// It leaves out the closure check, for a registration whose sha256 already
// equals that of one Verify passed (a replica's copy of its primary's).
func VerifyPresent(storeDir, logicalStoreDir string, paths []string) error {
	return NewStoreNames(logicalStoreDir, paths).Verify(storeDir)
}

// StoreNames are the names registered paths have in their store directory,
// gathered once: a replica gathers them while a generation's stream
// arrives and checks the received store once it has (VerifyAdded, or
// Verify, which builds its index of every name on first use).
type StoreNames struct {
	paths   []string
	prefix  string         // the store directory, with a trailing slash
	once    sync.Once      // builds want
	want    map[string]int // base name -> the index of its first path
	outside []string
}

// base returns the name of p in the store directory, ok=false if p is not
// directly under it.
func (n *StoreNames) base(p string) (string, bool) {
	b, ok := strings.CutPrefix(p, n.prefix)
	return b, ok && b != "" && b != "." && b != ".." && !strings.Contains(b, "/")
}

// NewStoreNames gathers the names of paths in logicalStoreDir (the store
// directory they are named in, e.g. /nix/store).
func NewStoreNames(logicalStoreDir string, paths []string) *StoreNames {
	prefix := filepath.Clean(logicalStoreDir)
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	n := &StoreNames{paths: paths, prefix: prefix}
	for _, p := range paths {
		if _, ok := n.base(p); !ok {
			n.outside = append(n.outside, p)
		}
	}
	return n
}

// index returns every name's index in paths (its first), built once.
func (n *StoreNames) index() map[string]int {
	n.once.Do(func() {
		n.want = make(map[string]int, len(n.paths))
		for i := len(n.paths) - 1; i >= 0; i-- {
			if b, ok := n.base(n.paths[i]); ok {
				n.want[b] = i
			}
		}
	})
	return n.want
}

// Verify checks that every path is directly under the store directory and
// has an entry in storeDir (the physical directory holding that store); it
// returns nil or a *VerifyError (Outside, Missing).
func (n *StoreNames) Verify(storeDir string) error {
	ve, err := n.check(storeDir)
	if err != nil {
		return err
	}
	if len(ve.Outside)+len(ve.Missing) > 0 {
		return ve
	}
	return nil
}

// VerifyAdded is Verify for a store directory known to hold every path
// of n except those of added: a replica's generation received as an
// incremental stream on top of a generation whose store was checked here
// (the stream carries what changed; the primary checked its own store of
// the new generation before publishing it). Every path must be directly
// under the store directory, as for Verify, and each path of added must
// have an entry in storeDir, looked up by name (a symlink is not
// followed): a thousand lookups instead of reading a store directory of a
// hundred thousand entries. It returns nil or a *VerifyError.
func (n *StoreNames) VerifyAdded(storeDir string, added []string) error {
	dirFD, err := unix.Open(storeDir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("verify registration: open store %s: %w", storeDir, err)
	}
	defer unix.Close(dirFD)
	ve := &VerifyError{Outside: n.outside}
	for _, p := range added {
		b, ok := n.base(p)
		if !ok {
			continue // outside: listed once, from every path
		}
		var st unix.Stat_t
		err := unix.Fstatat(dirFD, b, &st, unix.AT_SYMLINK_NOFOLLOW)
		for err == unix.EINTR {
			err = unix.Fstatat(dirFD, b, &st, unix.AT_SYMLINK_NOFOLLOW)
		}
		switch {
		case err == unix.ENOENT:
			ve.Missing = append(ve.Missing, p)
		case err != nil:
			return fmt.Errorf("verify registration: store %s: %s: %w", storeDir, b, err)
		}
	}
	if len(ve.Outside)+len(ve.Missing) > 0 {
		return ve
	}
	return nil
}

func (n *StoreNames) check(storeDir string) (*VerifyError, error) {
	dirFD, err := unix.Open(storeDir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("verify registration: open store %s: %w", storeDir, err)
	}
	defer unix.Close(dirFD)
	missing, err := n.missing(dirFD)
	if err != nil {
		return nil, fmt.Errorf("verify registration: store %s: %w", storeDir, err)
	}
	return &VerifyError{Outside: n.outside, Missing: missing}, nil
}

// present returns the paths outside logicalStoreDir and those missing from
// storeDir.
func present(storeDir, logicalStoreDir string, paths []string) (*VerifyError, error) {
	return NewStoreNames(logicalStoreDir, paths).check(storeDir)
}

// missing returns the paths directly under the store directory whose name
// has no entry in the directory dirFD, in input order.
// It reads the directory once (getdents) instead of looking each name up:
// a lookup makes the kernel load the entry's inode, which for a snapshot
// just taken or received is not cached (about 8 µs a path on btrfs, most of
// a publish's check), while the directory's entries come in large batches
// (a 100,000-entry store reads in about 50 ms). An entry exists exactly when
// lstat of its name would succeed.
func (s *StoreNames) missing(dirFD int) ([]string, error) {
	want := s.index()
	found := make([]bool, len(s.paths))
	// Read from the start through a descriptor of our own: dirFD's offset
	// is not ours to move.
	fd, err := unix.Openat(dirFD, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open: %w", err)
	}
	defer unix.Close(fd)
	buf := make([]byte, 256<<10)
	for {
		n, err := unix.ReadDirent(fd, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read directory: %w", err)
		}
		if n <= 0 {
			break
		}
		// struct linux_dirent64: d_ino u64, d_off s64, d_reclen u16,
		// d_type u8, d_name (NUL-terminated).
		for b := buf[:n]; len(b) >= 19; {
			reclen := int(binary.NativeEndian.Uint16(b[16:18]))
			if reclen < 19 || reclen > len(b) {
				return nil, errors.New("read directory: malformed entry")
			}
			name := b[19:reclen]
			if k := bytes.IndexByte(name, 0); k >= 0 {
				name = name[:k]
			}
			if i, ok := want[string(name)]; ok {
				found[i] = true
			}
			b = b[reclen:]
		}
	}
	var missing []string
	for _, p := range s.paths {
		if b, ok := s.base(p); ok && !found[want[b]] {
			missing = append(missing, p)
		}
	}
	return missing, nil
}
