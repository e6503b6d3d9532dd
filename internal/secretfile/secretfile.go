// Package secretfile reads files that hold secrets (the API token, the NFS
// handle key) only when no one but their owner can read them, and makes the
// directories that hold them private.
package secretfile

import (
	"fmt"
	"io"
	"os"
	"syscall"
)

// maxSize bounds a secret file: tokens and keys are a few dozen bytes.
const maxSize = 1 << 16

// Read returns the contents of the secret file path, what it holds named by
// what (e.g. "api.token_file"). It refuses a file that is not a regular
// file, that its group or other users may read or write, or that a user
// other than this process's or root owns (systemd's credentials and files
// an operator installs as root are root's); the error names the file and
// the fix (chmod 600, chown). A
// missing file is an error wrapping fs.ErrNotExist.
func Read(path, what string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("read %s %s: %w", what, path, err)
	}
	defer f.Close()
	if err := Check(f, path, what); err != nil {
		return nil, err
	}
	b, err := io.ReadAll(io.LimitReader(f, maxSize+1))
	if err != nil {
		return nil, fmt.Errorf("read %s %s: %w", what, path, err)
	}
	if len(b) > maxSize {
		return nil, fmt.Errorf("read %s %s: larger than %d bytes, not a secret file", what, path, maxSize)
	}
	return b, nil
}

// Check refuses an open secret file that is not private to this process's
// user (see Read).
func Check(f *os.File, path, what string) error {
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("stat %s %s: %w", what, path, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s %s is not a regular file", what, path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return fmt.Errorf("%s %s has mode %04o: group and other users must not read it; run: chmod 600 %s", what, path, perm, path)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() && st.Uid != 0 {
		return fmt.Errorf("%s %s is owned by uid %d, not by this process's uid %d; run: chown %d %s", what, path, st.Uid, os.Geteuid(), os.Geteuid(), path)
	}
	return nil
}

// PrivateDir creates dir (and its parents) with mode 0700, and makes an
// existing dir 0700 if group or other users could enter it. It returns
// whether it had to tighten the mode.
func PrivateDir(dir string) (bool, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return false, fmt.Errorf("create state dir %s: %w", dir, err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return false, fmt.Errorf("stat state dir %s: %w", dir, err)
	}
	if !fi.IsDir() {
		return false, fmt.Errorf("state dir %s is not a directory", dir)
	}
	if fi.Mode().Perm()&0o077 == 0 {
		return false, nil
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return false, fmt.Errorf("make state dir %s private (chmod 700): %w", dir, err)
	}
	return true, nil
}
