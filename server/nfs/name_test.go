package nfs

import (
	"bytes"
	"io/fs"
	"strings"
	"testing"
)

func TestValidName(t *testing.T) {
	for _, ok := range []string{"a", "abc-1.2", "...", ".hidden", "@not-a-token", strings.Repeat("x", 255)} {
		if !validName(ok) {
			t.Errorf("validName(%q) = false", ok)
		}
	}
	for _, bad := range []string{"", ".", "..", "a/b", "/", "../etc", "a\x00b", strings.Repeat("x", 256)} {
		if validName(bad) {
			t.Errorf("validName(%q) = true", bad)
		}
	}
}

func TestParseRef(t *testing.T) {
	h := []byte{1, 2, 3, 4, 5, 6, 7, 8}
	tok := encodeToken(h)
	other := encodeToken([]byte{9, 9, 9, 9})
	self := strings.Join(handlePath(h), "/")
	cases := []struct {
		path string
		want ref
		ok   bool
	}{
		{"", ref{root: true}, true},
		{tok, ref{handle: h}, true},
		{self, ref{handle: h}, true},
		{tok + "/..", ref{handle: h, parent: true}, true},
		{self + "/name", ref{handle: h, name: "name"}, true},
		{tok + "/name", ref{handle: h, name: "name"}, true},
		{self + "/@file", ref{handle: h, name: "@file"}, true}, // a name starting with @ is a name
		{self + "/.", ref{handle: h}, true},
		{self + "/", ref{}, false},                     // LOOKUP ""
		{self + "/a/b", ref{}, false},                  // LOOKUP "a/b"
		{self + "/../x", ref{}, false},                 // LOOKUP "../x"
		{self + "/../" + tok, ref{}, false},            // LOOKUP "../@tok"
		{tok + "/../" + other, ref{}, false},           // a different token
		{tok + "/x/" + tok, ref{}, false},              //
		{"name", ref{}, false},                         // no token
		{"@!!!", ref{}, false},                         // not base64
		{"/" + tok, ref{}, false},                      // leading slash
		{"@" + strings.Repeat("A", 200), ref{}, false}, // too long for a handle
	}
	for _, c := range cases {
		got, err := parseRef(c.path)
		if (err == nil) != c.ok {
			t.Errorf("parseRef(%q): err %v, want ok=%v", c.path, err, c.ok)
			continue
		}
		if c.ok && (got.root != c.want.root || got.parent != c.want.parent || got.name != c.want.name || !bytes.Equal(got.handle, c.want.handle)) {
			t.Errorf("parseRef(%q) = %+v, want %+v", c.path, got, c.want)
		}
	}
}

func TestParseMountPath(t *testing.T) {
	good := map[string]struct {
		id  uint64
		sub string
	}{
		"/gen/1":              {1, ""},
		"/gen/42/":            {42, ""},
		"/gen/7/abc-pkg/bin":  {7, "abc-pkg/bin"},
		"/gen/7/abc-pkg/bin/": {7, "abc-pkg/bin"},
	}
	for p, w := range good {
		id, sub, err := parseMountPath(p)
		if err != nil || id != w.id || strings.Join(sub, "/") != w.sub {
			t.Errorf("parseMountPath(%q) = %d %q %v, want %d %q", p, id, sub, err, w.id, w.sub)
		}
	}
	for _, p := range []string{"", "/", "/gen", "/gen/", "/gen/0", "/gen/01", "/gen/+1", "/gen/x",
		"/gen/-1", "/gen/1/../2", "/gen/1/./a", "/gen/1//a", "/gen/99999999999999999999", "gen/1", "/other/1"} {
		if _, _, err := parseMountPath(p); err == nil {
			t.Errorf("parseMountPath(%q) accepted", p)
		}
	}
}

func TestVerifierDeterministicAndNonZero(t *testing.T) {
	a, b := verifier("@x/../@x"), verifier("@y/../@y")
	if a != verifier("@x/../@x") {
		t.Error("verifier not deterministic")
	}
	if a == b || a == 0 || b == 0 {
		t.Errorf("verifiers %x %x", a, b)
	}
}

func TestDirCacheBounded(t *testing.T) {
	c := newDirCache(100)
	list := func(n int) []fs.FileInfo {
		l := make([]fs.FileInfo, n)
		for i := range l {
			l[i] = &info{name: "f"}
		}
		return l
	}
	c.add(1, "a", list(60))
	c.add(2, "b", list(30))
	if c.get(1, "a") == nil || c.get(2, "b") == nil {
		t.Fatal("listings not cached")
	}
	c.add(3, "c", list(50)) // evicts the least recently used (a)
	if c.get(1, "a") != nil || c.get(3, "c") == nil || c.get(2, "b") == nil {
		t.Error("eviction did not drop the oldest listing")
	}
	if c.entries > 100 {
		t.Errorf("cache holds %d entries, bound 100", c.entries)
	}
	if c.get(3, "other path") != nil {
		t.Error("listing returned for another path with the same verifier")
	}
	c.add(4, "d", list(101))
	if c.get(4, "d") != nil {
		t.Error("a listing larger than the bound was cached")
	}
}
