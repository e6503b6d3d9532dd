package nfs

import (
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// go-nfs is path based: it asks the Handler for a path ([]string) per handle,
// joins it with Filesystem.Join and calls Lstat/Open/ReadDir/Readlink on the
// result. strata's paths are not paths: they are tokens naming a sealed handle
// plus at most one client-supplied name. The grammar (T is "@" followed by the
// base64url encoding of a sealed handle, N one validated name):
//
//	""            the mount's generation root (only used by MOUNT)
//	T             the object the handle names
//	T/..          its parent directory (the root's parent is the root)
//	T/../T        the object again (FromHandle returns ["T/..", "T"], so that
//	              go-nfs's path[:len-1] is the parent: LOOKUP ".." and the ".."
//	              entry of READDIR resolve to the real parent)
//	T/../T/N, T/N the entry N in directory T
//
// Anything else (a second "@", a name with "/" that added components, an
// empty name, "..") is rejected before any system call, so no client name can
// walk out of a directory.

const tokenPrefix = "@"

// errBadName is returned for a path or name outside the grammar. Callers see it
// as ENOENT.
var errBadName = errors.New("invalid name")

// ref is a parsed path: the object named by handle tok, its parent, or the
// entry name inside it.
type ref struct {
	root   bool   // the mount root (empty path)
	handle []byte // sealed handle (MAC not yet checked)
	parent bool   // the parent of handle's object
	name   string // one validated name inside handle's directory, or ""
}

// validName reports whether s may name a directory entry: not empty, not "."
// or "..", no "/" and no NUL, at most 255 bytes.
func validName(s string) bool {
	if s == "" || s == "." || s == ".." || len(s) > 255 {
		return false
	}
	return !strings.ContainsAny(s, "/\x00")
}

func encodeToken(h []byte) string { return tokenPrefix + base64.RawURLEncoding.EncodeToString(h) }

func decodeToken(s string) ([]byte, error) {
	if !strings.HasPrefix(s, tokenPrefix) || len(s) > 1+base64.RawURLEncoding.EncodedLen(maxHandle) {
		return nil, errBadName
	}
	b, err := base64.RawURLEncoding.DecodeString(s[1:])
	if err != nil {
		return nil, errBadName
	}
	return b, nil
}

// parseRef parses a path built by Join from FromHandle's tokens and at most
// one client name.
func parseRef(p string) (ref, error) {
	if p == "" {
		return ref{root: true}, nil
	}
	c := strings.Split(p, "/")
	h, err := decodeToken(c[0])
	if err != nil {
		return ref{}, err
	}
	r := ref{handle: h}
	if len(c) >= 3 {
		// T/../T[/N]: the repeated token must be the same.
		if c[1] != ".." || c[2] != c[0] {
			return ref{}, errBadName
		}
		c = append(c[:1], c[3:]...)
	}
	switch len(c) {
	case 1:
		return r, nil
	case 2:
		switch {
		case c[1] == "..":
			r.parent = true
		case c[1] == ".":
		case validName(c[1]):
			r.name = c[1]
		default:
			return ref{}, errBadName
		}
		return r, nil
	}
	return ref{}, errBadName
}

// handlePath is what FromHandle returns for handle h.
func handlePath(h []byte) []string {
	t := encodeToken(h)
	return []string{t + "/..", t}
}

// MountPrefix starts every MOUNT path: MOUNT "/gen/N" gives generation N's
// store directory, "/gen/N/sub/dir" a directory inside it.
const MountPrefix = "/gen/"

// parseMountPath splits "/gen/N[/a/b...]" into N and the validated components
// below the generation root. A trailing "/" is allowed; N must be canonical
// decimal greater than zero.
func parseMountPath(p string) (uint64, []string, error) {
	rest, ok := strings.CutPrefix(p, MountPrefix)
	if !ok {
		return 0, nil, fmt.Errorf("mount path %q: not under %s", p, MountPrefix)
	}
	rest = strings.TrimRight(rest, "/")
	num, sub, _ := strings.Cut(rest, "/")
	id, err := strconv.ParseUint(num, 10, 64)
	if err != nil || id == 0 || strconv.FormatUint(id, 10) != num {
		return 0, nil, fmt.Errorf("mount path %q: %q is not a generation number", p, num)
	}
	if sub == "" {
		return id, nil, nil
	}
	comps := strings.Split(sub, "/")
	for _, c := range comps {
		if !validName(c) {
			return 0, nil, fmt.Errorf("mount path %q: invalid component %q", p, c)
		}
	}
	return id, comps, nil
}
