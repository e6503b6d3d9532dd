package nixstore

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// fakeNixStore writes a nix-store stand-in that knows the valid paths
// listed in dir/valid, logs each call's arguments to dir/calls and the
// --load-db input to dir/loaded, and fails when dir/fail exists.
func fakeNixStore(t *testing.T, valid []string) (CLI, string) {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "valid"), []byte(strings.Join(valid, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	script := `#!/bin/sh
d=` + dir + `
if [ -e $d/fail ]; then echo "error: database is locked" >&2; exit 1; fi
echo "$*" >> $d/calls
while [ $# -gt 0 ]; do
  case "$1" in
  --store) shift 2 ;;
  --check-validity) shift; [ "$1" = --print-invalid ] && shift
    printf '%s\n' "$@" | grep -vxF -f $d/valid; exit 0 ;;
  --load-db) cat >> $d/loaded; exit 0 ;;
  --dump-db) cat $d/dump; exit 0 ;;
  *) echo "unexpected $1" >&2; exit 2 ;;
  esac
done
`
	bin := filepath.Join(dir, "nix-store")
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return CLI{Bin: bin, Args: []string{"--store", "/x"}}, dir
}

func TestCLILoadDBSkipsValidPaths(t *testing.T) {
	infos := fakeInfos("/nix/store", 300, 3, 2)
	var valid []string
	for i, in := range infos {
		if i%2 == 0 {
			valid = append(valid, in.Path)
		}
	}
	cli, dir := fakeNixStore(t, valid)
	n, err := cli.LoadDB(context.Background(), infos)
	if err != nil {
		t.Fatal(err)
	}
	if n != len(infos)/2 {
		t.Fatalf("loaded %d, want %d", n, len(infos)/2)
	}
	f, _ := os.Open(filepath.Join(dir, "loaded"))
	defer f.Close()
	loaded, err := ParseRegistration(f)
	if err != nil {
		t.Fatal(err)
	}
	var want []PathInfo
	for i, in := range infos {
		if i%2 == 1 {
			want = append(want, in)
		}
	}
	if !slices.EqualFunc(loaded, want, Equal) {
		t.Fatalf("load-db got %d records, want the %d invalid ones", len(loaded), len(want))
	}
	calls, _ := os.ReadFile(filepath.Join(dir, "calls"))
	lines := strings.Split(strings.TrimSpace(string(calls)), "\n")
	// Validity is asked first, then only --load-db runs.
	if len(lines) < 2 || !strings.HasPrefix(lines[0], "--store /x --check-validity --print-invalid ") || lines[len(lines)-1] != "--store /x --load-db" {
		t.Fatalf("calls:\n%s", clip(string(calls)))
	}
}

func TestCLIValidBatches(t *testing.T) {
	old := maxArgBytes
	maxArgBytes = 4096
	t.Cleanup(func() { maxArgBytes = old })
	infos := fakeInfos("/nix/store", 500, 0, 3) // ~26 KB of paths: 7 batches
	all := paths(infos)
	cli, dir := fakeNixStore(t, all[100:200])
	got, err := cli.Valid(context.Background(), all)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, all[100:200]) {
		t.Fatalf("Valid returned %d paths, want 100", len(got))
	}
	calls, _ := os.ReadFile(filepath.Join(dir, "calls"))
	if n := strings.Count(string(calls), "\n"); n < 6 {
		t.Fatalf("%d calls, want the paths split over ≥6 command lines", n)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(calls)), "\n") {
		if len(line) > 4096+200 {
			t.Fatalf("a command line of %d bytes", len(line))
		}
	}
}

func TestCLINothingToLoad(t *testing.T) {
	infos := fakeInfos("/nix/store", 10, 2, 3)
	cli, dir := fakeNixStore(t, paths(infos))
	n, err := cli.LoadDB(context.Background(), infos)
	if err != nil || n != 0 {
		t.Fatalf("LoadDB = %d, %v", n, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "loaded")); err == nil {
		t.Fatal("--load-db ran with nothing to load")
	}
}

func TestCLIErrorsCarryStderr(t *testing.T) {
	cli, dir := fakeNixStore(t, nil)
	os.WriteFile(filepath.Join(dir, "fail"), nil, 0o644)
	_, err := cli.LoadDB(context.Background(), sampleInfos)
	var ee *ExecError
	if !errors.As(err, &ee) || !strings.Contains(err.Error(), "database is locked") {
		t.Fatalf("got %v", err)
	}
}

func TestCLIDumpDB(t *testing.T) {
	cli, dir := fakeNixStore(t, nil)
	os.WriteFile(filepath.Join(dir, "dump"), []byte(sample), 0o644)
	got, err := cli.DumpDB(context.Background())
	if err != nil || !slices.EqualFunc(got, sampleInfos, Equal) {
		t.Fatalf("DumpDB = %v, %v", got, err)
	}
	os.WriteFile(filepath.Join(dir, "dump"), []byte(sample[:100]), 0o644)
	if _, err := cli.DumpDB(context.Background()); err == nil || !strings.Contains(err.Error(), "line") {
		t.Fatalf("truncated dump: %v", err)
	}
}
