package overlay

import (
	"fmt"
	"strings"

	"github.com/strata-nix/strata/mountinfo"
)

// LayersOf returns the layers of an overlay mount from its superblock
// options: lowerdir (top first, as given at mount time), upperdir and
// workdir. Paths are unescaped the way the kernel escapes them: octal
// escapes from seq_file (\040 for a space, \134 for a backslash, \054 for a
// comma, \072 for a colon), and inside lowerdir the mount-option escape "\:"
// for a colon that is part of a path. Data-only layers (after "::") are
// appended to Lower.
func LayersOf(m mountinfo.Mount) (Layers, error) {
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
			l.Upper = mountinfo.Unescape(v)
		case "workdir":
			l.Work = mountinfo.Unescape(v)
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
		if c == '\\' {
			if b, ok := mountinfo.Octal(raw[i+1:]); ok {
				c, octal = b, true
				i += 3
			}
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
