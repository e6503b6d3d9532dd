// Package nixtest makes real Nix stores for tests with Debian's nix-bin: a
// chroot store at ROOT (ROOT/nix/store, ROOT/nix/var/nix/db) filled with
// `nix-store --add` and `nix-build --store ROOT`, so there are derivers and
// references, with no network and no daemon.
package nixtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/strata-nix/strata/internal/testenv"
)

// Store is a chroot Nix store at Root; its central-store root (holding
// store/ and var/nix/db/) is Root/nix.
type Store struct {
	Root string
}

// NixRoot is the central-store root: the directory holding store/ and
// var/nix/db/.
func (s Store) NixRoot() string { return filepath.Join(s.Root, "nix") }

// Options common to every nix command on a chroot store without network,
// daemon or build users.
func (s Store) opts() []string {
	return []string{"--store", s.Root,
		"--option", "build-users-group", "",
		"--option", "substituters", "",
	}
}

// Command returns a nix-store (or other nix tool) command on this store.
func (s Store) Command(tool string, args ...string) *exec.Cmd {
	all := append(s.opts(), args...)
	cmd := exec.Command(tool, all...)
	cmd.Env = append(os.Environ(), "NIX_CONFIG=", "PAGER=cat")
	return cmd
}

func (s Store) run(t testing.TB, tool string, args ...string) string {
	t.Helper()
	cmd := s.Command(tool, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", tool, strings.Join(args, " "), err, stderr.String())
	}
	return strings.TrimSpace(string(out))
}

// New makes an empty chroot store under root (created if missing).
func New(t testing.TB, root string) Store {
	t.Helper()
	testenv.RequireCommands(t, "nix-store", "nix-build", "busybox")
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	s := Store{Root: root}
	// Any query initialises the store's directories and database.
	s.run(t, "nix-store", "--dump-db")
	return s
}

// AddTree writes files (relative path -> content; a content starting with
// "->" makes a symlink to the rest, a path ending in "*" is made executable
// with the star dropped) into a fresh directory called name and adds it with
// nix-store --add. It returns the store path.
func (s Store) AddTree(t testing.TB, name string, files map[string]string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), name)
	for rel, content := range files {
		mode := os.FileMode(0o644)
		if strings.HasSuffix(rel, "*") {
			rel, mode = strings.TrimSuffix(rel, "*"), 0o755
		}
		p := filepath.Join(dir, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if target, ok := strings.CutPrefix(content, "->"); ok {
			if err := os.Symlink(target, p); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
	}
	if len(files) == 0 {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return s.run(t, "nix-store", "--add", dir)
}

// AddText adds a single file called name with content.
func (s Store) AddText(t testing.TB, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return s.run(t, "nix-store", "--add", p)
}

// Build builds a derivation called name whose builder is busybox sh running
// script, with the store paths in inputs available (and referenced) as
// $in0, $in1, …. It returns the output path. The .drv is the output's deriver
// and the inputs are its references when script writes them into $out.
func (s Store) Build(t testing.TB, name, script string, inputs ...string) string {
	t.Helper()
	var env strings.Builder
	for i, in := range inputs {
		fmt.Fprintf(&env, "  in%d = builtins.storePath %q;\n", i, in)
	}
	expr := fmt.Sprintf(`derivation {
  name = %q;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" %q ];
%s}
`, name, script, env.String())
	f := filepath.Join(t.TempDir(), name+".nix")
	if err := os.WriteFile(f, []byte(expr), 0o644); err != nil {
		t.Fatal(err)
	}
	sh, err := filepath.EvalSymlinks(mustLook(t, "busybox"))
	if err != nil {
		t.Fatal(err)
	}
	return s.run(t, "nix-build", f, "--no-out-link",
		"--option", "sandbox-paths", "/bin/sh="+sh)
}

// DumpDB returns `nix-store --dump-db` of the store.
func (s Store) DumpDB(t testing.TB) string {
	t.Helper()
	return s.run(t, "nix-store", "--dump-db") + "\n"
}

// Delete removes a store path with nix-store --delete.
func (s Store) Delete(t testing.TB, path string) {
	t.Helper()
	s.run(t, "nix-store", "--delete", path)
}

// Fill makes a small but realistic store: three added trees (with an
// executable, a symlink and a subdirectory) and a built derivation that
// refers to one of them. It returns the store paths it made.
func (s Store) Fill(t testing.TB) []string {
	t.Helper()
	a := s.AddTree(t, "tool-a", map[string]string{"bin/run*": "#!/bin/sh\necho a\n", "share/doc/README": "tool a\n", "lib": "->share/doc"})
	b := s.AddTree(t, "data-b", map[string]string{"data.txt": strings.Repeat("b", 10000)})
	c := s.AddText(t, "note-c", "a lone file\n")
	out := s.Build(t, "uses-a", `mkdir $out; echo $in0/bin/run > $out/ref; echo built > $out/x`, a)
	return []string{a, b, c, out}
}

func mustLook(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("look up %s: %v", name, err)
	}
	return p
}
