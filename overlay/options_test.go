package overlay

import (
	"context"
	"strings"
	"testing"
)

func TestNFSOptionsString(t *testing.T) {
	tests := []struct {
		name string
		o    NFSOptions
		want string
	}{
		{"defaults", NFSOptions{Addr: "10.0.2.2"},
			"vers=3,proto=tcp,port=2049,mountport=2049,mountproto=tcp,nolock,ro,hard,nosharecache,addr=10.0.2.2,mountaddr=10.0.2.2"},
		{"nconnect and port", NFSOptions{Port: 20490, NConnect: 4, Addr: "192.0.2.1"},
			"vers=3,proto=tcp,port=20490,mountport=20490,mountproto=tcp,nolock,ro,hard,nconnect=4,nosharecache,addr=192.0.2.1,mountaddr=192.0.2.1"},
		{"share cache, extra", NFSOptions{Port: 1, NConnect: 1, Addr: "::1", ShareCache: true, Extra: []string{"timeo=50", "retrans=3"}},
			"vers=3,proto=tcp,port=1,mountport=1,mountproto=tcp,nolock,ro,hard,addr=::1,mountaddr=::1,timeo=50,retrans=3"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.o.Validate(); err != nil {
				t.Fatal(err)
			}
			if got := tc.o.String(); got != tc.want {
				t.Errorf("\n got %s\nwant %s", got, tc.want)
			}
		})
	}
}

func TestNFSOptionsValidate(t *testing.T) {
	tests := []struct {
		o    NFSOptions
		want string
	}{
		{NFSOptions{Port: 70000}, "port 70000"},
		{NFSOptions{Port: -1}, "port -1"},
		{NFSOptions{NConnect: 17}, "nconnect 17"},
		{NFSOptions{Addr: "nfs.example"}, "not a numeric IP"},
		{NFSOptions{Extra: []string{"a,b"}}, `"a,b"`},
		{NFSOptions{Extra: []string{""}}, "extra option"},
	}
	for _, tc := range tests {
		err := tc.o.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Validate(%+v) = %v, want an error mentioning %q", tc.o, err, tc.want)
		}
	}
}

func TestNFSSourceAndResolve(t *testing.T) {
	if got := NFSSource("10.0.2.2", "/gen/7"); got != "10.0.2.2:/gen/7" {
		t.Errorf("NFSSource v4 = %q", got)
	}
	if got := NFSSource("fd00::1", "/gen/7"); got != "[fd00::1]:/gen/7" {
		t.Errorf("NFSSource v6 = %q", got)
	}
	ctx := context.Background()
	if a, err := ResolveNFSAddr(ctx, "192.0.2.7"); err != nil || a != "192.0.2.7" {
		t.Errorf("ResolveNFSAddr(literal) = %q %v", a, err)
	}
	// "localhost" resolves from /etc/hosts, no network needed.
	if a, err := ResolveNFSAddr(ctx, "localhost"); err != nil || (a != "127.0.0.1" && a != "::1") {
		t.Errorf("ResolveNFSAddr(localhost) = %q %v", a, err)
	}
}

func TestMountNFSBadInput(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		server, export string
		o              NFSOptions
		want           string
	}{
		{"", "/gen/1", NFSOptions{}, "bad server name"},
		{"a,b", "/gen/1", NFSOptions{}, "bad server name"},
		{"10.0.0.1", "gen/1", NFSOptions{}, "must be absolute"},
		{"10.0.0.1", "/gen/1", NFSOptions{NConnect: 99}, "nconnect 99"},
	}
	for _, tc := range tests {
		err := MountNFS(ctx, tc.server, tc.export, t.TempDir(), tc.o)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("MountNFS(%q, %q) = %v, want an error mentioning %q", tc.server, tc.export, err, tc.want)
		}
	}
}

func TestLayersValidate(t *testing.T) {
	ok := []Layers{
		{Lower: []string{"/a"}, Upper: "/u/up", Work: "/u/w"},
		{Lower: []string{"/a", "/b"}},
	}
	for _, l := range ok {
		if err := l.Validate(); err != nil {
			t.Errorf("Validate(%+v) = %v", l, err)
		}
	}
	bad := []struct {
		l    Layers
		want string
	}{
		{Layers{}, "no lower"},
		{Layers{Lower: []string{"rel"}}, "not an absolute path"},
		{Layers{Lower: []string{"/a:b"}}, `contains ":"`},
		{Layers{Lower: []string{"/a"}, Upper: "/u,x", Work: "/w"}, `contains ","`},
		{Layers{Lower: []string{"/a"}, Upper: "/u"}, "set together"},
		{Layers{Lower: []string{"/a"}, Upper: "/u", Work: "/u/"}, "directory of its own"},
		{Layers{Lower: []string{"/a"}, Upper: "/u", Work: `/w\x`}, `contains "\\"`},
	}
	for _, tc := range bad {
		err := tc.l.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Validate(%+v) = %v, want an error mentioning %q", tc.l, err, tc.want)
		}
	}
	l := Layers{Lower: []string{"/g/2", "/g/1"}, Upper: "/u", Work: "/w"}
	if got, want := l.String(), "lowerdir=/g/2:/g/1,upperdir=/u,workdir=/w"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
}

func TestMethodString(t *testing.T) {
	for _, m := range []Method{MethodAuto, MethodBeneath, MethodPropagation} {
		back, err := ParseMethod(m.String())
		if err != nil || back != m {
			t.Errorf("ParseMethod(%q) = %v %v", m.String(), back, err)
		}
	}
	if MethodBeneath.String() != "beneath" || MethodPropagation.String() != "propagation" {
		t.Errorf("names: %s %s", MethodBeneath, MethodPropagation)
	}
	if _, err := ParseMethod("remount"); err == nil {
		t.Error("ParseMethod(remount) accepted")
	}
}

// Extra options may not override what String sets: Validate (and so
// MountNFS) refuses them, naming the option.
func TestNFSOptionsRefuseOverrides(t *testing.T) {
	for _, e := range []string{"soft", "vers=4.1", "port=1", "mountaddr=::1", "rw", "noacl", "sharecache", "nolock", "nconnect=2"} {
		err := NFSOptions{Extra: []string{"timeo=50", e}}.Validate()
		if err == nil || !strings.Contains(err.Error(), `"`+e+`"`) || !strings.Contains(err.Error(), "strata decides") {
			t.Errorf("Validate(extra %s) = %v, want an error naming it", e, err)
		}
	}
	if err := (NFSOptions{Extra: []string{"timeo=50", "retrans=3", "rsize=65536", "actimeo=30", "nocto"}}).Validate(); err != nil {
		t.Errorf("tuning options refused: %v", err)
	}
}
