package overlay

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

// MountInfo is one line of /proc/<pid>/mountinfo (proc(5)):
//
//	36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
//	(1)(2)(3)   (4)   (5)         (6)       (7)     (8) (9)  (10)      (11)
//
// Root, Mountpoint and Source have the kernel's octal escapes (\040 for a
// space, \011, \012, \134) decoded. SuperOptions is kept as the kernel
// printed it, because its escaping depends on the filesystem; use Option or
// OverlayLayers to read values from it.
type MountInfo struct {
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
func (m MountInfo) PeerGroup() int { return m.optionalInt("shared:") }

// Master returns the peer group the mount receives propagation from (the
// "master:N" optional field: the mount is a slave), or 0.
func (m MountInfo) Master() int { return m.optionalInt("master:") }

func (m MountInfo) optionalInt(prefix string) int {
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
func (m MountInfo) IsNamespaceRoot() bool { return m.ID == m.ParentID }

// ReadOnly reports whether the mount (not just the superblock) is read-only.
func (m MountInfo) ReadOnly() bool {
	for _, o := range strings.Split(m.Options, ",") {
		if o == "ro" {
			return true
		}
	}
	return false
}

// Option returns the value of the superblock option key (octal escapes
// decoded) and whether it is present. A flag option without "=" has value "".
func (m MountInfo) Option(key string) (string, bool) {
	for _, kv := range strings.Split(m.SuperOptions, ",") {
		k, v, _ := strings.Cut(kv, "=")
		if k == key {
			return unescapeOctal(v), true
		}
	}
	return "", false
}

// OverlayLayers returns the layers of an overlay mount from its superblock
// options: lowerdir (top first, as given at mount time), upperdir and
// workdir. Paths are unescaped the way the kernel escapes them: octal
// escapes from seq_file (\040 for a space, \134 for a backslash, \054 for a
// comma, \072 for a colon), and inside lowerdir the mount-option escape "\:"
// for a colon that is part of a path. Data-only layers (after "::") are
// appended to Lower.
func (m MountInfo) OverlayLayers() (Layers, error) {
	if m.FSType != "overlay" {
		return Layers{}, fmt.Errorf("overlay layers of %s: filesystem is %s, not overlay", m.Mountpoint, m.FSType)
	}
	var l Layers
	for _, kv := range strings.Split(m.SuperOptions, ",") {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "lowerdir":
			l.Lower = splitLowerdir(v)
		case "upperdir":
			l.Upper = unescapeOctal(v)
		case "workdir":
			l.Work = unescapeOctal(v)
		}
	}
	if len(l.Lower) == 0 {
		return Layers{}, fmt.Errorf("overlay layers of %s: no lowerdir in %q", m.Mountpoint, m.SuperOptions)
	}
	return l, nil
}

// splitLowerdir splits a raw lowerdir value at its unescaped colons. A colon
// printed as \072 is part of a path; a backslash (raw or \134) escapes the
// next character.
func splitLowerdir(raw string) []string {
	var out []string
	var cur strings.Builder
	escapeNext := false
	for i := 0; i < len(raw); i++ {
		c, octal := raw[i], false
		if c == '\\' && isOctal3(raw[i+1:]) {
			c, octal = octalByte(raw[i+1:i+4]), true
			i += 3
		}
		switch {
		case escapeNext:
			cur.WriteByte(c)
			escapeNext = false
		case c == '\\':
			escapeNext = true
		case c == ':' && !octal:
			if cur.Len() > 0 {
				out = append(out, cur.String())
			}
			cur.Reset()
		default:
			cur.WriteByte(c)
		}
	}
	if cur.Len() > 0 {
		out = append(out, cur.String())
	}
	return out
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

// unescapeOctal decodes the kernel's \NNN octal escapes.
func unescapeOctal(s string) string {
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

// ParseMountInfo parses the mountinfo format of proc(5). A malformed line is
// an error that names its line number.
func ParseMountInfo(r io.Reader) ([]MountInfo, error) {
	var out []MountInfo
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Bytes()
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		m, err := parseMountInfoLine(string(line))
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

func parseMountInfoLine(line string) (MountInfo, error) {
	f := strings.Split(line, " ")
	sep := -1
	for i := 6; i < len(f); i++ {
		if f[i] == "-" {
			sep = i
			break
		}
	}
	if len(f) < 10 || sep < 0 || len(f) < sep+4 {
		return MountInfo{}, fmt.Errorf("%q: want at least 10 fields with a \"-\" separator", line)
	}
	var m MountInfo
	var err error
	if m.ID, err = strconv.Atoi(f[0]); err != nil {
		return MountInfo{}, fmt.Errorf("mount id %q: %w", f[0], err)
	}
	if m.ParentID, err = strconv.Atoi(f[1]); err != nil {
		return MountInfo{}, fmt.Errorf("parent id %q: %w", f[1], err)
	}
	maj, min, ok := strings.Cut(f[2], ":")
	if !ok {
		return MountInfo{}, fmt.Errorf("device %q: want major:minor", f[2])
	}
	ma, err1 := strconv.ParseUint(maj, 10, 32)
	mi, err2 := strconv.ParseUint(min, 10, 32)
	if err1 != nil || err2 != nil {
		return MountInfo{}, fmt.Errorf("device %q: want major:minor", f[2])
	}
	m.Major, m.Minor = uint32(ma), uint32(mi)
	m.Root = unescapeOctal(f[3])
	m.Mountpoint = unescapeOctal(f[4])
	m.Options = f[5]
	if sep > 6 {
		m.Optional = append([]string(nil), f[6:sep]...)
	}
	m.FSType = f[sep+1]
	m.Source = unescapeOctal(f[sep+2])
	m.SuperOptions = strings.Join(f[sep+3:], " ") // never split by the kernel; be lenient
	return m, nil
}

// ReadMountInfo reads /proc/self/mountinfo: the mounts of the calling
// process's mount namespace, seen from its root.
func ReadMountInfo() ([]MountInfo, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	defer f.Close()
	return ParseMountInfo(f)
}

// MountsAt returns the mounts whose mountpoint is exactly path (cleaned), in
// mountinfo order: bottom first, the mount visible at path last.
func MountsAt(mounts []MountInfo, path string) []MountInfo {
	path = filepath.Clean(path)
	var out []MountInfo
	for _, m := range mounts {
		if m.Mountpoint == path {
			out = append(out, m)
		}
	}
	return out
}

// TopMount returns the mount visible at path: the last one listed for that
// mountpoint. ok is false when nothing is mounted exactly at path.
//
// Mountinfo lists a mount after the mount it covers, except after a mount
// was tucked beneath another (MOVE_MOUNT_BENEATH or propagation): then the
// covering mount's parent is the tucked mount. TopMount follows the parent
// links, so it returns the true top in both cases.
func TopMount(mounts []MountInfo, path string) (MountInfo, bool) {
	at := MountsAt(mounts, path)
	if len(at) == 0 {
		return MountInfo{}, false
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
func ByID(mounts []MountInfo, id int) (MountInfo, bool) {
	for _, m := range mounts {
		if m.ID == id {
			return m, true
		}
	}
	return MountInfo{}, false
}

// Under returns the mounts at dir or below it.
func Under(mounts []MountInfo, dir string) []MountInfo {
	dir = filepath.Clean(dir)
	var out []MountInfo
	for _, m := range mounts {
		if m.Mountpoint == dir || strings.HasPrefix(m.Mountpoint, dir+"/") || dir == "/" {
			out = append(out, m)
		}
	}
	return out
}
