package overlay

import (
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/strata-nix/strata/mountinfo"
)

func loadFixture(t *testing.T, name string) []mountinfo.Mount {
	t.Helper()
	f, err := os.Open("../mountinfo/testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ms, err := mountinfo.Parse(f)
	if err != nil {
		t.Fatal(err)
	}
	return ms
}

func TestLayersOf(t *testing.T) {
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
		m, ok := mountinfo.ByID(ms, tc.id)
		if !ok {
			t.Fatalf("mount %d missing", tc.id)
		}
		got, err := LayersOf(m)
		if err != nil {
			t.Errorf("mount %d: %v", tc.id, err)
			continue
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("mount %d layers:\n got %#v\nwant %#v", tc.id, got, tc.want)
		}
	}
	nfs, _ := mountinfo.ByID(ms, 69)
	if _, err := LayersOf(nfs); err == nil || !strings.Contains(err.Error(), "not overlay") {
		t.Errorf("LayersOf an nfs mount: err %v, want 'not overlay'", err)
	}
}
