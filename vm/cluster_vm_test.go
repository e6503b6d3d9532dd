//go:build vm

package vm

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
)

// TestClusterBuilder (6.12 guest, kernel NFS client): `strata server` on the
// host and `strata builder` in the guest gossip (encrypted) over QEMU user
// networking: the guest reaches the host at 10.0.2.2, the host reaches the
// guest through hostfwd (TCP and UDP) on a loopback port, so the server
// advertises 10.0.2.2:P and the builder 127.0.0.1:F.
//
//  1. The builder has cluster.join and no server.api: it finds the server by
//     gossip, reaches READY on generation 1 and, with rotate.check_interval
//     1h (no polling), starts rotating within 5 s of a publish.
//  2. retention.keep 1, rotate.policy idle: while a build runs the builder
//     holds generation 2; the server publishes 3 more; generation 2 stays
//     (listed with its holder, snapshot exported, reads through the
//     overlay and the NFS lower work), the unheld 3 and 4 are destroyed.
//     When the build ends the builder rotates to 5 and the server destroys
//     generation 2 within one retention pass of the builder's report.
//  3. SIGTERM stops the builder: it leaves, and the server lists it as left
//     and counts no hold of it.
func TestClusterBuilder(t *testing.T) {
	testenv.RequireRoot(t)
	strata := buildStatic(t, "github.com/strata-nix/strata/cmd/strata")
	mnt := testenv.LoopBtrfs(t, "1G")
	testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(mnt, "nix"))
	central := nixtest.New(t, mnt)
	paths := central.Fill(t)
	apiPort, nfsPort, gossip, fwd := freePort(t), freePort(t), freePort(t), freePort(t)
	k := make([]byte, 32)
	rand.Read(k)
	keyring := base64.StdEncoding.EncodeToString(k) + "\n"

	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "token"), []byte("vm-test-token\n"), 0o600)
	os.WriteFile(filepath.Join(dir, "cluster.keys"), []byte(keyring), 0o600)
	cfg := fmt.Sprintf(`store:
  root: %s
snapshot:
  snapshot_dir: %s
state_dir: %s
publish:
  interval: 0s
retention:
  keep: 1
api:
  listen: 0.0.0.0:%d
  token_file: %s
nfs:
  listen: 0.0.0.0:%d
  allow: [127.0.0.0/8]
cluster:
  bind: 127.0.0.1:%d
  advertise: 10.0.2.2:%d
  name: vm-test
  node_name: central
  keyring_file: %s
`, central.NixRoot(), filepath.Join(mnt, "snaps"), filepath.Join(dir, "server"), apiPort, filepath.Join(dir, "token"),
		nfsPort, gossip, gossip, filepath.Join(dir, "cluster.keys"))
	os.MkdirAll(filepath.Join(mnt, "snaps"), 0o755)
	os.WriteFile(filepath.Join(dir, "server.yaml"), []byte(cfg), 0o644)
	srv := exec.Command(strata, "server", "--config", filepath.Join(dir, "server.yaml"))
	srv.Stdout, srv.Stderr = os.Stderr, os.Stderr
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
	waitGenerations(t, apiPort, 1)

	var changes int
	onLine := func(line string) {
		if strings.Contains(line, "HOST-CHANGE-STORE") {
			changes++
			f := filepath.Join(t.TempDir(), fmt.Sprintf("change-%d", changes))
			os.WriteFile(f, []byte(strings.Repeat("change\n", changes)), 0o644)
			if out, err := central.Command("nix-store", "--add", f).CombinedOutput(); err != nil {
				t.Errorf("add change %d: %v %s", changes, err, out)
			}
		}
	}
	res := Boot(context.Background(), t, Guest{
		Kernel: Kernel612,
		Nix:    true,
		Env: map[string]string{"API": strconv.Itoa(apiPort), "GOSSIP": strconv.Itoa(gossip), "FWD": strconv.Itoa(fwd),
			"TOOL": paths[0], "DATA": paths[1]},
		Files: []File{
			{Guest: "/bin/strata", Host: strata},
			{Guest: "/token", Data: []byte("vm-test-token\n")},
			{Guest: "/etc/strata/cluster.keys", Data: []byte(keyring), Mode: 0o600},
		},
		HostFwd: []string{fmt.Sprintf("tcp:127.0.0.1:%d-:7946", fwd), fmt.Sprintf("udp:127.0.0.1:%d-:7946", fwd)},
		Script:  checkFuncs + clusterScript,
		Timeout: 20 * time.Minute,
		OnLine:  onLine,
	})
	requireChecks(t, res, 15)
}

const clusterScript = `
export PAGER=cat
S=unix:/var/lib/strata/builder/api.sock
A="--api 10.0.2.2:$API"
UP=/var/lib/strata/builder/upper
mkdir -p /nix /var/lib/strata /etc/strata
mount -t tmpfs nix /nix && mkdir -p /nix/store /nix/var/nix
mount -t tmpfs state /var/lib/strata
mkdir -p /usr/libexec/nix && ln -sf "$(command -v nix)" /usr/libexec/nix/build-remote
cat > /etc/strata/builder.yaml <<EOF2
server:
  api: ""
rotate:
  policy: idle
  check_interval: 1h
cluster:
  join: [10.0.2.2:$GOSSIP]
  bind: 0.0.0.0:7946
  advertise: 127.0.0.1:$FWD
  name: vm-test
  node_name: vm-builder
  keyring_file: /etc/strata/cluster.keys
EOF2
strata builder --config /etc/strata/builder.yaml > /builder.log 2>&1 &
BPID=$!
trap 'echo "--- builder log"; tail -60 /builder.log; echo "--- status"; strata status --api $S; echo "--- overlays"; grep -E " overlay " /proc/self/mountinfo' EXIT
gen() { strata status --api $S --json 2>/dev/null | sed -n 's/^  "generation": \([0-9]*\),$/\1/p'; }
ready() { strata status --api $S --json 2>/dev/null | grep -q '"ready": true'; }
now() { cut -d' ' -f1 /proc/uptime; }
publish() { echo HOST-CHANGE-STORE; until strata publish $A --token-file /token | grep -q '^published'; do sleep 0.2; done; }
i=0; while ! ready && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done
check "ready on generation 1 with no server.api (server found by gossip)" [ "$(gen)" = 1 ]
# Gossip converges: a probe lost on QEMU's user network marks a member
# suspect for a moment. Wait up to 10 s for both to be alive.
members_ok() { strata members --api $S | grep -qE '^central .* server .* alive ' && strata members --api $S | grep -qE '^vm-builder \(self\) .* builder .* alive +1 '; }
i=0; while ! members_ok && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
strata members --api $S
check "members: the server alive, this builder holding 1" members_ok

# 1. A publish reaches the idle builder by gossip (polling is every hour).
publish
t0=$(now)
while [ "$(strata status --api $S --json | grep -c '"state": "idle(1)"')" = 1 ] && [ "$(gen)" = 1 ]; do sleep 0.05; done
t1=$(now)
echo "TIMING publish -> rotation started: $(echo "$t1 $t0" | awk '{print $1-$2}') s"
check "rotation started within 5 s of the publish" sh -c "echo $t1 $t0 | awk '{exit !(\$1-\$2 <= 5)}'"
i=0; while [ "$(gen)" != 2 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
t2=$(now)
echo "TIMING publish -> on generation 2: $(echo "$t2 $t0" | awk '{print $1-$2}') s"
check "rotated to generation 2" [ "$(gen)" = 2 ]

# 2. A build holds generation 2 under the idle policy.
cat > /slow.nix <<EOF2
derivation { name = "slow"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "while [ ! -e /tmp/release ]; do sleep 0.2; done; mkdir \$out; \$in0/bin/run > \$out/said" ];
  in0 = builtins.storePath "$TOOL"; }
EOF2
nix-build /slow.nix --no-out-link > /tmp/slow.out 2>&1 &
SPID=$!
# The output's lock, not the .drv's: nix-instantiate locks the .drv while
# adding it (xxx-slow.drv.lock) and deletes that lock at once.
i=0; while ! ls $UP/*-slow.lock >/dev/null 2>&1 && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
check "a build runs (its output lock is in the upper)" sh -c "ls $UP/*-slow.lock || { cat /tmp/slow.out; ls -la $UP; false; }"
publish; publish; publish
sleep 8
strata generations $A
strata status $A
check "generation 2 kept and listed with its holder; unheld 3 and 4 destroyed" sh -c "[ \"\$(strata generations $A | awk 'NR>1{print \$1}' | tr '\n' ' ')\" = '2 5 ' ] && strata generations $A | grep -E '^2 .* vm-builder\$'"
check "server status: retention waits for vm-builder" sh -c "strata status $A | grep -E 'retention waits:.*generation 2: held by builders \\[vm-builder\\]'"
check "builder stays on generation 2 while the build runs" [ "$(gen)" = 2 ]
check "reads through the overlay and the NFS lower of generation 2 work" sh -c "cat $DATA/data.txt && ls /var/lib/strata/builder/lower/2/ | grep -q . && cat /var/lib/strata/builder/lower/2/\$(basename $DATA)/data.txt"
touch /tmp/release
wait $SPID
check "the build finished" sh -c "cat \$(tail -1 /tmp/slow.out)/said"
t0=$(now)
i=0; while [ "$(gen)" != 5 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
t1=$(now)
echo "TIMING build end -> on generation 5: $(echo "$t1 $t0" | awk '{print $1-$2}') s"
check "rotated to generation 5 once the build ended" [ "$(gen)" = 5 ]
i=0; while strata generations $A | grep -qE '^2 ' && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
t2=$(now)
echo "TIMING on generation 5 -> generation 2 destroyed: $(echo "$t2 $t1" | awk '{print $1-$2}') s"
check "generation 2 destroyed after the builder reported generation 5" sh -c "! strata generations $A | grep -qE '^2 '"
check "builder still running" kill -0 $BPID
check "no NFS errors in dmesg" nfs_dmesg_clean
kill -TERM $BPID; wait $BPID
sleep 1
strata members $A
check "SIGTERM: the builder left; the server counts no hold of it" sh -c "strata members $A --json | tr -d ' \n' | grep -q '\"name\":\"vm-builder\",\"role\":\"builder\",\"address\":\"[^\"]*\",\"state\":\"left\"' && ! strata generations $A | grep -q vm-builder"
`
