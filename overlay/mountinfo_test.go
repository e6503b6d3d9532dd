package overlay

import (
	"os"
	"reflect"
	"strings"
	"testing"
)

func loadFixture(t *testing.T, name string) []MountInfo {
	t.Helper()
	f, err := os.Open("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ms, err := ParseMountInfo(f)
	if err != nil {
		t.Fatal(err)
	}
	return ms
}

func TestParseMountInfoFields(t *testing.T) {
	ms := loadFixture(t, "mountinfo-host.txt")
	if len(ms) != 14 {
		t.Fatalf("parsed %d mounts, want 14", len(ms))
	}
	got, ok := ByID(ms, 26)
	if !ok {
		t.Fatal("mount 26 missing")
	}
	want := MountInfo{
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

func TestParseMountInfoEscapes(t *testing.T) {
	ms := loadFixture(t, "mountinfo-host.txt")
	m, _ := ByID(ms, 25)
	if want := "/sysroot/my dir/with\ttab\nnl\\bs"; m.Mountpoint != want {
		t.Errorf("mountpoint %q, want %q", m.Mountpoint, want)
	}
	if m.Source != "my src" {
		t.Errorf("source %q, want %q", m.Source, "my src")
	}
	if got := MountsAt(ms, "/sysroot/my dir/with\ttab\nnl\\bs"); len(got) != 1 || got[0].ID != 25 {
		t.Errorf("MountsAt escaped path = %v", got)
	}
}

func TestOverlayLayers(t *testing.T) {
	ms := loadFixture(t, "mountinfo-host.txt")
	tests := []struct {
		id   int
		want Layers
	}{
		// Captured from Linux 6.18: lowerdir keeps the user's "\:" escape,
		// with the backslash printed as \134.
		{68, Layers{
			Lower: []string{"/tmp/ovx/lo a", "/tmp/ovx/lo:b", `/tmp/ovx/lo\d`},
			Upper: "/tmp/ovx/up x", Work: "/tmp/ovx/wo=k",
		}},
		{71, Layers{Lower: []string{"/gen/2", "/gen/1"}, Upper: "/up/u", Work: "/up/work.2"}},
		// A colon printed as \072 is part of the path; "::" starts data-only layers.
		{80, Layers{Lower: []string{"/gen/0:colon", "/data/only"}}},
	}
	for _, tc := range tests {
		m, ok := ByID(ms, tc.id)
		if !ok {
			t.Fatalf("mount %d missing", tc.id)
		}
		got, err := m.OverlayLayers()
		if err != nil {
			t.Errorf("mount %d: %v", tc.id, err)
			continue
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("mount %d layers:\n got %#v\nwant %#v", tc.id, got, tc.want)
		}
	}
	nfs, _ := ByID(ms, 69)
	if _, err := nfs.OverlayLayers(); err == nil || !strings.Contains(err.Error(), "not overlay") {
		t.Errorf("OverlayLayers of an nfs mount: err %v, want 'not overlay'", err)
	}
}

func TestTopMount(t *testing.T) {
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
		got, ok := TopMount(ms, tc.path)
		if ok != tc.ok || got.ID != tc.wantID {
			t.Errorf("TopMount(%q) = %d %v, want %d %v", tc.path, got.ID, ok, tc.wantID, tc.ok)
		}
	}
	if n := len(MountsAt(ms, "/sysroot/run/store")); n != 2 {
		t.Errorf("MountsAt(store) = %d mounts, want 2", n)
	}
	var under []int
	for _, m := range Under(ms, "/sysroot/run/stack") {
		under = append(under, m.ID)
	}
	if !reflect.DeepEqual(under, []int{72, 73, 74}) {
		t.Errorf("Under(stack) = %v, want [72 73 74]", under)
	}
}

func TestParseMountInfoErrors(t *testing.T) {
	tests := []struct{ name, in, want string }{
		{"no separator", "22 1 8:1 / / rw shared:1 ext4 /dev/sda1 rw\n", "line 1"},
		{"bad id", "x 1 8:1 / / rw - ext4 /dev/sda1 rw\n", "mount id"},
		{"bad device", "22 1 8-1 / / rw - ext4 /dev/sda1 rw\n", "major:minor"},
		{"truncated", "22 1 8:1 / / rw -\n", "line 1"},
		{"second line", "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n23 22 0:21\n", "line 2"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseMountInfo(strings.NewReader(tc.in))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

func TestReadMountInfoSelf(t *testing.T) {
	ms, err := ReadMountInfo()
	if err != nil {
		t.Fatal(err)
	}
	// Every process sees its root.
	if _, ok := TopMount(ms, "/"); !ok {
		t.Errorf("no mount at / among %d mounts", len(ms))
	}
}
