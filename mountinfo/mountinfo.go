// Package mountinfo reads the kernel's mount table, /proc/<pid>/mountinfo
// (proc(5)): every strata component that must know what is mounted where
// (the overlay swap, the builder's reconcile, the snapshot backends) reads it
// through this one parser.
package mountinfo

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Mount is one line of /proc/<pid>/mountinfo (proc(5)):
//
//	36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
//	(1)(2)(3)   (4)   (5)         (6)       (7)     (8) (9)  (10)      (11)
//
// Root, Mountpoint and Source have the kernel's octal escapes (\040 for a
// space, \011, \012, \134) decoded. SuperOptions is kept as the kernel
// printed it, because its escaping depends on the filesystem; use Option (or
// overlay.LayersOf) to read values from it.
type Mount struct {
	ID       int // (1) unique mount id (reused after unmount)
	ParentID int // (2) id of the parent mount; equal to ID for the namespace root
	Major    uint32
	Minor    uint32 // (3) st_dev of files on this mount
	// Root is the directory of the filesystem that is mounted here (not "/"
	// for bind mounts and btrfs subvolumes).
	Root string
	// Mountpoint is where the mount sits, relative to the reading process's root.
	Mountpoint string
	// Options are the per-mount options (rw/ro, nosuid, relatime, ...).
	Options string
	// Optional are the optional fields, e.g. "shared:1", "master:2",
	// "propagate_from:3", "unbindable".
	Optional []string
	FSType   string // (9), e.g. "overlay", "nfs", "tmpfs"
	Source   string // (10), e.g. "strata", "host:/gen/7", "/dev/sda1"
	// SuperOptions are the per-superblock options, raw (escapes not decoded).
	SuperOptions string
}

// PeerGroup returns the peer group id when the mount is shared (the
// "shared:N" optional field), or 0 when it is not.
func (m Mount) PeerGroup() int { return m.optionalInt("shared:") }

// Master returns the peer group the mount receives propagation from (the
// "master:N" optional field: the mount is a slave), or 0.
func (m Mount) Master() int { return m.optionalInt("master:") }

func (m Mount) optionalInt(prefix string) int {
	for _, f := range m.Optional {
		if v, ok := strings.CutPrefix(f, prefix); ok {
			n, err := strconv.Atoi(v)
			if err == nil {
				return n
			}
		}
	}
	return 0
}

// IsNamespaceRoot reports whether this is the root mount of its mount
// namespace (the kernel prints the root's own id as its parent id). It is
// only listed when the reading process's root is the namespace root, as in
// an initramfs.
func (m Mount) IsNamespaceRoot() bool { return m.ID == m.ParentID }

// ReadOnly reports whether the mount (not just the superblock) is read-only.
func (m Mount) ReadOnly() bool {
	for _, o := range strings.Split(m.Options, ",") {
		if o == "ro" {
			return true
		}
	}
	return false
}

// Option returns the value of the superblock option key (octal escapes
// decoded) and whether it is present. A flag option without "=" has value "".
func (m Mount) Option(key string) (string, bool) {
	for _, kv := range strings.Split(m.SuperOptions, ",") {
		k, v, _ := strings.Cut(kv, "=")
		if k == key {
			return Unescape(v), true
		}
	}
	return "", false
}

// Octal decodes the three octal digits an escape starts s with ("040" for
// the space of "\040"); ok is false when s does not start with three octal
// digits that fit a byte.
func Octal(s string) (b byte, ok bool) {
	if !isOctal3(s) {
		return 0, false
	}
	return octalByte(s[:3]), true
}

func isOctal3(s string) bool {
	if len(s) < 3 {
		return false
	}
	for i := 0; i < 3; i++ {
		if s[i] < '0' || s[i] > '7' {
			return false
		}
	}
	return s[0] <= '3' // fits a byte
}

func octalByte(s string) byte {
	return (s[0]-'0')<<6 | (s[1]-'0')<<3 | (s[2] - '0')
}

// Unescape decodes the kernel's \NNN octal escapes (\040 for a space).
func Unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && isOctal3(s[i+1:]) {
			b.WriteByte(octalByte(s[i+1 : i+4]))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Parse parses the mountinfo format of proc(5). A malformed line is
// an error that names its line number.
func Parse(r io.Reader) ([]Mount, error) {
	var out []Mount
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Bytes()
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		m, err := parseLine(string(line))
		if err != nil {
			return nil, fmt.Errorf("parse mountinfo line %d: %w", n, err)
		}
		out = append(out, m)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	return out, nil
}

func parseLine(line string) (Mount, error) {
	f := strings.Split(line, " ")
	sep := -1
	for i := 6; i < len(f); i++ {
		if f[i] == "-" {
			sep = i
			break
		}
	}
	if len(f) < 10 || sep < 0 || len(f) < sep+4 {
		return Mount{}, fmt.Errorf("%q: want at least 10 fields with a \"-\" separator", line)
	}
	var m Mount
	var err error
	if m.ID, err = strconv.Atoi(f[0]); err != nil {
		return Mount{}, fmt.Errorf("mount id %q: %w", f[0], err)
	}
	if m.ParentID, err = strconv.Atoi(f[1]); err != nil {
		return Mount{}, fmt.Errorf("parent id %q: %w", f[1], err)
	}
	maj, min, ok := strings.Cut(f[2], ":")
	if !ok {
		return Mount{}, fmt.Errorf("device %q: want major:minor", f[2])
	}
	ma, err1 := strconv.ParseUint(maj, 10, 32)
	mi, err2 := strconv.ParseUint(min, 10, 32)
	if err1 != nil || err2 != nil {
		return Mount{}, fmt.Errorf("device %q: want major:minor", f[2])
	}
	m.Major, m.Minor = uint32(ma), uint32(mi)
	m.Root = Unescape(f[3])
	m.Mountpoint = Unescape(f[4])
	m.Options = f[5]
	if sep > 6 {
		m.Optional = append([]string(nil), f[6:sep]...)
	}
	m.FSType = f[sep+1]
	m.Source = Unescape(f[sep+2])
	m.SuperOptions = strings.Join(f[sep+3:], " ") // never split by the kernel; be lenient
	return m, nil
}

// Read reads /proc/self/mountinfo: the mounts of the calling
// process's mount namespace, seen from its root.
func Read() ([]Mount, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	defer f.Close()
	return Parse(f)
}

// At returns the mounts whose mountpoint is exactly path (cleaned), in
// mountinfo order: bottom first, the mount visible at path last.
func At(mounts []Mount, path string) []Mount {
	path = filepath.Clean(path)
	var out []Mount
	for _, m := range mounts {
		if m.Mountpoint == path {
			out = append(out, m)
		}
	}
	return out
}

// Top returns the mount visible at path: the last one listed for that
// mountpoint. ok is false when nothing is mounted exactly at path.
//
// Mountinfo lists a mount after the mount it covers, except after a mount
// was tucked beneath another (MOVE_MOUNT_BENEATH or propagation): then the
// covering mount's parent is the tucked mount. Top follows the parent
// links, so it returns the true top in both cases.
func Top(mounts []Mount, path string) (Mount, bool) {
	at := At(mounts, path)
	if len(at) == 0 {
		return Mount{}, false
	}
	// The top is the mount at path that is no other mount's parent at path.
	for i := len(at) - 1; i >= 0; i-- {
		covered := false
		for _, o := range at {
			if o.ParentID == at[i].ID && o.ID != at[i].ID {
				covered = true
				break
			}
		}
		if !covered {
			return at[i], true
		}
	}
	return at[len(at)-1], true
}

// ByID returns the mount with the given id.
func ByID(mounts []Mount, id int) (Mount, bool) {
	for _, m := range mounts {
		if m.ID == id {
			return m, true
		}
	}
	return Mount{}, false
}

// Under returns the mounts at dir or below it.
func Under(mounts []Mount, dir string) []Mount {
	dir = filepath.Clean(dir)
	var out []Mount
	for _, m := range mounts {
		if m.Mountpoint == dir || strings.HasPrefix(m.Mountpoint, dir+"/") || dir == "/" {
			out = append(out, m)
		}
	}
	return out
}
