package vm

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// readNewc parses a newc cpio archive into name -> (mode, body).
func readNewc(t *testing.T, data []byte) map[string][2]string {
	t.Helper()
	out := map[string][2]string{}
	off := 0
	hex := func(i int) int {
		var v int
		if _, err := fmt.Sscanf(string(data[off+6+8*i:off+6+8*i+8]), "%08X", &v); err != nil {
			t.Fatalf("header field %d at %d: %v", i, off, err)
		}
		return v
	}
	for {
		if string(data[off:off+6]) != "070701" {
			t.Fatalf("bad magic at %d", off)
		}
		mode, size, namesize := hex(1), hex(6), hex(11)
		name := string(data[off+110 : off+110+namesize-1])
		off += (110 + namesize + 3) &^ 3
		body := string(data[off : off+size])
		off += (size + 3) &^ 3
		if name == "TRAILER!!!" {
			if off != len(data) {
				t.Fatalf("%d bytes after trailer", len(data)-off)
			}
			return out
		}
		out[name] = [2]string{fmt.Sprintf("%o", mode), body}
	}
}

func TestArchiveWritesNewc(t *testing.T) {
	host := filepath.Join(t.TempDir(), "h")
	if err := os.WriteFile(host, []byte("from host"), 0o751); err != nil {
		t.Fatal(err)
	}
	a := newArchive()
	for _, err := range []error{
		a.bytes("/etc/x.conf", []byte("abc"), 0o644),
		a.file("/usr/bin/tool", host, 0),
		a.symlink("/usr/bin/alias", "tool"),
		a.dir("/empty", 0o700),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	var buf bytes.Buffer
	if err := a.writeTo(&buf); err != nil {
		t.Fatal(err)
	}
	got := readNewc(t, buf.Bytes())
	want := map[string][2]string{
		"etc":           {"40755", ""},
		"etc/x.conf":    {"100644", "abc"},
		"usr":           {"40755", ""},
		"usr/bin":       {"40755", ""},
		"usr/bin/tool":  {"100751", "from host"},
		"usr/bin/alias": {"120777", "tool"},
		"empty":         {"40700", ""},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("archive = %v\nwant %v", got, want)
	}
}

func TestArchiveRejectsBadPaths(t *testing.T) {
	a := newArchive()
	if err := a.bytes("relative", nil, 0o644); err == nil {
		t.Error("relative path accepted")
	}
	if err := a.bytes("/", nil, 0o644); err == nil {
		t.Error("root accepted")
	}
	if err := a.file("/x", filepath.Join(t.TempDir(), "missing"), 0); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("missing host file: err = %v", err)
	}
}

func TestVersionLess(t *testing.T) {
	sorted := []string{"6.1.0-9-amd64", "6.1.0-56-amd64", "6.12.95+deb12-amd64", "6.12.113+deb12-amd64", "6.12.117+deb12-amd64"}
	for i := range sorted {
		for j := range sorted {
			if got := versionLess(sorted[i], sorted[j]); got != (i < j) {
				t.Errorf("versionLess(%s, %s) = %v", sorted[i], sorted[j], got)
			}
		}
	}
}

func TestOrderModules(t *testing.T) {
	index := map[string]string{"nfsv3": "nfsv3.ko", "nfs": "nfs.ko", "sunrpc": "sunrpc.ko", "overlay": "overlay.ko"}
	deps := map[string][]string{"nfsv3.ko": {"nfs", "sunrpc"}, "nfs.ko": {"sunrpc", "netfs"}}
	builtin := map[string]bool{"netfs": true, "virtio_pci": true}
	dep := func(p string) ([]string, error) { return deps[p], nil }
	mods, err := orderModules([]string{"virtio_pci", "nfsv3", "overlay"}, index, builtin, dep)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range mods {
		names = append(names, m.name)
	}
	if want := []string{"sunrpc", "nfs", "nfsv3", "overlay"}; !reflect.DeepEqual(names, want) {
		t.Fatalf("order = %v, want %v", names, want)
	}
	if _, err := orderModules([]string{"zfs"}, index, builtin, dep); err == nil || !strings.Contains(err.Error(), "zfs") {
		t.Errorf("missing module: err = %v", err)
	}
	deps["overlay.ko"] = []string{"overlay"}
	if _, err := orderModules([]string{"overlay"}, index, builtin, dep); err == nil || !strings.Contains(err.Error(), "cycle") {
		t.Errorf("cycle: err = %v", err)
	}
}

func TestParseExit(t *testing.T) {
	for line, want := range map[string]int{ExitMarker + "0": 0, ExitMarker + "17 ": 17} {
		if got, ok := parseExit(line); !ok || got != want {
			t.Errorf("parseExit(%q) = %d, %v", line, got, ok)
		}
	}
	for _, line := range []string{"echo " + ExitMarker + "0", ExitMarker, ExitMarker + "x"} {
		if _, ok := parseExit(line); ok {
			t.Errorf("parseExit(%q) accepted", line)
		}
	}
}

func TestRunArchiveExportsEnv(t *testing.T) {
	a, err := runArchive(Guest{Script: "echo $A", Env: map[string]string{"A": "it's"}, Files: []File{{Guest: "/d", Data: []byte("x")}}})
	if err != nil {
		t.Fatal(err)
	}
	script := string(a.entries["/test.sh"].data)
	if !strings.Contains(script, `export A='it'\''s'`+"\necho $A") {
		t.Errorf("script = %q", script)
	}
	if e := a.entries["/d"]; string(e.data) != "x" || e.mode.Perm() != 0o644 {
		t.Errorf("/d = %+v", e)
	}
}

func TestCacheEntryBuildsOnceAndAtomically(t *testing.T) {
	c := &cache{dir: t.TempDir(), log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	builds := 0
	build := func(tmp string) error {
		builds++
		return os.WriteFile(tmp, []byte("v"), 0o644)
	}
	// A leftover of a killed build must not survive or be mistaken for the entry.
	if err := os.MkdirAll(filepath.Join(c.dir, "kind"), 0o755); err != nil {
		t.Fatal(err)
	}
	leftover := filepath.Join(c.dir, "kind", ".tmp-key-999999")
	if err := os.WriteFile(leftover, []byte("half"), 0o644); err != nil {
		t.Fatal(err)
	}
	p, err := c.entry("kind", "key", build)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.entry("kind", "key", build); err != nil || builds != 1 {
		t.Fatalf("second entry: err %v, builds %d; want 1 build", err, builds)
	}
	if data, _ := os.ReadFile(p); string(data) != "v" {
		t.Fatalf("entry holds %q", data)
	}
	if _, err := os.Stat(leftover); !os.IsNotExist(err) {
		t.Errorf("leftover temp entry still there: %v", err)
	}
	_, err = c.entry("kind", "bad/key", func(tmp string) error {
		os.WriteFile(tmp, []byte("partial"), 0o644)
		return fmt.Errorf("boom")
	})
	if err == nil || !strings.Contains(err.Error(), "boom") {
		t.Fatalf("failed build: err = %v", err)
	}
	left, _ := filepath.Glob(filepath.Join(c.dir, "kind", "*bad*"))
	hidden, _ := filepath.Glob(filepath.Join(c.dir, "kind", ".tmp-*"))
	if len(left)+len(hidden) != 0 {
		t.Fatalf("failed build left %v %v", left, hidden)
	}
}
