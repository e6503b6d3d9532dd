package cluster

import (
	"encoding/base64"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/apiserve"
)

// writeKeys writes a keyring file of keys (mode 0600) and loads it.
func writeKeys(t *testing.T, file string, keys ...[]byte) *Keyring {
	t.Helper()
	var b strings.Builder
	for _, k := range keys {
		b.WriteString(base64.StdEncoding.EncodeToString(k) + "\n")
	}
	if err := os.WriteFile(file, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	kr, err := LoadKeyring("cluster.keyring_file", file)
	if err != nil {
		t.Fatal(err)
	}
	return kr
}

// fingerprints is the keyring's keys as "fp*" (primary) and "fp".
func fingerprints(kr *Keyring) string {
	var out []string
	for _, k := range kr.List() {
		if k.Primary {
			out = append(out, k.Fingerprint+"*")
		} else {
			out = append(out, k.Fingerprint)
		}
	}
	return strings.Join(out, " ")
}

// A keyring that is a systemd credential (the shipped units load
// cluster.keys with LoadCredential=: a read-only copy in
// $CREDENTIALS_DIRECTORY, made at each start) refuses install, use and
// remove before changing anything, naming the file and what to do; the
// API answers 409. Before, the change was applied in memory and the write
// failed, so the running member used a keyring a restart silently reverted.
func TestKeyringCredentialRefused(t *testing.T) {
	k1, k2 := key(t), key(t)
	creds := t.TempDir()
	t.Setenv("CREDENTIALS_DIRECTORY", creds)
	file := filepath.Join(creds, "strata_cluster.keys")
	kr := writeKeys(t, file, k1, k2)
	os.Chmod(file, 0o400)
	os.Chmod(creds, 0o500)
	t.Cleanup(func() { os.Chmod(creds, 0o700) })
	before, _ := os.ReadFile(file)
	want := fingerprints(kr)
	for _, op := range []struct {
		name string
		f    func() error
	}{
		{"install", func() error { return kr.Install(key(t)) }},
		{"use", func() error { return kr.Use(k2) }},
		{"remove", func() error { return kr.Remove(k2) }},
	} {
		err := op.f()
		if err == nil || !errors.Is(err, ErrKeyringReadOnly) {
			t.Fatalf("%s on a credential keyring: %v, want ErrKeyringReadOnly", op.name, err)
		}
		for _, s := range []string{"keyring " + op.name, file, "systemd credential", "nothing changed", "/etc/strata/credentials/cluster.keys", "restart"} {
			if !strings.Contains(err.Error(), s) {
				t.Errorf("%s: error %q does not say %q", op.name, err, s)
			}
		}
		if got := fingerprints(kr); got != want {
			t.Fatalf("%s refused but the keyring in use changed: %s, was %s", op.name, got, want)
		}
	}
	if after, _ := os.ReadFile(file); string(after) != string(before) {
		t.Fatalf("credential file changed:\n%s", after)
	}

	// Through the daemon's API, as `strata cluster keys use` sends it.
	n := mustNode(t, "s", RoleServer, kr)
	mux := http.NewServeMux()
	n.Routes(mux, apiserve.NewToken("secret"))
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	err := api.NewClient(srv.URL, "secret").Send(t.Context(), http.MethodPost, "/v1/cluster/keys/use",
		KeyRequest{Key: base64.StdEncoding.EncodeToString(k2)}, nil)
	if err == nil || !strings.Contains(err.Error(), "409") || !strings.Contains(err.Error(), file) {
		t.Fatalf("use over the API on a credential keyring: %v, want HTTP 409 naming %s", err, file)
	}
	if got := fingerprints(kr); got != want {
		t.Fatalf("API use refused but the keyring in use changed: %s, was %s", got, want)
	}
}

// A keyring file the daemon cannot write (here its directory is gone; under
// the server's unit, /etc is read-only) refuses the change with nothing
// changed in memory; a writable one keeps every change for the next load.
func TestKeyringWriteFailureChangesNothing(t *testing.T) {
	k1, k2 := key(t), key(t)
	dir := filepath.Join(t.TempDir(), "etc")
	os.Mkdir(dir, 0o700)
	file := filepath.Join(dir, "cluster.keys")
	kr := writeKeys(t, file, k1)
	os.RemoveAll(dir)
	want := fingerprints(kr)
	err := kr.Install(k2)
	if err == nil || !errors.Is(err, ErrKeyringReadOnly) || !strings.Contains(err.Error(), file) || !strings.Contains(err.Error(), "nothing changed") {
		t.Fatalf("install with an unwritable keyring file: %v", err)
	}
	if got := fingerprints(kr); got != want {
		t.Fatalf("install refused but the keyring in use changed: %s, was %s", got, want)
	}

	os.Mkdir(dir, 0o700)
	kr = writeKeys(t, file, k1)
	for _, f := range []func() error{func() error { return kr.Install(k2) }, func() error { return kr.Use(k2) }} {
		if err := f(); err != nil {
			t.Fatal(err)
		}
	}
	// Installing an installed key changes nothing and writes nothing.
	fi1, _ := os.Stat(file)
	if err := kr.Install(k1); err != nil {
		t.Fatal(err)
	}
	fi2, _ := os.Stat(file)
	if !os.SameFile(fi1, fi2) {
		t.Error("a no-op install rewrote the keyring file")
	}
	again, err := LoadKeyring("cluster.keyring_file", file)
	if err != nil || fingerprints(again) != fingerprints(kr) || fingerprints(kr) != Fingerprint(k2)+"* "+Fingerprint(k1) {
		t.Fatalf("keyring file after install and use: %v %q, in use %q", err, fingerprints(again), fingerprints(kr))
	}
}
