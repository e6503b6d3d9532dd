package nixstore

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// makeStore creates every path of infos (base names) under dir: a
// directory, a file or a dangling symlink, in turn.
func makeStore(t *testing.T, dir string, infos []PathInfo) {
	t.Helper()
	for i, in := range infos {
		p := filepath.Join(dir, filepath.Base(in.Path))
		var err error
		switch i % 3 {
		case 0:
			err = os.Mkdir(p, 0o555)
		case 1:
			err = os.WriteFile(p, []byte("x"), 0o444)
		case 2:
			err = os.Symlink("/does/not/exist", p) // lstat must not follow it
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

func TestVerify(t *testing.T) {
	infos := fakeInfos("/nix/store", 200, 4, 5)
	store := t.TempDir()
	makeStore(t, store, infos)
	if err := Verify(store, "/nix/store", infos); err != nil {
		t.Fatalf("complete store: %v", err)
	}
	if err := Verify(store, "/nix/store/", infos); err != nil {
		t.Fatalf("logical dir with a slash: %v", err)
	}

	t.Run("missing paths", func(t *testing.T) {
		for _, i := range []int{3, 150} {
			if err := os.Remove(filepath.Join(store, filepath.Base(infos[i].Path))); err != nil {
				t.Fatal(err)
			}
		}
		err := Verify(store, "/nix/store", infos)
		var ve *VerifyError
		if !errors.As(err, &ve) || len(ve.Missing) != 2 || ve.Missing[0] != infos[3].Path || ve.Missing[1] != infos[150].Path {
			t.Fatalf("got %v", err)
		}
		want := "verify registration: 2 registered paths missing from snapshot: " + infos[3].Path + ", " + infos[150].Path
		if err.Error() != want {
			t.Fatalf("message %q\nwant %q", err, want)
		}
	})

	t.Run("unregistered reference", func(t *testing.T) {
		store := t.TempDir()
		makeStore(t, store, infos)
		// Drop a record that others refer to.
		var victim int
		for i := len(infos) - 1; i >= 0; i-- {
			if refersTo(infos, infos[i].Path) {
				victim = i
				break
			}
		}
		gone := infos[victim].Path
		cut := append(append([]PathInfo{}, infos[:victim]...), infos[victim+1:]...)
		err := Verify(store, "/nix/store", cut)
		var ve *VerifyError
		if !errors.As(err, &ve) || len(ve.Unregistered) == 0 || len(ve.Missing) != 0 {
			t.Fatalf("got %v", err)
		}
		for _, u := range ve.Unregistered {
			if !strings.HasPrefix(u, gone+" (referenced by ") {
				t.Fatalf("unexpected entry %q", u)
			}
		}
		if !strings.Contains(err.Error(), "not registered: "+gone) {
			t.Fatalf("message %q does not name %s", err, gone)
		}
	})

	t.Run("wrong logical store dir", func(t *testing.T) {
		err := Verify(store, "/gnu/store", infos[:7])
		var ve *VerifyError
		if !errors.As(err, &ve) || len(ve.Outside) != 7 {
			t.Fatalf("got %v", err)
		}
		if !strings.Contains(err.Error(), "7 registered paths outside the store directory") || !strings.Contains(err.Error(), "and 2 more") {
			t.Fatalf("message %q", err)
		}
	})

	t.Run("store dir missing", func(t *testing.T) {
		err := Verify(filepath.Join(store, "nope"), "/nix/store", infos)
		var ve *VerifyError
		if err == nil || errors.As(err, &ve) || !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("got %v", err)
		}
	})
}

func refersTo(infos []PathInfo, p string) bool {
	for _, in := range infos {
		for _, r := range in.References {
			if r == p && in.Path != p {
				return true
			}
		}
	}
	return false
}

// TestVerifyLargeDirectory: the store directory is read in batches (it has
// more entries than one read of the directory returns), and entries that
// are not registered do not matter. The two paths removed, one from the
// first batch's range and one from the last, are exactly the ones reported,
// also when a path is registered twice.
func TestVerifyLargeDirectory(t *testing.T) {
	infos := fakeInfos("/nix/store", 6000, 0, 7)
	store := t.TempDir()
	makeStore(t, store, infos)
	for i := range 500 {
		if err := os.WriteFile(filepath.Join(store, fmt.Sprintf("stray-%d", i)), nil, 0o444); err != nil {
			t.Fatal(err)
		}
	}
	if err := Verify(store, "/nix/store", infos); err != nil {
		t.Fatalf("complete store: %v", err)
	}
	for _, i := range []int{10, 5990} {
		if err := os.RemoveAll(filepath.Join(store, filepath.Base(infos[i].Path))); err != nil {
			t.Fatal(err)
		}
	}
	twice := append(append([]PathInfo{}, infos...), infos[10], infos[20])
	err := Verify(store, "/nix/store", twice)
	var ve *VerifyError
	if !errors.As(err, &ve) || !slices.Equal(ve.Missing, []string{infos[10].Path, infos[5990].Path, infos[10].Path}) {
		t.Fatalf("got %v", err)
	}
}

// TestVerifyAdded: only the added paths are looked up (a path of the base
// that is gone is not seen: the store is known to hold those), a missing
// added path is reported in the order given, a dangling symlink counts as
// present, and a path outside the store directory is reported whichever
// list it is in.
func TestVerifyAdded(t *testing.T) {
	infos := fakeInfos("/nix/store", 300, 0, 9)
	store := t.TempDir()
	makeStore(t, store, infos)
	paths := make([]string, len(infos))
	for i, in := range infos {
		paths[i] = in.Path
	}
	added := []string{paths[2], paths[7], paths[250]} // 2: a dangling symlink
	names := NewStoreNames("/nix/store", paths)
	if err := names.VerifyAdded(store, added); err != nil {
		t.Fatalf("complete store: %v", err)
	}
	if err := os.Remove(filepath.Join(store, filepath.Base(paths[100]))); err != nil {
		t.Fatal(err)
	}
	if err := names.VerifyAdded(store, added); err != nil {
		t.Fatalf("a base path gone (not looked up): %v", err)
	}
	for _, i := range []int{250, 7} {
		if err := os.RemoveAll(filepath.Join(store, filepath.Base(paths[i]))); err != nil {
			t.Fatal(err)
		}
	}
	err := names.VerifyAdded(store, added)
	var ve *VerifyError
	if !errors.As(err, &ve) || !slices.Equal(ve.Missing, []string{paths[7], paths[250]}) || len(ve.Outside) != 0 {
		t.Fatalf("two added paths gone: %v", err)
	}
	if want := "verify registration: 2 registered paths missing from snapshot: " + paths[7] + ", " + paths[250]; err.Error() != want {
		t.Fatalf("message %q\nwant %q", err, want)
	}
	out := append(slices.Clone(paths), "/elsewhere/x")
	err = NewStoreNames("/nix/store", out).VerifyAdded(store, []string{paths[2], "/elsewhere/x"})
	if !errors.As(err, &ve) || !slices.Equal(ve.Outside, []string{"/elsewhere/x"}) || len(ve.Missing) != 0 {
		t.Fatalf("a path outside the store: %v", err)
	}
	if err := names.VerifyAdded(filepath.Join(store, "nope"), added); err == nil || errors.As(err, &ve) || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("store dir missing: %v", err)
	}
}
