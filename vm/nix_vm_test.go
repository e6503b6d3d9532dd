//go:build vm

package vm

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
)

// TestNixOnMount makes a real Nix store (chroot store on a btrfs subvolume,
// with added trees and a built derivation), exports its read-only snapshot
// with server/nfs, and in a 6.12 guest puts an overlay on /nix/store with the
// NFS mount as lower, loads the generation's registration (nix-store
// --dump-db on the host) with nix-store --load-db, and checks: nix-store
// --verify --check-contents passes; references survive; nix-build of a
// derivation whose only input is in the lower succeeds, and the upper layer
// receives just the new output and its .drv.
func TestNixOnMount(t *testing.T) {
	mnt := testenv.LoopBtrfs(t, "1G")
	root := filepath.Join(mnt, "root")
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	// The central store root (store/ and var/nix/db/) is one subvolume.
	testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(root, "nix"))
	st := nixtest.New(t, root)
	paths := st.Fill(t)
	toolA, usesA := paths[0], paths[3]
	registration := st.DumpDB(t)
	snap := filepath.Join(mnt, "strata-1")
	testenv.Run(t, "btrfs", "subvolume", "snapshot", "-r", st.NixRoot(), snap)
	port := serveInProcess(t, map[uint64]string{1: filepath.Join(snap, "store")})
	nPaths := strings.Count(registration, "\n/nix/store/") + 1
	expr := fmt.Sprintf(`derivation {
  name = "vm-built";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "mkdir $out; cat $in0/share/doc/README > $out/readme; echo $in0 > $out/ref" ];
  in0 = builtins.storePath %q;
}
`, toolA)
	res := Boot(context.Background(), t, Guest{
		Kernel: Kernel612,
		Nix:    true,
		Env: map[string]string{
			"P": strconv.Itoa(port), "TOOL_A": toolA, "USES_A": usesA,
			"NPATHS": strconv.Itoa(nPaths), "PAGER": "cat",
		},
		Files: []File{
			{Guest: "/registration", Data: []byte(registration)},
			{Guest: "/build.nix", Data: []byte(expr)},
		},
		Script: checkFuncs + nixScript,
	})
	requireChecks(t, res, 12)
}

const nixScript = `
mkdir -p /lower /ovl /nix/store
check "mount /gen/1" mount -t nfs -o "$(nfsopts $P 10.0.2.2)" 10.0.2.2:/gen/1 /lower
mount -t tmpfs tmpfs /ovl && mkdir -p /ovl/upper /ovl/work
check "overlay on /nix/store with the NFS mount as lower" mount -t overlay overlay -o lowerdir=/lower,upperdir=/ovl/upper,workdir=/ovl/work /nix/store
check "nix-store --load-db of the generation's registration" sh -c "nix-store --load-db < /registration"
n=$(nix-store --dump-db | grep -c '^/nix/store/')
echo "valid paths after load-db: $n (registration has $NPATHS)"
check "every registered path is valid" [ "$n" -eq "$NPATHS" ]
check "references survive" sh -c "nix-store -q --references $USES_A | grep -qx $TOOL_A"
check "nix-store --verify --check-contents passes" nix-store --verify --check-contents
check "the upper is empty before the build" [ -z "$(ls -A /ovl/upper)" ]
out=$(nix-build /build.nix --no-out-link)
echo "built $out"
check "nix-build of a derivation whose input is in the lower" sh -c "[ -n '$out' ] && [ \"\$(cat $out/readme)\" = 'tool a' ] && [ \"\$(cat $out/ref)\" = $TOOL_A ]"
ls -la /ovl/upper
check "the upper holds just the output and its .drv" sh -c "[ \"\$(ls -A /ovl/upper | grep -v '\.drv\$')\" = \$(basename $out) ] && [ \$(ls -A /ovl/upper | grep -c '\.drv\$') -eq 1 ]"
check "the output's deriver is that .drv" sh -c "[ \"\$(nix-store -q --deriver $out)\" = /nix/store/\$(ls -A /ovl/upper | grep '\.drv\$') ]"
check "nix-store --verify --check-contents passes after the build" nix-store --verify --check-contents
check "no kernel NFS errors in dmesg" nfs_dmesg_clean
`
