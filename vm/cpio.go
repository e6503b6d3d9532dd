package vm

import (
	"bufio"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"sort"
	"strings"
)

// archive is an initramfs being assembled: guest paths mapped to entries.
// Parent directories are added implicitly. It is written as one "newc" cpio
// archive; the kernel unpacks several concatenated archives in order, later
// entries replacing earlier ones.
type archive struct {
	entries map[string]entry
}

type entry struct {
	mode    fs.FileMode // type bits and permissions
	host    string      // regular file: copy from this host path, if data is nil
	data    []byte      // regular file contents
	symlink string      // symlink target
}

func newArchive() *archive { return &archive{entries: map[string]entry{}} }

func cleanGuest(p string) (string, error) {
	if !strings.HasPrefix(p, "/") {
		return "", fmt.Errorf("guest path %q: not absolute", p)
	}
	c := path.Clean(p)
	if c == "/" {
		return "", fmt.Errorf("guest path %q: is the root", p)
	}
	return c, nil
}

func (a *archive) addParents(p string) {
	for d := path.Dir(p); d != "/"; d = path.Dir(d) {
		if _, ok := a.entries[d]; ok {
			continue
		}
		a.entries[d] = entry{mode: fs.ModeDir | 0o755}
	}
}

// dir adds an empty directory.
func (a *archive) dir(p string, perm fs.FileMode) error {
	c, err := cleanGuest(p)
	if err != nil {
		return err
	}
	a.addParents(c)
	a.entries[c] = entry{mode: fs.ModeDir | perm.Perm()}
	return nil
}

// bytes adds a regular file with the given contents.
func (a *archive) bytes(p string, data []byte, perm fs.FileMode) error {
	c, err := cleanGuest(p)
	if err != nil {
		return err
	}
	a.addParents(c)
	a.entries[c] = entry{mode: perm.Perm(), data: data}
	return nil
}

// file adds a host file (symlinks followed) at guest path p. perm 0 keeps
// the host file's permissions.
func (a *archive) file(p, host string, perm fs.FileMode) error {
	c, err := cleanGuest(p)
	if err != nil {
		return err
	}
	st, err := os.Stat(host)
	if err != nil {
		return fmt.Errorf("add %s to initramfs: %w", host, err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("add %s to initramfs: not a regular file", host)
	}
	if perm == 0 {
		perm = st.Mode().Perm()
	}
	a.addParents(c)
	a.entries[c] = entry{mode: perm.Perm(), host: host}
	return nil
}

// symlink adds a symbolic link p -> target.
func (a *archive) symlink(p, target string) error {
	c, err := cleanGuest(p)
	if err != nil {
		return err
	}
	a.addParents(c)
	a.entries[c] = entry{mode: fs.ModeSymlink | 0o777, symlink: target}
	return nil
}

// writeTo writes the archive as newc cpio (uncompressed), parents first.
func (a *archive) writeTo(w io.Writer) error {
	bw := bufio.NewWriterSize(w, 1<<20)
	names := make([]string, 0, len(a.entries))
	for n := range a.entries {
		names = append(names, n)
	}
	sort.Strings(names) // a parent sorts before its children
	ino := uint32(1000)
	for _, n := range names {
		e := a.entries[n]
		ino++
		var body []byte
		var size int64
		var src *os.File
		switch {
		case e.mode.IsDir():
		case e.mode&fs.ModeSymlink != 0:
			body = []byte(e.symlink)
			size = int64(len(body))
		case e.data != nil || e.host == "":
			body = e.data
			size = int64(len(body))
		default:
			f, err := os.Open(e.host)
			if err != nil {
				return fmt.Errorf("write initramfs: %w", err)
			}
			st, err := f.Stat()
			if err != nil {
				f.Close()
				return fmt.Errorf("write initramfs: %w", err)
			}
			src, size = f, st.Size()
		}
		if err := writeHeader(bw, strings.TrimPrefix(n, "/"), ino, cpioMode(e.mode), size); err != nil {
			if src != nil {
				src.Close()
			}
			return err
		}
		if src != nil {
			got, err := io.Copy(bw, src)
			src.Close()
			if err != nil {
				return fmt.Errorf("write initramfs: copy %s: %w", e.host, err)
			}
			if got != size {
				return fmt.Errorf("write initramfs: %s changed size while copying (%d != %d)", e.host, got, size)
			}
		} else if _, err := bw.Write(body); err != nil {
			return fmt.Errorf("write initramfs: %w", err)
		}
		if err := pad4(bw, size); err != nil {
			return err
		}
	}
	if err := writeHeader(bw, "TRAILER!!!", 0, 0, 0); err != nil {
		return err
	}
	return bw.Flush()
}

func cpioMode(m fs.FileMode) uint32 {
	perm := uint32(m.Perm())
	switch {
	case m.IsDir():
		return 0o040000 | perm
	case m&fs.ModeSymlink != 0:
		return 0o120000 | perm
	default:
		return 0o100000 | perm
	}
}

// writeHeader writes one newc header and the padded name.
func writeHeader(w *bufio.Writer, name string, ino, mode uint32, size int64) error {
	if size > 0xffffffff {
		return fmt.Errorf("write initramfs: %s: %d bytes is too large for cpio", name, size)
	}
	nlink := uint32(1)
	if mode&0o170000 == 0o040000 {
		nlink = 2
	}
	// magic ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
	_, err := fmt.Fprintf(w, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, mode, 0, 0, nlink, 0, uint32(size), 0, 0, 0, 0, len(name)+1, 0)
	if err != nil {
		return fmt.Errorf("write initramfs: %w", err)
	}
	if _, err := w.WriteString(name + "\x00"); err != nil {
		return fmt.Errorf("write initramfs: %w", err)
	}
	return pad4(w, int64(110+len(name)+1))
}

func pad4(w *bufio.Writer, n int64) error {
	if r := n % 4; r != 0 {
		if _, err := w.Write(make([]byte, 4-r)); err != nil {
			return fmt.Errorf("write initramfs: %w", err)
		}
	}
	return nil
}
