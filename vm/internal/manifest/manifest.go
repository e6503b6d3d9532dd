// Package manifest describes a directory tree as text, one sorted line per
// entry, so a tree on the host and the same tree seen through an NFS mount in
// a guest can be compared line by line.
//
// A line is "TYPE PERM UID GID SIZE DIGEST PATH": TYPE is f (regular), d,
// l (symlink; DIGEST is the link target), c, b, p or s; DIGEST of a regular
// file is its sha256 (a zero-length file is not opened), "-" otherwise. PATH
// is relative to the root, which is not listed.
package manifest

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
)

// emptySHA is the sha256 of no bytes.
const emptySHA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

// Make returns the manifest lines of the tree at root, sorted by path. It
// stats and hashes entries with a few workers: over NFS, per-entry round
// trips dominate and nconnect mounts serve them in parallel.
func Make(root string) ([]string, error) {
	var rels []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == root {
			return nil
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		rels = append(rels, rel)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("manifest %s: %w", root, err)
	}
	lines := make([]string, len(rels))
	errs := make([]error, len(rels))
	var next atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= len(rels) {
					return
				}
				lines[i], errs[i] = Line(filepath.Join(root, rels[i]), rels[i])
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("manifest %s: %w", root, err)
	}
	sort.Slice(lines, func(i, j int) bool { return pathOf(lines[i]) < pathOf(lines[j]) })
	return lines, nil
}

func pathOf(line string) string {
	f := strings.SplitN(line, " ", 7)
	return f[len(f)-1]
}

// Line describes the entry at p (not followed if a symlink) named rel.
func Line(p, rel string) (string, error) {
	fi, err := os.Lstat(p)
	if err != nil {
		return "", err
	}
	var uid, gid uint32
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		uid, gid = st.Uid, st.Gid
	}
	typ, size, digest := "?", int64(0), "-"
	m := fi.Mode()
	switch {
	case m.IsRegular():
		typ, size = "f", fi.Size()
		if size == 0 {
			digest = emptySHA
		} else if digest, err = FileSHA(p); err != nil {
			return "", err
		}
	case m.IsDir():
		typ = "d"
	case m&fs.ModeSymlink != 0:
		typ = "l"
		if digest, err = os.Readlink(p); err != nil {
			return "", err
		}
	case m&fs.ModeCharDevice != 0:
		typ = "c"
	case m&fs.ModeDevice != 0:
		typ = "b"
	case m&fs.ModeNamedPipe != 0:
		typ = "p"
	case m&fs.ModeSocket != 0:
		typ = "s"
	}
	perm := m.Perm()
	if m&fs.ModeSetuid != 0 {
		perm |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		perm |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		perm |= 0o1000
	}
	return fmt.Sprintf("%s %04o %d %d %d %s %s", typ, uint32(perm), uid, gid, size, digest, rel), nil
}

// FileSHA returns the hex sha256 of the file at p.
func FileSHA(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("read %s: %w", p, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// Diff returns up to max human-readable differences between two manifests
// (want, got), and the total number of differing lines.
func Diff(want, got []string, max int) ([]string, int) {
	w := map[string]bool{}
	for _, l := range want {
		w[l] = true
	}
	g := map[string]bool{}
	for _, l := range got {
		g[l] = true
	}
	var out []string
	n := 0
	for _, l := range want {
		if !g[l] {
			n++
			if len(out) < max {
				out = append(out, "missing or different: "+l)
			}
		}
	}
	for _, l := range got {
		if !w[l] {
			n++
			if len(out) < max {
				out = append(out, "unexpected: "+l)
			}
		}
	}
	return out, n
}
