package cluster

import (
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/hashicorp/memberlist"
)

func sampleStates() []State {
	var sum [32]byte
	for i := range sum {
		sum[i] = byte(i)
	}
	return []State{
		{Node: "central", Seq: 1<<62 + 5, Role: RoleServer, Generations: []Generation{{ID: 3, RegistrationSHA256: sum}, {ID: 9}}},
		{Node: "b1", Seq: 7, Role: RoleBuilder, Server: "http://central:7480", Phase: "idle", Mounted: []uint64{9, 3}},
		{Node: "b2", Seq: 1, Role: RoleBuilder, Left: true},
	}
}

func TestStateRoundTrip(t *testing.T) {
	for _, s := range sampleStates() {
		got, err := DecodeState(EncodeState(s))
		if err != nil {
			t.Fatalf("%s: %v", s.Node, err)
		}
		if !reflect.DeepEqual(got, s) {
			t.Fatalf("round trip of %s: got %+v want %+v", s.Node, got, s)
		}
	}
	all := sampleStates()
	got, err := DecodeTable(EncodeTable(all))
	if err != nil || !reflect.DeepEqual(got, all) {
		t.Fatalf("table round trip: %v\n got %+v\nwant %+v", err, got, all)
	}
}

func TestBroadcastFitsAPacket(t *testing.T) {
	s := State{Node: strings.Repeat("n", 200), Seq: 1 << 63, Role: RoleServer}
	for i := uint64(1); i <= 500; i++ {
		s.Generations = append(s.Generations, Generation{ID: 1<<40 + i})
	}
	b := s.forBroadcast()
	if !b.Partial || len(b.Generations) != maxBroadcastGens || b.Newest() != s.Newest() {
		t.Fatalf("broadcast of 500 generations: partial=%v gens=%d newest=%d", b.Partial, len(b.Generations), b.Newest())
	}
	// memberlist's default UDP buffer is 1400 bytes; encryption and
	// framing take about 100 of them.
	if n := len(EncodeState(b)); n > 1200 {
		t.Fatalf("broadcast is %d bytes: does not fit one packet", n)
	}
	if got, _ := DecodeState(EncodeState(s)); len(got.Generations) != 500 || got.Partial {
		t.Fatalf("full state lost generations: %d", len(got.Generations))
	}
}

func TestDecodeMalformed(t *testing.T) {
	good := EncodeState(sampleStates()[1])
	cases := []struct {
		name string
		b    []byte
		want string
	}{
		{"empty", nil, "version at byte 0: truncated"},
		{"version", append([]byte{2}, good[1:]...), "version 2: want 1"},
		{"kind", append([]byte{1, 9}, good[2:]...), "kind 9"},
		{"truncated", good[:len(good)-1], "bytes left"},
		{"trailing", append(append([]byte(nil), good...), 0), "1 trailing bytes"},
		{"empty name", []byte{1, 1, 0}, "node name"},
		{"huge name", []byte{1, 1, 0xff, 0xff, 0x03}, "over the limit 512"},
		{"lying count", []byte{1, 1, 1, 'a', 1, 1, 0, 100}, "count 100 but only 0 bytes left"},
		{"role", []byte{1, 1, 1, 'a', 1, 7, 0, 0, 0, 0, 0}, "unknown role 7"},
		{"flags", []byte{1, 1, 1, 'a', 1, 1, 4, 0, 0, 0, 0}, "unknown flags"},
		{"zero mounted", []byte{1, 1, 1, 'a', 1, 2, 0, 0, 0, 0, 1, 0}, "mounted generation"},
		{"bad utf8", []byte{1, 1, 1, 0xff, 1, 1, 0, 0, 0, 0, 0}, "not UTF-8"},
		{"overlong varint", []byte{1, 1, 1, 'a', 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}, "overlong"},
	}
	for _, c := range cases {
		_, err := DecodeState(c.b)
		if err == nil || !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want an ErrMalformed naming %q", c.name, err, c.want)
		}
	}
	dec := EncodeState(State{Node: "s", Role: RoleServer, Generations: []Generation{{ID: 5}, {ID: 4}}})
	if _, err := DecodeState(dec); err == nil || !strings.Contains(err.Error(), "not increasing") {
		t.Errorf("decreasing generations: %v", err)
	}
	tbl := EncodeTable(sampleStates())
	if _, err := DecodeTable(tbl[:len(tbl)-3]); err == nil {
		t.Error("truncated table decoded")
	}
	if _, err := DecodeTable(good); err == nil || !strings.Contains(err.Error(), "kind 1: want 2") {
		t.Errorf("state as table: %v", err)
	}
}

func FuzzDecode(f *testing.F) {
	for _, s := range sampleStates() {
		f.Add(EncodeState(s))
	}
	f.Add(EncodeTable(sampleStates()))
	f.Add([]byte{1, 2, 0xff, 0xff, 0xff, 0xff, 0x0f})
	f.Fuzz(func(t *testing.T, b []byte) {
		if s, err := DecodeState(b); err == nil {
			again, err := DecodeState(EncodeState(s))
			if err != nil || !reflect.DeepEqual(again, s) {
				t.Fatalf("accepted state does not round-trip: %v", err)
			}
		} else if !errors.Is(err, ErrMalformed) {
			t.Fatalf("error does not wrap ErrMalformed: %v", err)
		}
		if ss, err := DecodeTable(b); err == nil {
			if _, err := DecodeTable(EncodeTable(ss)); err != nil {
				t.Fatalf("accepted table does not round-trip: %v", err)
			}
		} else if !errors.Is(err, ErrMalformed) {
			t.Fatalf("error does not wrap ErrMalformed: %v", err)
		}
	})
}

func TestMetaCap(t *testing.T) {
	m := Meta{Role: RoleServer, Version: "v1.2.3", API: "http://central.example:7480", NFS: "central.example:2049"}
	b, err := EncodeMeta(m)
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseMeta(b)
	if err != nil || got != m {
		t.Fatalf("meta round trip: %+v %v", got, err)
	}
	// The worst case config load accepts: long host names in both
	// addresses and a 64-byte version.
	host := strings.Repeat("h", 150)
	worst := Meta{Role: RoleServer, API: "http://" + host + ":65535", NFS: host + ":65535"}
	if err := CheckMeta(worst); err != nil {
		t.Fatalf("150-byte host names must fit: %v", err)
	}
	over := Meta{Role: RoleServer, API: "http://" + strings.Repeat("h", 300) + ":7480", NFS: strings.Repeat("h", 200) + ":2049"}
	err = CheckMeta(over)
	if !errors.Is(err, ErrMetaTooLarge) || !strings.Contains(err.Error(), "512") {
		t.Fatalf("oversized meta: %v", err)
	}
	if _, err := New(Config{Name: "x", Bind: "127.0.0.1:0", Meta: over}, nil); !errors.Is(err, ErrMetaTooLarge) {
		t.Fatalf("New with oversized meta: %v (memberlist would panic)", err)
	}
	if memberlist.MetaMaxSize != 512 {
		t.Fatalf("memberlist.MetaMaxSize is %d", memberlist.MetaMaxSize)
	}
	for _, bad := range []string{`{"v":2,"role":"server"}`, `{"v":1,"role":"oracle"}`, `nope`} {
		if _, err := ParseMeta([]byte(bad)); err == nil {
			t.Errorf("ParseMeta(%s) accepted", bad)
		}
	}
}
