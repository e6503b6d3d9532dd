package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/strata-nix/strata/api"
)

// TestMain runs the real main when re-executed by a test.
func TestMain(m *testing.M) {
	if os.Getenv("STRATA_TEST_RUN_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	if os.Getenv(gossipMemberEnv) != "" {
		os.Exit(gossipMember())
	}
	os.Exit(m.Run())
}

func runStrata(t *testing.T, env []string, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(append(os.Environ(), "STRATA_TEST_RUN_MAIN=1"), env...)
	out, err := cmd.CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return string(out), code
}

func TestServerRefusesBadConfigAndStartsNothing(t *testing.T) {
	dir := t.TempDir()
	// A free port: if the server started anything, it would bind it.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().String()
	l.Close()
	state := filepath.Join(dir, "state")
	cases := map[string]struct {
		yaml string
		env  []string
		args []string
		want string
	}{
		"unknown key":      {"store:\n  roots: /nix\n", nil, nil, `unknown key "store.roots"`},
		"wrong type":       {"retention:\n  keep: many\n", nil, nil, `"retention.keep"`},
		"missing zfs ds":   {"snapshot:\n  backend: zfs\n", nil, nil, `missing required key "snapshot.dataset"`},
		"bad env":          {"", []string{"STRATA_PUBLISH_INTERVAL=soon"}, nil, "STRATA_PUBLISH_INTERVAL"},
		"bad flag":         {"", nil, []string{"--nfs-allow=300.1.2.3/8"}, `"nfs.allow"`},
		"empty allow file": {"nfs:\n  allow: []\n", nil, nil, `"nfs.allow"`},
		"empty allow env":  {"", []string{"STRATA_NFS_ALLOW="}, nil, `"nfs.allow"`},
		"comma allow env":  {"", []string{"STRATA_NFS_ALLOW=,"}, nil, `"nfs.allow"`},
		"empty allow flag": {"", nil, []string{"--nfs-allow="}, `"nfs.allow"`},
		// btrfs has no default snapshot dir: the start and --check-config
		// both name the key.
		"no snapshot dir":     {"", []string{"STRATA_SNAPSHOT_SNAPSHOT_DIR="}, nil, `missing required key "snapshot.snapshot_dir"`},
		"snapshot dir inside": {"", []string{"STRATA_SNAPSHOT_SNAPSHOT_DIR=/nix/.strata"}, nil, `key "snapshot.snapshot_dir" (from env STRATA_SNAPSHOT_SNAPSHOT_DIR): value "/nix/.strata": want a directory outside store.root /nix`},
		// Review 19 #2: a port that is not a number was accepted until the
		// listen at start.
		"nfs.listen port":    {"", []string{"STRATA_NFS_LISTEN=:2049x"}, nil, `key "nfs.listen" (from env STRATA_NFS_LISTEN): value ":2049x": want host:port with a numeric port`},
		"api.listen port":    {"", nil, []string{"--api-listen=127.0.0.1:7480x"}, `key "api.listen" (from flag --api-listen): value "127.0.0.1:7480x": want host:port with a numeric port`},
		"replica.of with v1": {"replica:\n  of: http://primary:7480/v1\n", nil, nil, `key "replica.of" (from file): value "http://primary:7480/v1": want the API URL without the API's own /v1 path, such as http://primary:7480: drop the /v1`},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			f := filepath.Join(dir, strings.ReplaceAll(name, " ", "-")+".yaml")
			os.WriteFile(f, []byte(tc.yaml+"state_dir: "+state+"\napi:\n  listen: "+port+"\n"), 0o644)
			env := append([]string{"STRATA_SNAPSHOT_SNAPSHOT_DIR=" + filepath.Join(dir, "snaps")}, tc.env...)
			for _, check := range [][]string{nil, {"--check-config"}} {
				out, code := runStrata(t, env, append(append([]string{"server", "--config", f}, tc.args...), check...)...)
				if code != 2 || !strings.Contains(out, tc.want) || (strings.Contains(name, "allow") && !strings.Contains(out, "0.0.0.0/0")) {
					t.Fatalf("%v: exit %d, output %q; want exit 2 and %q", check, code, out, tc.want)
				}
			}
			if _, err := os.Stat(state); !os.IsNotExist(err) {
				t.Fatalf("state dir was created: %v", err)
			}
		})
	}
	if _, code := runStrata(t, nil, "server", "--config", filepath.Join(dir, "missing.yaml")); code != 2 {
		t.Fatalf("missing --config file: exit %d, want 2", code)
	}
}

// A replica whose replica.token_file is missing, or a token file others
// may read, is a configuration error: exit 2, as a bad key (the unit's
// RestartPreventExitStatus=2 then does not restart into it every 5 s).
func TestServerSecretFileExit2(t *testing.T) {
	dir := t.TempDir()
	open := filepath.Join(dir, "api-token")
	os.WriteFile(open, []byte("tok\n"), 0o644)
	for name, tc := range map[string]struct{ yaml, want string }{
		"replica token missing": {"replica:\n  of: http://127.0.0.1:1\n  token_file: " + filepath.Join(dir, "none") + "\n",
			"replica.token_file " + filepath.Join(dir, "none") + " is missing or empty"},
		"api token readable by others": {"api:\n  token_file: " + open + "\n", "has mode 0644"},
	} {
		t.Run(name, func(t *testing.T) {
			f := filepath.Join(dir, strings.ReplaceAll(name, " ", "-")+".yaml")
			os.WriteFile(f, []byte(tc.yaml+"state_dir: "+filepath.Join(dir, "state")+"\nsnapshot:\n  snapshot_dir: "+filepath.Join(dir, "snaps")+"\n"), 0o644)
			out, code := runStrata(t, []string{"STRATA_API_LISTEN=", "STRATA_NFS_LISTEN="}, "server", "--config", f)
			if code != 2 || !strings.Contains(out, tc.want) {
				t.Fatalf("exit %d, output %q; want exit 2 and %q", code, out, tc.want)
			}
		})
	}
}

func TestVersionAndHelp(t *testing.T) {
	out, code := runStrata(t, nil, "version")
	if code != 0 || !strings.HasPrefix(out, "strata ") {
		t.Fatalf("version: %d %q", code, out)
	}
	out, code = runStrata(t, nil, "server", "--help")
	for _, flag := range []string{"--config", "--store-root", "--nfs-allow", "--retention-keep", "STRATA_NFS_LISTEN"} {
		if code != 0 || !strings.Contains(out, flag) {
			t.Errorf("server --help lacks %s", flag)
		}
	}
	if out, code := runStrata(t, nil, "pin", "zero"); code != 2 || !strings.Contains(out, `"zero"`) {
		t.Errorf("pin zero: %d %q", code, out)
	}
	// A mistyped flag of a daemon is a usage error like a bad key (the
	// units do not restart on exit 2).
	for _, d := range []string{"server", "builder"} {
		if out, code := runStrata(t, nil, d, "--nfs-alow=10.0.0.0/8"); code != 2 || !strings.Contains(out, "unknown flag: --nfs-alow") {
			t.Errorf("%s --nfs-alow: exit %d %q, want exit 2 naming the flag", d, code, out)
		}
	}
}

// Review 19 #6: a --token-file (or STRATA_API_TOKEN_FILE) that cannot be
// read was ignored: the call went out without a token and was refused
// for that, or, on the socket, went through. It is an error naming the
// file, before any call.
func TestUnreadableTokenFileRefused(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "api-tokn")
	for _, tc := range []struct {
		env        []string
		args       []string
		file, from string
	}{
		{nil, []string{"--token-file", missing}, missing, "--token-file"},
		{[]string{"STRATA_API_TOKEN_FILE=" + missing}, nil, missing, "STRATA_API_TOKEN_FILE"},
		{nil, []string{"--token-file", dir}, dir, "--token-file"}, // a directory
	} {
		for _, cmd := range [][]string{{"publish"}, {"pin", "1"}, {"generations"}, {"members"}, {"cluster", "keys"}} {
			// The socket needs no token: the error must come anyway.
			args := append(append(slices.Clone(cmd), "--api", "unix:"+filepath.Join(dir, "api.sock")), tc.args...)
			out, code := runStrata(t, tc.env, args...)
			want := "read token file " + tc.file + " (" + tc.from + ")"
			if code == 0 || !strings.Contains(out, want) || strings.Contains(out, "api.sock") {
				t.Errorf("%v %v: exit %d, want a refusal %q before any call:\n%s", tc.env, args, code, want, out)
			}
		}
	}
	// The default file is read only if it can be: no error without one.
	if out, _ := runStrata(t, nil, "generations", "--api", "unix:"+filepath.Join(dir, "api.sock")); strings.Contains(out, "token file") {
		t.Errorf("no token file given: %s", out)
	}
}

// Review 19 #3, for the CLI: --api (or STRATA_API) with the API's own /v1
// would call /v1/v1/...; refused before any call (exit 2), saying to drop it.
func TestAPIURLWithV1Refused(t *testing.T) {
	for _, tc := range []struct {
		env  []string
		args []string
		from string
	}{
		{nil, []string{"--api", "http://127.0.0.1:1/v1"}, "--api"},
		{[]string{"STRATA_API=http://127.0.0.1:1/strata/v1/"}, nil, "STRATA_API"},
	} {
		out, code := runStrata(t, tc.env, append([]string{"generations"}, tc.args...)...)
		if code != 2 || !strings.Contains(out, tc.from+` "http://127.0.0.1:1/`) || !strings.Contains(out, "drop the /v1") || strings.Contains(out, "connection refused") {
			t.Errorf("%v %v: exit %d, want 2 naming %s and saying to drop the /v1:\n%s", tc.env, tc.args, code, tc.from, out)
		}
	}
}

// A replica's status says which primary it pulls from, each problem the
// server reports is a line of its own, and the cluster line says while the
// builders' holds are not known yet (a new operator read a replica's status
// without its primary, two problems ran together in one "[...]", and
// "retention waits: ... gossip settling" came with no time).
func TestPrintStatusReplicaAndProblems(t *testing.T) {
	st := map[string]any{"role": "replica", "replica_of": "http://central:7480", "latest": 3.0,
		"cluster":        map[string]any{"name": "strata", "member": "r1", "address": "10.0.0.2:7946", "members": 3.0, "settling_for": "12s"},
		"problems":       []any{"snapshot strata-4 is kept but not served: received by hand?", "store.root is another Nix store: fix store.root"},
		"retention_keep": 3.0, "retention_waits": []any{}}
	var b strings.Builder
	if err := printStatus(&b, st); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"replica_of:  http://central:7480\n", "cluster:     strata as r1 at 10.0.0.2:7946, 3 members known; builders' holds known in 12s at most\n", "problem:     snapshot strata-4 is kept but not served: received by hand?\n", "problem:     store.root is another Nix store: fix store.root\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "[") {
		t.Errorf("status prints a list as one value:\n%s", out)
	}
}

// A command refused for want of a token says how to give one, and one that
// found no daemon at the fallback address says where it looked; an error
// the caller's choice explains already gets no hint.
func TestClientHint(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		w.Write([]byte(`{"error":"mutating call refused: no bearer token sent"}`))
	}))
	defer srv.Close()
	empty := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	out, code := runStrata(t, []string{"STRATA_API_TOKEN_FILE=" + empty}, "publish", "--api", srv.URL)
	if code != 1 || !strings.Contains(out, "this command sent no token: the token file "+empty+" (STRATA_API_TOKEN_FILE) is empty") {
		t.Errorf("publish with an empty token file: exit %d\n%s", code, out)
	}
	tok := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tok, []byte("wrong\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, code = runStrata(t, nil, "publish", "--api", srv.URL, "--token-file", tok)
	if code != 1 || strings.Contains(out, "sent no token") {
		t.Errorf("publish with a token: exit %d, want no hint\n%s", code, out)
	}

	// A mistyped STRATA_API_TOKEN_FILE is named, with the name meant (before,
	// it was ignored without a word and only "sent no token" showed).
	typo := "STRATA_" + "API_TOKN_FILE" // split: TestEnvNamesKnown lists every name written whole
	out, code = runStrata(t, []string{typo + "=" + tok}, "publish", "--api", srv.URL)
	if code != 1 || !strings.Contains(out, "strata: warning: unknown environment variable "+typo+": did you mean STRATA_API_TOKEN_FILE") || !strings.Contains(out, "this command sent no token") {
		t.Errorf("publish with %s set: exit %d, want a warning naming it and STRATA_API_TOKEN_FILE\n%s", typo, code, out)
	}

	unauth := &api.StatusError{Code: http.StatusUnauthorized, Status: "401 Unauthorized"}
	if h := hint(fmt.Errorf("POST /v1/publish: %w", unauth), clientUse{addr: "h:1"}); !strings.Contains(h, "give --token-file FILE") {
		t.Errorf("401 without a token: hint %q", h)
	}
	dial := &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connection refused")}
	if h := hint(fmt.Errorf("GET /v1/status: %w", dial), clientUse{addr: "127.0.0.1:7480", defaulted: true}); !strings.Contains(h, "no daemon found: neither "+defaultSockets[0]) || !strings.Contains(h, "--api") {
		t.Errorf("nothing at the fallback address: hint %q", h)
	}
	if h := hint(fmt.Errorf("GET /v1/status: %w", dial), clientUse{addr: "h:1"}); h != "" {
		t.Errorf("nothing at an address given: hint %q, want none", h)
	}
}

// `strata generations` on a replica names its primary and has the ARRIVED
// column also when no generation has an arrival time: a replica whose
// state_dir was lost rebuilds its generations from their snapshots without
// one (a new user saw the primary's table there), and a new replica has
// none yet.
func TestGenerationsOnReplicaWithoutArrival(t *testing.T) {
	list := api.GenerationList{Role: "replica", ReplicaOf: "http://central:7480",
		Generations: []api.Generation{{ID: 21, Origin: "http://central:7480", MountPath: "/gen/21"}}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(list)
	}))
	defer srv.Close()
	out, code := runStrata(t, nil, "generations", "--api", srv.URL)
	if code != 0 || !strings.HasPrefix(out, "replica of http://central:7480\n") || !strings.Contains(out, "ARRIVED") {
		t.Errorf("generations on a replica with rebuilt generations: exit %d\n%s", code, out)
	}
	list.Generations = nil
	out, code = runStrata(t, nil, "generations", "--api", srv.URL)
	if code != 0 || !strings.HasPrefix(out, "replica of http://central:7480\n") {
		t.Errorf("generations on a new replica: exit %d\n%s", code, out)
	}
}
