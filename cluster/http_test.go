package cluster

import (
	"encoding/base64"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/apiserve"
)

// TestKeyRotationThroughAPI rotates the keys of two running members through
// their HTTP API, as `strata cluster keys` does: both stay alive, each
// keyring file is rewritten (mode 0600) so a restart keeps the rotation,
// and bad requests are refused with a reason.
func TestKeyRotationThroughAPI(t *testing.T) {
	k1, k2 := key(t), key(t)
	b64 := base64.StdEncoding.EncodeToString
	var nodes []testNode
	var clients []*api.Client
	var files, urls []string
	for i, name := range []string{"s", "b"} {
		f := filepath.Join(t.TempDir(), "cluster.keys")
		os.WriteFile(f, []byte(b64(k1)+"\n"), 0o600)
		kr, err := LoadKeyring("cluster.keyring_file", f)
		if err != nil {
			t.Fatal(err)
		}
		var join []string
		if i > 0 {
			join = []string{nodes[0].Addr()}
		}
		n := mustNode(t, name, RoleServer, kr, join...)
		mux := http.NewServeMux()
		n.Routes(mux, apiserve.NewToken("secret"))
		srv := httptest.NewServer(mux)
		t.Cleanup(srv.Close)
		nodes, files = append(nodes, n), append(files, f)
		clients = append(clients, api.NewClient(srv.URL, "secret"))
		urls = append(urls, srv.URL)
	}
	waitFor(t, 5*time.Second, "b to join s", func() bool { return memberState(nodes[0].Node, "b") == "alive" })
	ctx := t.Context()
	for _, step := range []struct{ op, key string }{{"install", b64(k2)}, {"use", b64(k2)}, {"remove", b64(k1)}} {
		for i, c := range clients {
			var out KeyList
			if err := c.Send(ctx, http.MethodPost, "/v1/cluster/keys/"+step.op, KeyRequest{Key: step.key}, &out); err != nil {
				t.Fatalf("%s on %s: %v", step.op, nodes[i].Name(), err)
			}
		}
		time.Sleep(time.Second)
		for _, n := range nodes {
			for _, m := range n.Members() {
				if m.State != StateAlive {
					t.Fatalf("after %s: %s sees %s %s", step.op, n.Name(), m.Name, m.State)
				}
			}
		}
	}
	for i, f := range files {
		fi, _ := os.Stat(f)
		b, _ := os.ReadFile(f)
		if fi.Mode().Perm() != 0o600 || !strings.Contains(string(b), b64(k2)) || strings.Contains(string(b), b64(k1)) {
			t.Fatalf("%s's keyring file after rotation: mode %v\n%s", nodes[i].Name(), fi.Mode(), b)
		}
		kr, err := LoadKeyring("cluster.keyring_file", f)
		if err != nil || len(kr.List()) != 1 || kr.List()[0].Fingerprint != Fingerprint(k2) {
			t.Fatalf("reloading %s's keyring: %v %+v", nodes[i].Name(), err, kr)
		}
	}
	var list KeyList
	if err := clients[0].Do(ctx, http.MethodGet, "/v1/cluster/keys", &list); err != nil || !list.Encrypted ||
		len(list.Keys) != 1 || !list.Keys[0].Primary || list.Keys[0].Fingerprint != Fingerprint(k2) {
		t.Fatalf("key list: %+v %v", list, err)
	}
	for _, bad := range []struct{ op, key, want string }{
		{"use", b64(k1), "not installed"},
		{"remove", b64(k2), "primary"},
		{"install", "bm90IGEga2V5", "want 32"},
		{"rotate", b64(k2), "want install, use or remove"},
	} {
		err := clients[0].Send(ctx, http.MethodPost, "/v1/cluster/keys/"+bad.op, KeyRequest{Key: bad.key}, nil)
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%s %s: %v, want an error with %q", bad.op, bad.key, err, bad.want)
		}
	}
	if err := api.NewClient(urls[0], "").Send(ctx, http.MethodPost, "/v1/cluster/keys/install", KeyRequest{Key: b64(k1)}, nil); err == nil {
		t.Error("a keyring change without the token was accepted")
	}
}

// A daemon without gossip answers the member API's paths saying gossip is
// off and how to turn it on (a new operator ran strata members on a server
// without cluster.* and got "404 page not found", as for a wrong URL).
func TestOffRoutesSayGossipIsOff(t *testing.T) {
	mux := http.NewServeMux()
	OffRoutes(mux)
	srv := httptest.NewServer(mux)
	defer srv.Close()
	c := api.NewClient(srv.URL, "")
	for _, call := range []struct{ method, path string }{
		{http.MethodGet, "/v1/members"},
		{http.MethodGet, "/v1/cluster/keys"},
		{http.MethodPost, "/v1/cluster/keys/install"},
	} {
		err := c.Do(t.Context(), call.method, call.path, nil)
		if err == nil || !strings.Contains(err.Error(), "gossip is off on this daemon") || !strings.Contains(err.Error(), "set cluster.bind or cluster.join") || !strings.Contains(err.Error(), "404") {
			t.Errorf("%s %s without gossip: %v, want 404 saying gossip is off and how to turn it on", call.method, call.path, err)
		}
	}
}
