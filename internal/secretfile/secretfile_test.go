package secretfile

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/strata-nix/strata/internal/testenv"
)

func write(t *testing.T, name string, mode os.FileMode, data string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(data), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestReadRefusesWhatOthersCouldRead(t *testing.T) {
	good := write(t, "token", 0o600, "s3cret\n")
	if b, err := Read(good, "api.token_file"); err != nil || string(b) != "s3cret\n" {
		t.Fatalf("Read(0600) = %q, %v", b, err)
	}
	for _, mode := range []os.FileMode{0o644, 0o640, 0o604, 0o620} {
		p := write(t, "token", mode, "s3cret\n")
		_, err := Read(p, "api.token_file")
		if err == nil || !strings.Contains(err.Error(), "chmod 600 "+p) || !strings.Contains(err.Error(), "api.token_file") {
			t.Errorf("Read(%04o) = %v, want a refusal naming the key and chmod 600 %s", mode, err, p)
		}
	}
}

func TestReadRefusesAnotherUsersFile(t *testing.T) {
	testenv.RequireRoot(t) // chown; fails instead of skipping under CI=true
	p := write(t, "key", 0o600, "k")
	if err := os.Chown(p, 4242, 4242); err != nil {
		t.Fatal(err)
	}
	_, err := Read(p, "cluster.keyring_file")
	if err == nil || !strings.Contains(err.Error(), "owned by uid 4242") || !strings.Contains(err.Error(), "chown") {
		t.Fatalf("Read(owned by 4242) = %v, want a refusal naming the owner and chown", err)
	}
}

func TestReadRefusesSymlinksDirsAndHugeFiles(t *testing.T) {
	target := write(t, "real", 0o600, "k")
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if _, err := Read(link, "k"); err == nil {
		t.Error("Read followed a symlink")
	}
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := Read(dir, "k"); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("Read(dir) = %v, want not a regular file", err)
	}
	big := write(t, "big", 0o600, strings.Repeat("x", maxSize+1))
	if _, err := Read(big, "k"); err == nil || !strings.Contains(err.Error(), "not a secret file") {
		t.Errorf("Read(64 KiB + 1) = %v, want a size refusal", err)
	}
	if _, err := Read(filepath.Join(dir, "missing"), "k"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Read(missing) = %v, want fs.ErrNotExist", err)
	}
}

func TestPrivateDir(t *testing.T) {
	root := t.TempDir()
	fresh := filepath.Join(root, "a", "b")
	if tightened, err := PrivateDir(fresh); err != nil || tightened {
		t.Fatalf("PrivateDir(new) = %v, %v", tightened, err)
	}
	if fi, _ := os.Stat(fresh); fi.Mode().Perm() != 0o700 {
		t.Fatalf("new state dir mode %v, want 0700", fi.Mode().Perm())
	}
	loose := filepath.Join(root, "loose")
	if err := os.Mkdir(loose, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(loose, 0o755); err != nil {
		t.Fatal(err)
	}
	if tightened, err := PrivateDir(loose); err != nil || !tightened {
		t.Fatalf("PrivateDir(0755) = %v, %v, want tightened", tightened, err)
	}
	if fi, _ := os.Stat(loose); fi.Mode().Perm() != 0o700 {
		t.Fatalf("tightened dir mode %v, want 0700", fi.Mode().Perm())
	}
	file := write(t, "f", 0o600, "")
	if _, err := PrivateDir(file); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Fatalf("PrivateDir(file) = %v", err)
	}
}
