package config

import (
	"slices"
	"strings"
	"testing"
	"time"
)

func TestHostPort(t *testing.T) {
	for s, want := range map[string]int{":2049": 2049, "0.0.0.0:0": 0, "[::1]:7480": 7480, "central:65535": 65535} {
		if _, p, err := HostPort(s); err != nil || p != want {
			t.Errorf("HostPort(%q) = %d, %v; want %d", s, p, err, want)
		}
	}
	for _, s := range []string{":2049x", "host:nfs", ":65536", ":-1", ":+80", ":0x10", "2049", ""} {
		if _, _, err := HostPort(s); err == nil {
			t.Errorf("HostPort(%q) accepted", s)
		}
	}
}

type inner struct {
	Bind string `key:"cluster.bind"`
	Derv bool   `key:"-"`
}

type outer struct {
	Keep   int           `key:"retention.keep"`
	Every  time.Duration `key:"publish.interval"`
	Allow  []string      `key:"nfs.allow"`
	Flag   bool          `key:"-"`
	Nested inner
}

// Review 19 #7: a reload named Go fields ("Keep"); Changed names keys.
func TestChangedNamesKeys(t *testing.T) {
	a := outer{Keep: 3, Every: time.Minute, Allow: []string{"a"}, Nested: inner{Bind: ":1"}}
	b := a
	b.Keep, b.Flag, b.Nested.Derv = 1, true, true
	b.Allow = []string{"a", "b"}
	b.Nested.Bind = ":2"
	if got := Changed(a, b); !slices.Equal(got, []string{"retention.keep", "nfs.allow", "cluster.bind"}) {
		t.Errorf("Changed = %v, want [retention.keep nfs.allow cluster.bind]", got)
	}
	if got := Changed(a, a); len(got) != 0 {
		t.Errorf("Changed(a, a) = %v", got)
	}
	keys, err := Tags(outer{})
	if err != nil || !slices.Equal(keys, []string{"retention.keep", "publish.interval", "nfs.allow", "cluster.bind"}) {
		t.Errorf("Tags = %v, %v", keys, err)
	}
	type untagged struct {
		Keep int `key:"retention.keep"`
		Oops string
	}
	if _, err := Tags(untagged{}); err == nil || !strings.Contains(err.Error(), "Oops") {
		t.Errorf("Tags of a struct with an untagged field: %v, want an error naming it", err)
	}
	table := []Key{{Name: "retention.keep"}, {Name: "publish.interval"}, {Name: "nfs.allow"}, {Name: "cluster.bind"}}
	if err := CheckTags(outer{}, table); err != nil {
		t.Errorf("CheckTags of matching struct and keys: %v", err)
	}
	if err := CheckTags(outer{}, append(table[1:], Key{Name: "log.level"})); err == nil ||
		!strings.Contains(err.Error(), "[log.level]") || !strings.Contains(err.Error(), "[retention.keep]") {
		t.Errorf("CheckTags with a key without field and a tag without key: %v, want both named", err)
	}
	if err := CheckTags(untagged{}, table); err == nil || !strings.Contains(err.Error(), "Oops") {
		t.Errorf("CheckTags of an untagged field: %v", err)
	}
}
