package nixstore

import (
	"bytes"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

func regText(t *testing.T, infos []PathInfo) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := WriteRegistration(&b, infos); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// TestDeltaTextMatchesDelta: on random pairs of registrations (paths
// added, removed and changed), DeltaText gives exactly what Delta and
// WriteRegistration give, ApplyDelta of it gives the new text byte for
// byte, and RegistrationPaths lists the new text's paths.
func TestDeltaTextMatchesDelta(t *testing.T) {
	all := fakeInfos("/nix/store", 600, 4, 7)
	for seed := uint64(0); seed < 40; seed++ {
		r := rand.New(rand.NewPCG(seed, 1))
		var from, to []PathInfo
		for _, in := range all {
			inFrom, inTo := r.IntN(3) > 0, r.IntN(3) > 0
			if inFrom {
				from = append(from, in)
			}
			if inTo {
				if inFrom && r.IntN(10) == 0 {
					in.NarSize++ // the same path, rebuilt
				}
				to = append(to, in)
			}
		}
		if seed == 0 {
			from, to = nil, all
		}
		if seed == 1 {
			from, to = all, nil
		}
		added, removed := Delta(from, to)
		want := regText(t, added)
		ft, tt := regText(t, from), regText(t, to)
		gotAdded, gotRemoved, err := DeltaText(ft, tt)
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		if !bytes.Equal(gotAdded, want) || !slices.Equal(gotRemoved, removed) {
			t.Fatalf("seed %d: DeltaText differs from Delta: %d/%d added bytes, removed %d/%d", seed, len(gotAdded), len(want), len(gotRemoved), len(removed))
		}
		got, err := ApplyDelta(ft, gotAdded, gotRemoved)
		if err != nil {
			t.Fatalf("seed %d: apply: %v", seed, err)
		}
		if !bytes.Equal(got, tt) {
			t.Fatalf("seed %d: from + delta != to", seed)
		}
		ps, nar, err := RegistrationPaths(tt)
		var wantNar uint64
		for _, in := range to {
			wantNar += in.NarSize
		}
		if err != nil || !slices.Equal(ps, paths(to)) || nar != wantNar {
			t.Fatalf("seed %d: RegistrationPaths: %v, NAR bytes %d, want %d", seed, err, nar, wantNar)
		}
		if n, nar, err := RegistrationCount(tt); err != nil || n != len(to) || nar != wantNar {
			t.Fatalf("seed %d: RegistrationCount: %v, %d paths, NAR bytes %d, want %d, %d", seed, err, n, nar, len(to), wantNar)
		}
	}
}

func TestApplyDeltaRefusesWhatDoesNotFit(t *testing.T) {
	all := fakeInfos("/nix/store", 6, 2, 3)
	base := regText(t, all[:4])
	add := regText(t, all[4:5])
	tests := []struct {
		name     string
		base     []byte
		added    []byte
		removed  []string
		wantText string
	}{
		{"removes a path the base lacks", base, nil, []string{all[5].Path}, "does not have"},
		{"adds and removes a path", base, add, []string{all[4].Path}, "adds and removes"},
		{"adds and removes a base path", base, regText(t, all[1:2]), []string{all[1].Path}, "adds and removes"},
		{"removed not sorted", base, nil, []string{all[2].Path, all[1].Path}, ""},
		{"base not sorted", append(regText(t, all[2:3]), regText(t, all[1:2])...), nil, nil, "not sorted"},
		{"added not sorted", base, append(regText(t, all[5:6]), add...), nil, "not sorted"},
		{"record cut short", base[:len(base)-3], nil, nil, "cut short"},
		{"bad reference count", []byte("/nix/store/x\nh\n1\n\nmany\n"), nil, nil, "reference count"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ApplyDelta(tt.base, tt.added, tt.removed)
			if err == nil || !strings.Contains(err.Error(), tt.wantText) {
				t.Fatalf("ApplyDelta: %v, want an error with %q", err, tt.wantText)
			}
		})
	}
	if _, _, err := DeltaText(append(regText(t, all[2:3]), regText(t, all[1:2])...), base); err == nil || !strings.Contains(err.Error(), "not sorted") {
		t.Fatalf("DeltaText of an unsorted text: %v", err)
	}
}

// TestRegistrationCountNARSizes: NAR sizes of every length count as
// strconv reads them (the largest uint64 too), and a size that is not a
// number is refused, naming the record.
func TestRegistrationCountNARSizes(t *testing.T) {
	rec := func(p, size string) string {
		return "/nix/store/" + p + "\n" + strings.Repeat("0", 64) + "\n" + size + "\n\n0\n"
	}
	for _, tt := range []struct {
		text  string
		paths int
		nar   uint64
	}{
		{rec("aaa-a", "0") + rec("bbb-b", "18446744073709551615"), 2, 18446744073709551615},
		{rec("ccc-c", "9999999999999999999") + rec("ddd-d", "1"), 2, 10000000000000000000},
		{rec("eee-e", "0042"), 1, 42},
	} {
		n, nar, err := RegistrationCount([]byte(tt.text))
		if err != nil || n != tt.paths || nar != tt.nar {
			t.Errorf("RegistrationCount: %d paths, %d NAR bytes, %v; want %d, %d", n, nar, err, tt.paths, tt.nar)
		}
	}
	for _, bad := range []string{"", "12x", "-1", "18446744073709551616"} {
		_, _, err := RegistrationCount([]byte(rec("ddd-d", bad)))
		if err == nil || !strings.Contains(err.Error(), "record of /nix/store/ddd-d: NAR size") {
			t.Errorf("NAR size %q: %v, want refused naming the record", bad, err)
		}
		if _, _, err2 := RegistrationPaths([]byte(rec("ddd-d", bad))); err2 == nil {
			t.Errorf("RegistrationPaths with NAR size %q: no error", bad)
		}
	}
}
