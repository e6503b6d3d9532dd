//go:build deploy

package deploy

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/strata-nix/strata/internal/testenv"
)

// collectionsPath makes ANSIBLE_COLLECTIONS_PATH content in which
// strata.deploy is this repository's ansible/ directory.
func collectionsPath(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	ns := filepath.Join(dir, "ansible_collections", "strata")
	os.MkdirAll(ns, 0o755)
	if err := os.Symlink(filepath.Join(repoRoot(t), "ansible"), filepath.Join(ns, "deploy")); err != nil {
		t.Fatal(err)
	}
	return dir
}

// The example site.yml resolves the collection's roles (strata.deploy.*)
// and parses; so do the test playbooks with plain role names.
func TestAnsibleSyntax(t *testing.T) {
	testenv.RequireCommands(t, "ansible-playbook")
	home := t.TempDir()
	for _, c := range []struct{ playbook, env string }{
		{filepath.Join(repoRoot(t), "ansible", "playbooks", "site.yml"), "ANSIBLE_COLLECTIONS_PATH=" + collectionsPath(t)},
		{filepath.Join(repoRoot(t), "deploy", "testdata", "site.yml"), "ANSIBLE_ROLES_PATH=" + filepath.Join(repoRoot(t), "ansible", "roles")},
		{filepath.Join(repoRoot(t), "deploy", "testdata", "replica.yml"), "ANSIBLE_ROLES_PATH=" + filepath.Join(repoRoot(t), "ansible", "roles")},
	} {
		cmd := exec.Command("ansible-playbook", "--syntax-check", "-i", filepath.Join(repoRoot(t), "ansible", "inventory.example.ini"), c.playbook)
		cmd.Env = append(os.Environ(), c.env, "ANSIBLE_HOME="+home, "ANSIBLE_NOCOLOR=1")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("ansible-playbook --syntax-check %s: %v\n%s", c.playbook, err, out)
		}
	}
}

// ansible-lint (Debian's 6.x, production profile) passes on the whole
// collection: both roles, their Debian and RHEL-family variables, the
// argument specs and the example playbook.
func TestAnsibleLint(t *testing.T) {
	testenv.RequireCommands(t, "ansible-lint")
	cmd := exec.Command("ansible-lint", "--offline", "--profile", "production", "--nocolor",
		"roles/strata_server", "roles/strata_builder", "playbooks/site.yml", "galaxy.yml")
	cmd.Dir = filepath.Join(repoRoot(t), "ansible")
	cmd.Env = append(os.Environ(), "ANSIBLE_COLLECTIONS_PATH="+collectionsPath(t), "ANSIBLE_HOME="+t.TempDir())
	out, err := cmd.CombinedOutput()
	fmt.Printf("--- ansible-lint:\n%s\n", out)
	if err != nil {
		t.Fatalf("ansible-lint: %v", err)
	}
}
