package nixstore

import (
	"reflect"
	"slices"
	"strings"
	"testing"
)

// applyDelta is what a builder does with a delta: drop removed, add or
// replace added.
func applyDelta(from, added []PathInfo, removed []string) []PathInfo {
	m := map[string]PathInfo{}
	for _, in := range from {
		m[in.Path] = in
	}
	for _, p := range removed {
		delete(m, p)
	}
	for _, in := range added {
		m[in.Path] = in
	}
	out := make([]PathInfo, 0, len(m))
	for _, in := range m {
		out = append(out, in)
	}
	Sort(out)
	return out
}

func TestDelta(t *testing.T) {
	all := fakeInfos("/nix/store", 10, 0, 3) // sorted
	changed := all[4]
	changed.NarHash = fakeHash("rebuilt")
	tests := []struct {
		name     string
		from, to []PathInfo
		added    []string
		removed  []string
	}{
		{"both empty", nil, nil, nil, nil},
		{"from empty", nil, all[:3], paths(all[:3]), nil},
		{"to empty", all[:3], nil, nil, paths(all[:3])},
		{"same", all, all, nil, nil},
		{"interleaved", pick(all, 0, 2, 4, 6), pick(all, 1, 2, 5, 6, 9), paths(pick(all, 1, 5, 9)), paths(pick(all, 0, 4))},
		{"changed record", all[3:6], []PathInfo{all[3], changed, all[5]}, []string{changed.Path}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			added, removed := Delta(tt.from, tt.to)
			if !slices.Equal(paths(added), tt.added) || !slices.Equal(removed, tt.removed) {
				t.Fatalf("added %v removed %v; want %v, %v", paths(added), removed, tt.added, tt.removed)
			}
			if got := applyDelta(tt.from, added, removed); !reflect.DeepEqual(nonNil(got), nonNil(tt.to)) {
				t.Fatalf("from+delta != to")
			}
		})
	}
}

func TestDeltaLarge(t *testing.T) {
	a := fakeInfos("/nix/store", 3000, 4, 1)
	var from, to []PathInfo
	for i, in := range a {
		if i%3 != 0 {
			from = append(from, in)
		}
		if i%5 != 0 {
			to = append(to, in)
		}
	}
	added, removed := Delta(from, to)
	for _, in := range added {
		if !strings.HasPrefix(in.Path, "/nix/store/") {
			t.Fatal(in.Path)
		}
	}
	if got := applyDelta(from, added, removed); !reflect.DeepEqual(got, to) {
		t.Fatal("from+delta != to")
	}
}

func paths(infos []PathInfo) []string {
	var out []string
	for _, in := range infos {
		out = append(out, in.Path)
	}
	return out
}

func pick(infos []PathInfo, idx ...int) []PathInfo {
	var out []PathInfo
	for _, i := range idx {
		out = append(out, infos[i])
	}
	return out
}

func nonNil(infos []PathInfo) []PathInfo {
	if infos == nil {
		return []PathInfo{}
	}
	return infos
}
