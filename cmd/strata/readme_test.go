package main

import (
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/strata-nix/strata/builder"
	"github.com/strata-nix/strata/config"
	"github.com/strata-nix/strata/server"
)

// TestReadmePlainSystemdConfigs loads the server.yaml and builder.yaml that
// README's "Plain systemd" recipe writes with printf, as the daemons load
// them, and checks that the builder, on another host, can reach the server's
// API: the server listens on a non-loopback address at the port the
// builder's server.api names.
func TestReadmePlainSystemdConfigs(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(`(?m)^printf '([^']*)' > /etc/strata/(server|builder)\.yaml$`)
	files := map[string]string{}
	for _, m := range re.FindAllStringSubmatch(string(readme), -1) {
		if _, dup := files[m[2]]; dup {
			t.Fatalf("README writes /etc/strata/%s.yaml twice with printf", m[2])
		}
		path := filepath.Join(t.TempDir(), m[2]+".yaml")
		if err := os.WriteFile(path, []byte(strings.ReplaceAll(m[1], `\n`, "\n")), 0o600); err != nil {
			t.Fatal(err)
		}
		files[m[2]] = path
	}
	if files["server"] == "" || files["builder"] == "" {
		t.Fatalf("README's plain systemd recipe: want a printf to /etc/strata/server.yaml and one to /etc/strata/builder.yaml, found %v", files)
	}

	sv, err := config.New(server.Keys).Load(files["server"], true)
	if err != nil {
		t.Fatalf("README's server.yaml: %v", err)
	}
	sc, err := server.ConfigFrom(sv)
	if err != nil {
		t.Fatalf("README's server.yaml: %v", err)
	}
	bv, err := config.New(builder.Keys).Load(files["builder"], true)
	if err != nil {
		t.Fatalf("README's builder.yaml: %v", err)
	}
	bc, err := builder.ConfigFrom(bv)
	if err != nil {
		t.Fatalf("README's builder.yaml: %v", err)
	}

	host, port, err := config.HostPort(sc.APIListen)
	if err != nil {
		t.Fatalf("README's server.yaml: api.listen %q: %v", sc.APIListen, err)
	}
	if ip := net.ParseIP(host); host == "localhost" || (ip != nil && ip.IsLoopback()) {
		t.Errorf("README's server.yaml: api.listen is %s (loopback), but its builder.yaml points builders on other hosts at %s", sc.APIListen, bc.ServerAPI)
	}
	u, err := url.Parse(bc.ServerAPI)
	if err != nil {
		t.Fatalf("README's builder.yaml: server.api %q: %v", bc.ServerAPI, err)
	}
	if u.Port() != "" && u.Port() != strconv.Itoa(port) {
		t.Errorf("README's builder.yaml: server.api %s, but the server's api.listen is %s", bc.ServerAPI, sc.APIListen)
	}
}

// TestAnsibleExamplesFindTheBinary checks the strata_binary of README's
// Ansible recipe and of ansible/inventory.example.ini names the repository's
// bin/strata as Ansible resolves it: the roles copy it with
// ansible.builtin.copy, which looks for a relative src in the role's dirs
// and the playbook's directory (ansible/playbooks), never in the shell's
// working directory (both said bin/strata or ../bin/strata, which Ansible
// could not find: "Could not find or access").
func TestAnsibleExamplesFindTheBinary(t *testing.T) {
	repo, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	want := filepath.Join(repo, "bin", "strata")
	playbookDir := filepath.Join(repo, "ansible", "playbooks")
	re := regexp.MustCompile(`(?m)^strata_binary=(.*)$`)
	for _, f := range []struct{ file, pwd string }{
		// README's recipe runs from the repository (make build, then
		// ln -s "$PWD/ansible").
		{"README.md", repo},
		{"ansible/inventory.example.ini", ""},
	} {
		b, err := os.ReadFile(filepath.Join(repo, f.file))
		if err != nil {
			t.Fatal(err)
		}
		ms := re.FindAllStringSubmatch(string(b), -1)
		if len(ms) != 1 {
			t.Fatalf("%s: %d strata_binary= lines, want 1", f.file, len(ms))
		}
		v := strings.TrimSpace(ms[0][1])
		if f.pwd != "" {
			v = strings.ReplaceAll(v, "$PWD", f.pwd)
		}
		got := v
		if !filepath.IsAbs(got) {
			got = filepath.Join(playbookDir, got)
		}
		if got != want {
			t.Errorf("%s: strata_binary=%s is %s for Ansible (relative to %s), want %s", f.file, ms[0][1], got, playbookDir, want)
		}
	}
}
