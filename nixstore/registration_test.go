package nixstore

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"
)

const (
	pA   = "/nix/store/0c8gwfdh1p3frkn4i8xaxw5qs8fvqzqm-a"
	pB   = "/nix/store/1jbn2cmk7hqlkpr3rsi3f4mhs6wrvdqn-b-1.0"
	pDrv = "/nix/store/2mabcdfghijklmnpqrsvwxyz012345zz-b-1.0.drv"
	h1   = "1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13"
	h2   = "0000000000000000000000000000000000000000000000000000000000000000"
)

// sample is dump-db output for two paths: a with no references and no
// deriver, b with a deriver and references to a and itself.
var sample = pA + "\n" + h1 + "\n120\n\n0\n" +
	pB + "\n" + h2 + "\n4096\n" + pDrv + "\n2\n" + pA + "\n" + pB + "\n"

var sampleInfos = []PathInfo{
	{Path: pA, NarHash: h1, NarSize: 120},
	{Path: pB, NarHash: h2, NarSize: 4096, Deriver: pDrv, References: []string{pA, pB}},
}

func TestParseRegistration(t *testing.T) {
	got, err := ParseRegistration(strings.NewReader(sample))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, sampleInfos) {
		t.Fatalf("parsed\n%#v\nwant\n%#v", got, sampleInfos)
	}
}

func TestWriteRegistration(t *testing.T) {
	var b bytes.Buffer
	if err := WriteRegistration(&b, sampleInfos); err != nil {
		t.Fatal(err)
	}
	if b.String() != sample {
		t.Fatalf("wrote\n%s\nwant\n%s", b.String(), sample)
	}
}

func TestParseEmpty(t *testing.T) {
	got, err := ParseRegistration(strings.NewReader(""))
	if err != nil || len(got) != 0 {
		t.Fatalf("empty input: %v, %v", got, err)
	}
}

func TestRoundTripLarge(t *testing.T) {
	infos := fakeInfos("/nix/store", 2000, 8, 1)
	var b bytes.Buffer
	if err := WriteRegistration(&b, infos); err != nil {
		t.Fatal(err)
	}
	got, err := ParseRegistration(bytes.NewReader(b.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, infos) {
		t.Fatal("round trip changed the records")
	}
}

func TestParseRegistrationErrors(t *testing.T) {
	rec := func(lines ...string) string { return strings.Join(lines, "\n") + "\n" }
	aRec := rec(pA, h1, "120", "", "0")
	tests := []struct {
		name string
		in   string
		line int
		want string
	}{
		{"truncated after path", pA + "\n", 2, "unexpected end of input, expected NAR hash"},
		{"truncated after hash", rec(pA, h1), 3, "expected NAR size"},
		{"truncated after size", rec(pA, h1, "1"), 4, "expected deriver"},
		{"truncated after deriver", rec(pA, h1, "1", ""), 5, "expected reference count"},
		{"no final newline", strings.TrimSuffix(aRec, "\n"), 5, "missing newline"},
		{"cut in the middle of a line", aRec + pB[:20], 6, "missing newline"},
		{"hash with prefix", rec(pA, "sha256:"+h1, "1", "", "0"), 2, "NAR hash"},
		{"upper-case hash", rec(pA, strings.ToUpper(h1), "1", "", "0"), 2, "64 lowercase hex"},
		{"short hash", rec(pA, h1[:63], "1", "", "0"), 2, "NAR hash"},
		{"nix32 hash", rec(pA, "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw", "1", "", "0"), 2, "NAR hash"},
		{"size not a number", rec(pA, h1, "12a", "", "0"), 3, "expected NAR size"},
		{"negative size", rec(pA, h1, "-1", "", "0"), 3, "decimal number"},
		{"size with leading zero", rec(pA, h1, "012", "", "0"), 3, "decimal number"},
		{"size overflows", rec(pA, h1, "18446744073709551616", "", "0"), 3, "decimal number"},
		{"count not a number", rec(pA, h1, "1", "", "x"), 5, "reference count"},
		{"count larger than what follows", rec(pA, h1, "1", "", "3", pA), 5, "reference count 3 of " + pA + " is larger than what follows: input ends after 1"},
		{"empty reference", rec(pA, h1, "1", "", "1", ""), 6, "empty line, expected reference 1 of 1"},
		{"relative path", rec("nix/store/0c8gwfdh1p3frkn4i8xaxw5qs8fvqzqm-a", h1, "1", "", "0"), 1, "not an absolute path"},
		{"path not a store path", rec("/nix/store/a", h1, "1", "", "0"), 1, "not a store path"},
		{"unclean path", rec("/nix//store/0c8gwfdh1p3frkn4i8xaxw5qs8fvqzqm-a", h1, "1", "", "0"), 1, "not in store directory /nix/store"},
		{"root store dir", rec("//0c8gwfdh1p3frkn4i8xaxw5qs8fvqzqm-a", h1, "1", "", "0"), 1, "not supported"},
		{"path in a subdirectory", rec(pA, h1, "1", "", "0", pA+"/bin", h1, "1", "", "0"), 6, "not a store path"},
		{"second path in another store dir", aRec + rec("/other/store/1jbn2cmk7hqlkpr3rsi3f4mhs6wrvdqn-b", h1, "1", "", "0"), 6, "not in store directory /nix/store"},
		{"reference in another store dir", rec(pA, h1, "1", "", "1", "/gnu/store/1jbn2cmk7hqlkpr3rsi3f4mhs6wrvdqn-b"), 6, "not in store directory"},
		{"bad hash character in path", rec("/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-a", h1, "1", "", "0"), 1, "hash part"},
		{"bad name character", rec("/nix/store/0c8gwfdh1p3frkn4i8xaxw5qs8fvqzqm-a b", h1, "1", "", "0"), 1, "name has"},
		{"deriver not a path", rec(pA, h1, "1", "foo.drv", "0"), 4, "deriver of"},
		{"empty path line", rec("", h1), 1, "empty line, expected store path"},
		{"duplicate path", aRec + aRec, 6, "duplicate path " + pA + " (first registered on line 1)"},
		{"unsorted references", rec(pB, h1, "1", "", "2", pB, pA), 7, "must be sorted"},
		{"repeated reference", rec(pB, h1, "1", "", "2", pA, pA), 7, "must be sorted"},
		{"trailing empty line", aRec + "\n", 6, "empty line, expected store path"},
		{"CRLF", strings.ReplaceAll(aRec, "\n", "\r\n"), 1, "name has"},
		{"huge line", strings.Repeat("/", maxLine+10) + "\n", 1, "line longer than"},
		{"huge line without newline", strings.Repeat("/", maxLine+10), 1, "line longer than"},
		{"long line within bounds", strings.Repeat("/", 40000) + "\n", 1, "not supported"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseRegistration(strings.NewReader(tt.in))
			var se *SyntaxError
			if !errors.As(err, &se) {
				t.Fatalf("got %v, %v; want a SyntaxError", got, err)
			}
			if se.Line != tt.line || !strings.Contains(se.Msg, tt.want) {
				t.Fatalf("got %q; want line %d containing %q", err, tt.line, tt.want)
			}
			if got != nil {
				t.Fatalf("returned records with an error: %v", got)
			}
		})
	}
}

func TestWriteRegistrationRejectsBadRecords(t *testing.T) {
	good := sampleInfos[1]
	mod := func(f func(*PathInfo)) []PathInfo {
		c := good
		c.References = append([]string(nil), good.References...)
		f(&c)
		return []PathInfo{sampleInfos[0], c}
	}
	tests := map[string][]PathInfo{
		"newline in path":    mod(func(p *PathInfo) { p.Path += "\n" }),
		"prefixed hash":      mod(func(p *PathInfo) { p.NarHash = "sha256:" + h1 }),
		"unsorted refs":      mod(func(p *PathInfo) { p.References = []string{pB, pA} }),
		"foreign deriver":    mod(func(p *PathInfo) { p.Deriver = "/gnu/store/2mabcdfghijklmnpqrsvwxyz012345zz-b.drv" }),
		"relative reference": mod(func(p *PathInfo) { p.References = []string{"x"} }),
		"duplicate path":     {sampleInfos[0], sampleInfos[0]},
	}
	for name, infos := range tests {
		t.Run(name, func(t *testing.T) {
			var b bytes.Buffer
			if err := WriteRegistration(&b, infos); err == nil {
				t.Fatalf("no error; wrote\n%s", b.String())
			}
			if b.Len() != 0 {
				t.Fatalf("wrote %d bytes despite the error", b.Len())
			}
		})
	}
}

func TestSort(t *testing.T) {
	infos := []PathInfo{
		{Path: pB, References: []string{pB, pA}},
		{Path: pA},
	}
	Sort(infos)
	if infos[0].Path != pA || infos[1].Path != pB || infos[1].References[0] != pA {
		t.Fatalf("not sorted: %v", infos)
	}
}

func TestManifestHelpers(t *testing.T) {
	if got := NarBytes(sampleInfos); got != 4216 {
		t.Errorf("NarBytes = %d, want 4216", got)
	}
	sum, err := RegistrationSHA256(sampleInfos)
	if err != nil {
		t.Fatal(err)
	}
	// sha256 of the sample text, computed independently of the writer.
	if want := sha256Hex(sample); sum != want {
		t.Errorf("RegistrationSHA256 = %s, want %s", sum, want)
	}
}

// FuzzParseRegistration checks that whatever parses is canonical: writing
// the records gives back the exact input, and parsing that again gives the
// same records.
func FuzzParseRegistration(f *testing.F) {
	f.Add(sample)
	f.Add("")
	f.Add(pA + "\n" + h1 + "\n0\n\n0\n")
	f.Add(pA + "\n" + h1 + "\n1\n\n2\n" + pA + "\n")
	var b bytes.Buffer
	_ = WriteRegistration(&b, fakeInfos("/gnu/store", 5, 3, 7))
	f.Add(b.String())
	f.Fuzz(func(t *testing.T, in string) {
		infos, err := ParseRegistration(strings.NewReader(in))
		if err != nil {
			var se *SyntaxError
			if !errors.As(err, &se) || se.Line < 1 {
				t.Fatalf("error without a line: %v", err)
			}
			return
		}
		var out bytes.Buffer
		if err := WriteRegistration(&out, infos); err != nil {
			t.Fatalf("parsed records do not write: %v", err)
		}
		if out.String() != in {
			t.Fatalf("write∘parse changed the text:\nin  %q\nout %q", in, out.String())
		}
		again, err := ParseRegistration(&out)
		if err != nil || !reflect.DeepEqual(again, infos) {
			t.Fatalf("parse∘write∘parse differs: %v", err)
		}
	})
}

func BenchmarkWriteRegistration(b *testing.B) {
	infos := fakeInfos("/nix/store", 100_000, 10, 42)
	var buf bytes.Buffer
	for b.Loop() {
		buf.Reset()
		if err := WriteRegistration(&buf, infos); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkParseRegistration(b *testing.B) {
	var buf bytes.Buffer
	if err := WriteRegistration(&buf, fakeInfos("/nix/store", 100_000, 10, 42)); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := ParseRegistration(bytes.NewReader(buf.Bytes())); err != nil {
			b.Fatal(err)
		}
	}
}
