package nixstore

import (
	"bytes"
	"compress/gzip"
	"errors"
	"io"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// fakeRows makes n sorted rows with every field set on some of them.
func fakeRows(n int) *Rows {
	infos := fakeInfos("/nix/store", n, 4, 7)
	rs := RowsFromInfos(infos)
	for i := range rs.Paths {
		r := &rs.Paths[i]
		// Every field depends on the path only, so fakeRows(n) and
		// fakeRows(m) agree on the rows they share.
		k := int(r.NarHash[0]) + int(r.NarHash[1])
		r.RegistrationTime = 1700000000 + int64(r.NarSize)
		r.Ultimate = k%2 == 0
		if k%3 == 0 {
			r.Sigs = []string{"cache.example.org-1:" + strings.Repeat("A", 86) + "==", "other:sig" + r.NarHash[:8]}
		}
		if k%4 == 0 {
			r.CA = "fixed:r:sha256:" + r.NarHash[:52]
		}
	}
	drv := fakePath("/nix/store", "thing.drv")
	rs.Paths = append(rs.Paths, Row{PathInfo: PathInfo{Path: drv, NarHash: fakeHash("drv"), NarSize: 400,
		References: []string{fakePath("/nix/store", "pkg-0")}}, CA: "text:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
		Outputs: map[string]string{"out": fakePath("/nix/store", "pkg-1"), "dev": fakePath("/nix/store", "pkg-2")}})
	rs.Realisations = []Realisation{
		{DrvHash: "sha256:1111", OutputName: "out", OutPath: fakePath("/nix/store", "pkg-1"), Sigs: []string{"k:s"}},
		{DrvHash: "sha256:2222", OutputName: "out", OutPath: fakePath("/nix/store", "pkg-2"), Refs: []string{"sha256:1111!out"}},
	}
	SortRows(rs)
	return rs
}

func writeRowsT(t *testing.T, h RowsHeader, rs *Rows) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := WriteRows(&buf, h, rs); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestRowsRoundTrip(t *testing.T) {
	rs := fakeRows(500)
	b := writeRowsT(t, RowsHeader{StoreDir: "/nix/store", Generation: 7}, rs)
	h, got, err := ReadRows(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	want := RowsHeader{Format: RowsFormat, Version: RowsVersion, StoreDir: "/nix/store", Generation: 7,
		Paths: len(rs.Paths), Realisations: 2}
	if h != want {
		t.Fatalf("header %+v, want %+v", h, want)
	}
	if !reflect.DeepEqual(got, rs) {
		t.Fatalf("round trip differs")
	}
	// Empty rows are a valid file too.
	h, got, err = ReadRows(bytes.NewReader(writeRowsT(t, RowsHeader{StoreDir: "/nix/store", Generation: 8, From: 7}, &Rows{})))
	if err != nil || len(got.Paths) != 0 || h.From != 7 {
		t.Fatalf("empty: %+v %+v %v", h, got, err)
	}
}

// gz compresses lines into a rows file as-is.
func gz(lines ...string) []byte {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write([]byte(strings.Join(lines, "\n") + "\n"))
	zw.Close()
	return buf.Bytes()
}

func TestReadRowsRejects(t *testing.T) {
	p1 := fakePath("/nix/store", "a")
	p2 := fakePath("/nix/store", "b")
	if p1 > p2 {
		p1, p2 = p2, p1
	}
	hash := fakeHash("a")
	hdr := func(paths, real int) string {
		return `{"format":"strata-rows","version":1,"store_dir":"/nix/store","generation":1,"paths":` +
			strconv.Itoa(paths) + `,"realisations":` + strconv.Itoa(real) + `}`
	}
	row := func(p string, extra string) string {
		return `{"path":"` + p + `","nar_hash":"` + hash + `","nar_size":1` + extra + `}`
	}
	good := gz(hdr(2, 0), row(p1, ""), row(p2, `,"refs":["`+p1+`"]`))
	if _, _, err := ReadRows(bytes.NewReader(good)); err != nil {
		t.Fatalf("good input: %v", err)
	}
	for _, c := range []struct {
		name string
		in   []byte
		want string
	}{
		{"not gzip", []byte("hello"), "not a gzip stream"},
		{"empty", gz(), "line 1"},
		{"newer version", gz(strings.Replace(hdr(0, 0), `"version":1`, `"version":2`, 1)), "version 2"},
		{"other format", gz(strings.Replace(hdr(0, 0), "strata-rows", "x", 1)), `format "x"`},
		{"unknown header key", gz(strings.Replace(hdr(0, 0), `"paths"`, `"bogus":1,"paths"`, 1)), "bogus"},
		{"truncated count", gz(hdr(3, 0), row(p1, ""), row(p2, "")), "truncated: 2 paths"},
		{"too many", gz(hdr(1, 0), row(p1, ""), row(p2, "")), "line 3: more paths"},
		{"unsorted", gz(hdr(2, 0), row(p2, ""), row(p1, "")), "not sorted"},
		{"bad hash", gz(hdr(1, 0), strings.Replace(row(p1, ""), hash, "xyz", 1)), "NAR hash"},
		{"not in store dir", gz(hdr(1, 0), row("/gnu/store/"+p1[len("/nix/store/"):], "")), "not in store directory"},
		{"bad ref", gz(hdr(1, 0), row(p1, `,"refs":["/nix/store/short"]`)), "reference"},
		{"sig with space", gz(hdr(1, 0), row(p1, `,"sigs":["a b"]`)), "white space"},
		{"outputs on non-drv", gz(hdr(1, 0), row(p1, `,"outputs":{"out":"`+p2+`"}`)), "not a .drv"},
		{"unknown row key", gz(hdr(1, 0), row(p1, `,"colour":1`)), "line 2"},
		{"garbage line", gz(hdr(1, 0), "{"), "line 2"},
		{"two values", gz(hdr(1, 0), row(p1, "")+"{}"), "line 2"},
		{"path after realisation", gz(hdr(1, 1), `{"realisation":{"drv_hash":"sha256:1","output":"out","out_path":"`+p1+`"}}`, row(p1, "")), "after the realisations"},
		{"realisation bad id", gz(hdr(0, 1), `{"realisation":{"drv_hash":"sha256:1!x","output":"out","out_path":"`+p1+`"}}`), "realisation 1"},
		{"realisation with path", gz(hdr(0, 1), `{"path":"`+p1+`","realisation":{"drv_hash":"a","output":"out","out_path":"`+p1+`"}}`), "path fields"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, rs, err := ReadRows(bytes.NewReader(c.in))
			if err == nil || !strings.Contains(err.Error(), c.want) || rs != nil {
				t.Fatalf("got %v, want an error containing %q and no rows", err, c.want)
			}
		})
	}
	// A stream cut anywhere is an error, never a shorter set of rows.
	full := writeRowsT(t, RowsHeader{StoreDir: "/nix/store", Generation: 1}, fakeRows(200))
	for cut := 0; cut < len(full); cut += 97 {
		if _, _, err := ReadRows(bytes.NewReader(full[:cut])); err == nil {
			t.Fatalf("stream cut at %d of %d bytes read without error", cut, len(full))
		}
	}
	_, _, err := ReadRows(bytes.NewReader(gz(strings.Replace(hdr(0, 0), `"version":1`, `"version":9`, 1))))
	if !errors.Is(err, ErrRowsVersion) {
		t.Fatalf("version error %v is not ErrRowsVersion", err)
	}
}

func TestRowsDelta(t *testing.T) {
	a := fakeRows(50)
	b := fakeRows(80) // the same first rows by construction, and more
	// A changed signature on a path both have makes it part of the delta.
	var changed string
	for i := range b.Paths {
		if idx := indexRow(a, b.Paths[i].Path); idx >= 0 && len(b.Paths[i].Sigs) == 0 {
			b.Paths[i].Sigs = []string{"new:sig"}
			changed = b.Paths[i].Path
			break
		}
	}
	d := RowsDelta(a, b)
	want := map[string]bool{changed: true}
	for _, r := range b.Paths {
		if indexRow(a, r.Path) < 0 {
			want[r.Path] = true
		}
	}
	if len(d.Paths) != len(want) {
		for _, r := range d.Paths {
			if !want[r.Path] {
				t.Logf("extra %s: %+v vs %+v", r.Path, r, a.Paths[indexRow(a, r.Path)])
			}
		}
		t.Fatalf("delta has %d paths, want %d", len(d.Paths), len(want))
	}
	for _, r := range d.Paths {
		if !want[r.Path] {
			t.Fatalf("delta has %s, which did not change", r.Path)
		}
	}
	if len(RowsDelta(b, b).Paths) != 0 || len(RowsDelta(b, b).Realisations) != 0 {
		t.Fatal("delta of a generation to itself is not empty")
	}
	if len(RowsDelta(&Rows{}, b).Realisations) != 2 {
		t.Fatal("delta from nothing lacks the realisations")
	}
}

func indexRow(rs *Rows, p string) int {
	for i := range rs.Paths {
		if rs.Paths[i].Path == p {
			return i
		}
	}
	return -1
}

// checkFastRow fails unless fastRow, whenever it takes a line, decodes it
// exactly as encoding/json (strict) does.
func checkFastRow(t *testing.T, line []byte) {
	var fast, slow wireRow
	if !fastRow(line, &fast) {
		return
	}
	if err := strictUnmarshal(line, &slow); err != nil {
		t.Fatalf("fastRow took %q, encoding/json refuses it: %v", line, err)
	}
	if !reflect.DeepEqual(fast, slow) {
		t.Fatalf("%q: fastRow %+v, encoding/json %+v", line, fast, slow)
	}
}

func TestFastRowAgreesWithJSON(t *testing.T) {
	var buf bytes.Buffer
	if err := WriteRows(&buf, RowsHeader{StoreDir: "/nix/store", Generation: 1}, fakeRows(300)); err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(&buf)
	if err != nil {
		t.Fatal(err)
	}
	all, _ := io.ReadAll(zr)
	lines := strings.Split(strings.TrimSpace(string(all)), "\n")[1:]
	took := 0
	for _, l := range lines {
		var w wireRow
		if fastRow([]byte(l), &w) {
			took++
		}
		checkFastRow(t, []byte(l))
	}
	// Every path line WriteRows writes takes the fast path.
	if want := len(lines) - 2; took != want {
		t.Fatalf("fast path took %d of %d path lines", took, want)
	}
	for _, l := range []string{`{}`, `{"path":"a\u0041"}`, `{"nar_size":01}`, `{"nar_size":-1}`, `{"ultimate":true }`,
		`{"refs":[]}`, `{"refs":null}`, `{"outputs":{}}`, `{"path":"x","path":"y"}`, `{"time":99999999999999999999}`,
		`{"sigs":["a","b"]}x`, `{"ca":"é"}`, ` {"path":"x"}`} {
		checkFastRow(t, []byte(l))
	}
}

func FuzzFastRow(f *testing.F) {
	for _, s := range []string{`{"path":"/nix/store/x","nar_size":1,"refs":["a","b"],"ultimate":true,"outputs":{"out":"b"}}`,
		`{"time":0}`, `{"sigs":[]}`, `{}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) { checkFastRow(t, b) })
}

// Files bigger than the reader's chunks, with a line longer than a chunk,
// read back whole; a last line without its newline, a corrupt stream and
// an early error leave no reading goroutine behind.
func TestReadRowsChunks(t *testing.T) {
	rs := fakeRows(8000)
	big := &rs.Paths[len(rs.Paths)/2]
	for i := range 2 * chunkSize / 60 {
		big.References = append(big.References, fakePath("/nix/store", "ref-"+strconv.Itoa(i)))
	}
	SortRows(rs)
	file := writeRowsT(t, RowsHeader{StoreDir: "/nix/store", Generation: 3}, rs)
	before := runtime.NumGoroutine()
	_, got, err := ReadRows(bytes.NewReader(file))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, rs) {
		t.Fatal("round trip of a multi-chunk file differs")
	}
	var plain bytes.Buffer
	zr, _ := gzip.NewReader(bytes.NewReader(file))
	io.Copy(&plain, zr)
	if plain.Len() < 4*chunkSize {
		t.Fatalf("fixture is %d bytes, want several chunks", plain.Len())
	}
	noNewline := plain.Bytes()[:plain.Len()-1]
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(noNewline)
	zw.Close()
	if _, _, err := ReadRows(bytes.NewReader(buf.Bytes())); err == nil || !strings.Contains(err.Error(), "unexpected EOF") {
		t.Fatalf("no final newline: %v", err)
	}
	corrupt := bytes.Clone(file)
	corrupt[len(corrupt)-6] ^= 0xff // the CRC
	if _, _, err := ReadRows(bytes.NewReader(corrupt)); err == nil {
		t.Fatal("corrupt stream read without error")
	}
	bad := bytes.Clone(plain.Bytes())
	bad[len(`{"format"`)+chunkSize/2] = 0 // somewhere in the first chunk
	buf.Reset()
	zw = gzip.NewWriter(&buf)
	zw.Write(bad)
	zw.Close()
	if _, _, err := ReadRows(bytes.NewReader(buf.Bytes())); err == nil {
		t.Fatal("bad line read without error")
	}
	for range 50 {
		if runtime.NumGoroutine() <= before {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		t.Fatalf("%d goroutines after reading, %d before", n, before)
	}
}
