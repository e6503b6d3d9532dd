//go:build integration

package nixos

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
)

// The module's rendered server.yaml, pointing at a real btrfs central
// store, passes `strata server --check-config` (which also inspects the
// store, the snapshot dir and the state dir on disk).
func TestServerCheckConfigOnRealStore(t *testing.T) {
	mnt := testenv.LoopBtrfs(t, "1G")
	testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(mnt, "nix"))
	st := nixtest.New(t, mnt)
	st.Fill(t)
	snaps := filepath.Join(mnt, "snapshots")
	os.Mkdir(snaps, 0o700)
	r, err := evalMachine(t, `{ fakePackage }: { services.strata.server = { enable = true; package = fakePackage "strata";
  settings = { store.root = "`+st.NixRoot()+`"; snapshot.snapshot_dir = "`+snaps+`"; state_dir = "`+filepath.Join(t.TempDir(), "state")+`";
    nfs.allow = [ "10.0.0.0/8" ]; publish.interval = "10m"; }; }; }`)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "server.yaml")
	os.WriteFile(p, []byte(r.Etc["strata/server.yaml"]), 0o600)
	out, err := exec.Command(buildStrata(t), "server", "--check-config", "--config", p).CombinedOutput()
	if err != nil || !strings.HasSuffix(strings.TrimSpace(string(out)), "configuration: ok") {
		t.Fatalf("strata server --check-config of the rendered %s: %v\n%s", r.Etc["strata/server.yaml"], err, out)
	}
	t.Logf("strata server --check-config:\n%s", out)
}
