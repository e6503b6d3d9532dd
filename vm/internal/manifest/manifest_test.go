package manifest

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

func TestMakeDescribesTree(t *testing.T) {
	root := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "d/e"), 0o750))
	must(os.WriteFile(filepath.Join(root, "d/e/x"), []byte("abc"), 0o755))
	must(os.WriteFile(filepath.Join(root, "empty"), nil, 0o600))
	must(os.Symlink("../elsewhere", filepath.Join(root, "link")))
	got, err := Make(root)
	if err != nil {
		t.Fatal(err)
	}
	uid, gid := os.Getuid(), os.Getgid()
	ids := func(s string) string {
		return strings.Replace(s, "U G", strconv.Itoa(uid)+" "+strconv.Itoa(gid), 1)
	}
	want := []string{
		ids("d 0750 U G 0 - d"),
		ids("d 0750 U G 0 - d/e"),
		ids("f 0755 U G 3 ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad d/e/x"),
		ids("f 0600 U G 0 " + emptySHA + " empty"),
		ids("l 0777 U G 0 ../elsewhere link"),
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("manifest:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if d, n := Diff(want, got, 10); n != 0 {
		t.Fatalf("Diff of equal manifests: %v", d)
	}
	changed := append([]string(nil), got...)
	changed[2] = strings.Replace(changed[2], " 3 ", " 4 ", 1)
	if d, n := Diff(got, changed, 10); n != 2 || len(d) != 2 {
		t.Fatalf("Diff = %v, %d; want 2 differences", d, n)
	}
}
