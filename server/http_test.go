package server

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/apiserve"
	"github.com/strata-nix/strata/snapshot"
)

// emptyBackend has no snapshots; enough for API routing and auth tests.
type emptyBackend struct{}

func (emptyBackend) Kind() string { return "fake" }
func (emptyBackend) Create(context.Context, uint64, snapshot.Labels) (snapshot.Snapshot, error) {
	return snapshot.Snapshot{}, snapshot.ErrUnsupported
}
func (emptyBackend) SetLabels(context.Context, uint64, snapshot.Labels) error {
	return snapshot.ErrNotFound
}
func (emptyBackend) List(context.Context) ([]snapshot.Snapshot, error) { return nil, nil }
func (emptyBackend) Destroy(context.Context, uint64) error             { return snapshot.ErrNotFound }

func newTestAPI(t *testing.T) (tcp *httptest.Server, sock string) {
	t.Helper()
	dir := t.TempDir()
	cfg := Config{StoreRoot: filepath.Join(dir, "root"), StoreDir: "/nix/store", StateDir: filepath.Join(dir, "state"), Keep: 1}
	s, err := New(context.Background(), Options{Config: cfg, Backend: emptyBackend{}})
	if err != nil {
		t.Fatal(err)
	}
	h := s.Handler(apiserve.NewToken("s3cret"), nil, func() any { return map[string]any{"role": "server"} })
	tcp = httptest.NewServer(h)
	t.Cleanup(tcp.Close)
	sock = filepath.Join(dir, "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: h, ConnContext: apiserve.SocketConnContext}
	go hs.Serve(l)
	t.Cleanup(func() { hs.Close() })
	return tcp, sock
}

func TestAPIMutatingCallsNeedTokenOrSocket(t *testing.T) {
	tcp, sock := newTestAPI(t)
	ctx := context.Background()
	// Pin of an unknown generation: 401 without a token, 404 once authorised.
	for _, tc := range []struct {
		name   string
		client *api.Client
		want   string
	}{
		{"tcp without token", api.NewClient(tcp.URL, ""), "401"},
		{"tcp with wrong token", api.NewClient(tcp.URL, "guess"), "401"},
		{"tcp with token", api.NewClient(tcp.URL, "s3cret"), "404"},
		{"unix socket", api.NewClient("unix:"+sock, ""), "404"},
	} {
		_, err := tc.client.Pin(ctx, 7, "x")
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: pin error %v, want %s", tc.name, err, tc.want)
		}
		// GET /v1/token: whether the token would be accepted, nothing else.
		err = tc.client.CheckToken(ctx)
		if ok := tc.want == "404"; ok != (err == nil) || (!ok && !strings.Contains(err.Error(), "401")) {
			t.Errorf("%s: token check %v, want accepted: %v", tc.name, err, ok)
		}
	}
	// Reads need no token.
	l, err := api.NewClient(tcp.URL, "").Generations(ctx)
	if err != nil || len(l.Generations) != 0 {
		t.Fatalf("generations: %+v %v", l, err)
	}
	// Builders refuse generations of another store dir (review 19 #1).
	if l.StoreDir != "/nix/store" {
		t.Errorf("generations: store_dir %q, want store.dir /nix/store", l.StoreDir)
	}
}

func TestAPIBadInput(t *testing.T) {
	tcp, _ := newTestAPI(t)
	for path, want := range map[string]int{
		"/v1/generations/abc":            http.StatusBadRequest,
		"/v1/generations/0":              http.StatusBadRequest,
		"/v1/generations/9":              http.StatusNotFound,
		"/v1/generations/9/registration": http.StatusNotFound,
		"/v1/generations/9/delta?from=x": http.StatusBadRequest,
		"/v1/generations/9/delta?from=1": http.StatusNotFound,
		"/healthz":                       http.StatusOK,
	} {
		resp, err := http.Get(tcp.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("GET %s: %d, want %d", path, resp.StatusCode, want)
		}
	}
}

// Review 19 #8: a pin name a snapshot label cannot hold answered 500. It
// is bad input: 400, naming the rule, whether or not the generation exists
// (TestServerDaemon pins a live one).
func TestAPIBadPinName(t *testing.T) {
	_, sock := newTestAPI(t)
	c := api.NewClient("unix:"+sock, "")
	for _, name := range []string{"two\nlines", "tab\there", "nul\x00", "\xff\xfe", strings.Repeat("x", snapshot.MaxLabelValue+1)} {
		_, err := c.Pin(context.Background(), 9, name)
		var se *api.StatusError
		if !errors.As(err, &se) || se.Code != http.StatusBadRequest || !strings.Contains(se.Message, "bad pin name") ||
			!strings.Contains(se.Message, "want at most 1024 bytes of UTF-8 without NUL, newline or tab") {
			t.Errorf("pin with name %.40q: %v, want 400 naming the rule", name, err)
		}
	}
	// A good name reaches the generation lookup.
	if _, err := c.Pin(context.Background(), 9, "golden 2026"); err == nil || !strings.Contains(err.Error(), "404") {
		t.Errorf("pin of an unknown generation with a good name: %v, want 404", err)
	}
}

// GET /v1/nfs/access answers for the caller's address with the guard's
// rule: in nfs.allow (an empty list admits no one: the guard fails closed),
// and only while the export is on.
func TestNFSAccess(t *testing.T) {
	s := &Server{}
	for _, tc := range []struct {
		listen, remote string
		allow          []string
		want           bool
		addr           string
	}{
		{"0.0.0.0:2049", "127.0.0.1:5555", []string{"127.0.0.0/8"}, true, "127.0.0.1"},
		{"0.0.0.0:2049", "10.0.2.15:5555", []string{"127.0.0.0/8"}, false, "10.0.2.15"},
		{"0.0.0.0:2049", "[::ffff:10.1.2.3]:5555", []string{"10.1.0.0/16"}, true, "10.1.2.3"},
		{"0.0.0.0:2049", "[fd00::1]:5555", nil, false, "fd00::1"},
		{"0.0.0.0:2049", "[fd00::1]:5555", []string{"0.0.0.0/0", "::/0"}, true, "fd00::1"},
		{"", "127.0.0.1:5555", []string{"127.0.0.0/8"}, false, "127.0.0.1"},
		{"0.0.0.0:2049", "@", []string{"127.0.0.0/8"}, false, ""},
	} {
		s.cfg.NFSListen, s.cfg.NFSAllow = tc.listen, nil
		for _, a := range tc.allow {
			s.cfg.NFSAllow = append(s.cfg.NFSAllow, netip.MustParsePrefix(a))
		}
		got := s.nfsAccess(tc.remote)
		if got.Allowed != tc.want || got.Address != tc.addr || len(got.Allow) != len(tc.allow) {
			t.Errorf("listen %q remote %q allow %v: %+v, want allowed=%v address %q", tc.listen, tc.remote, tc.allow, got, tc.want, tc.addr)
		}
	}
	// Through the API.
	tcp, _ := newTestAPI(t)
	a, err := api.NewClient(tcp.URL, "").NFSAccess(context.Background())
	if err != nil || a.Address != "127.0.0.1" {
		t.Fatalf("GET /v1/nfs/access: %+v %v", a, err)
	}
}

// A publish the server's configuration refuses (a replica; store.root at
// another store) answers 409, not 500: nothing failed, and the message
// says what to change.
func TestAPIPublishRefusedIsConflict(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{StoreRoot: filepath.Join(dir, "root"), StoreDir: "/nix/store", StateDir: filepath.Join(dir, "state"), Keep: 1, ReplicaOf: "http://primary:7480"}
	s, err := New(context.Background(), Options{Config: cfg, Backend: emptyBackend{}})
	if err != nil {
		t.Fatal(err)
	}
	tcp := httptest.NewServer(s.Handler(apiserve.NewToken("s3cret"), nil, func() any { return nil }))
	defer tcp.Close()
	_, err = api.NewClient(tcp.URL, "s3cret").Publish(context.Background())
	var se *api.StatusError
	if !errors.As(err, &se) || se.Code != http.StatusConflict || !strings.Contains(se.Message, "publish on the primary") {
		t.Fatalf("publish on a replica: %v, want 409 saying to publish on the primary", err)
	}
}
