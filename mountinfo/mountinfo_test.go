package mountinfo

import (
	"os"
	"reflect"
	"strings"
	"testing"
)

func loadFixture(t *testing.T, name string) []Mount {
	t.Helper()
	f, err := os.Open("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ms, err := Parse(f)
	if err != nil {
		t.Fatal(err)
	}
	return ms
}

func TestParseFields(t *testing.T) {
	ms := loadFixture(t, "mountinfo-host.txt")
	if len(ms) != 14 {
		t.Fatalf("parsed %d mounts, want 14", len(ms))
	}
	got, ok := ByID(ms, 26)
	if !ok {
		t.Fatal("mount 26 missing")
	}
	want := Mount{
		ID: 26, ParentID: 22, Major: 0, Minor: 41,
		Root: "/sub/vol", Mountpoint: "/sysroot/btrfs sub",
		Options:      "ro,relatime",
		Optional:     []string{"propagate_from:7", "master:9"},
		FSType:       "btrfs",
		Source:       "/dev/loop0",
		SuperOptions: "ro,space_cache=v2,subvolid=257,subvol=/sub/vol",
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("mount 26:\n got %+v\nwant %+v", got, want)
	}
	if !got.ReadOnly() || got.PeerGroup() != 0 || got.Master() != 9 {
		t.Errorf("mount 26: ReadOnly=%v PeerGroup=%d Master=%d, want true 0 9", got.ReadOnly(), got.PeerGroup(), got.Master())
	}
	if v, ok := got.Option("subvolid"); !ok || v != "257" {
		t.Errorf("Option(subvolid) = %q %v", v, ok)
	}
	if _, ok := got.Option("nosuch"); ok {
		t.Error("Option(nosuch) found")
	}

	run, _ := ByID(ms, 24)
	if run.PeerGroup() != 5 || run.Master() != 3 {
		t.Errorf("mount 24: shared:%d master:%d, want 5 and 3", run.PeerGroup(), run.Master())
	}
	if root, _ := ByID(ms, 1); !root.IsNamespaceRoot() {
		t.Error("mount 1 (parent 1) not seen as the namespace root")
	}
	if sys, _ := ByID(ms, 22); sys.IsNamespaceRoot() {
		t.Error("mount 22 seen as the namespace root")
	}
}

func TestParseEscapes(t *testing.T) {
	ms := loadFixture(t, "mountinfo-host.txt")
	m, _ := ByID(ms, 25)
	if want := "/sysroot/my dir/with\ttab\nnl\\bs"; m.Mountpoint != want {
		t.Errorf("mountpoint %q, want %q", m.Mountpoint, want)
	}
	if m.Source != "my src" {
		t.Errorf("source %q, want %q", m.Source, "my src")
	}
	if got := At(ms, "/sysroot/my dir/with\ttab\nnl\\bs"); len(got) != 1 || got[0].ID != 25 {
		t.Errorf("MountsAt escaped path = %v", got)
	}
}

func TestTop(t *testing.T) {
	ms := loadFixture(t, "mountinfo-host.txt")
	tests := []struct {
		path   string
		wantID int
		ok     bool
	}{
		// Plain stack: the later mount covers the earlier one.
		{"/sysroot/run/stack", 73, true},
		{"/sysroot/run/stack/", 73, true},
		// After a mount beneath, the old top (70) is listed first but is
		// re-parented onto the tucked mount (71): 70 is still on top.
		{"/sysroot/run/store", 70, true},
		{"/sysroot/run/stack/inner", 74, true},
		{"/sysroot/run/nothing", 0, false},
	}
	for _, tc := range tests {
		got, ok := Top(ms, tc.path)
		if ok != tc.ok || got.ID != tc.wantID {
			t.Errorf("Top(%q) = %d %v, want %d %v", tc.path, got.ID, ok, tc.wantID, tc.ok)
		}
	}
	if n := len(At(ms, "/sysroot/run/store")); n != 2 {
		t.Errorf("At(store) = %d mounts, want 2", n)
	}
	var under []int
	for _, m := range Under(ms, "/sysroot/run/stack") {
		under = append(under, m.ID)
	}
	if !reflect.DeepEqual(under, []int{72, 73, 74}) {
		t.Errorf("Under(stack) = %v, want [72 73 74]", under)
	}
}

func TestParseErrors(t *testing.T) {
	tests := []struct{ name, in, want string }{
		{"no separator", "22 1 8:1 / / rw shared:1 ext4 /dev/sda1 rw\n", "line 1"},
		{"bad id", "x 1 8:1 / / rw - ext4 /dev/sda1 rw\n", "mount id"},
		{"bad device", "22 1 8-1 / / rw - ext4 /dev/sda1 rw\n", "major:minor"},
		{"truncated", "22 1 8:1 / / rw -\n", "line 1"},
		{"second line", "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n23 22 0:21\n", "line 2"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse(strings.NewReader(tc.in))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

func TestReadSelf(t *testing.T) {
	ms, err := Read()
	if err != nil {
		t.Fatal(err)
	}
	// Every process sees its root.
	if _, ok := Top(ms, "/"); !ok {
		t.Errorf("no mount at / among %d mounts", len(ms))
	}
}

func TestUnescape(t *testing.T) {
	for in, want := range map[string]string{
		`/mnt/a\040b`: "/mnt/a b",
		`/plain`:      "/plain",
		`/tab\011x`:   "/tab\tx",
		`/bad\09`:     `/bad\09`,
		`/end\04`:     `/end\04`,
		`/back\134x`:  `/back\x`,
		`/big\400`:    `/big\400`,
	} {
		if got := Unescape(in); got != want {
			t.Errorf("Unescape(%q) = %q, want %q", in, got, want)
		}
	}
}
