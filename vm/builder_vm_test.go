//go:build vm

package vm

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
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

// freePort returns a loopback port for the host-side strata server or a
// guest's forwarded port (testenv.ChildPort).
func freePort(t *testing.T) int {
	t.Helper()
	return testenv.ChildPort(t)
}

// TestBuilderRotation runs `strata server` on the host (bin built with
// CGO_ENABLED=0, a btrfs central store filled with nix-bin) and `strata
// builder` in a guest with the kernel NFS client, on the 6.12 kernel
// (swap beneath) and Debian's 6.1 (propagation fallback). In the guest:
// the first start passes nix-store --verify --check-contents and a local
// nix-build on a generation-only input copies nothing; then, while a
// statloop stats paths present in both generations and holds a file of the
// first open, the guest publishes generation 2 (which drops the local
// build's input and a path nobody uses, and adds one) and forces a
// rotation: zero failed stats, the held file reads the same bytes, the new
// path is valid and readable, the local output and its input stay valid
// (generation 1 reported as still mounted), the unused path is invalid,
// and --verify --check-contents is clean. While the statloop holds its
// file, the detached overlay of generation 1 (NFS lower) is reported
// retired and held; once it exits, the next check releases it.
func TestBuilderRotation(t *testing.T) {
	testenv.RequireRoot(t)
	strata := buildStatic(t, "github.com/strata-nix/strata/cmd/strata")
	statloop := buildStatic(t, "github.com/strata-nix/strata/internal/cmd/statloop")
	for _, k := range []struct {
		kernel Kernel
		method string
	}{{Kernel612, "beneath"}, {Kernel61, "propagation"}} {
		t.Run(k.kernel.String(), func(t *testing.T) {
			mnt := testenv.LoopBtrfs(t, "1G")
			testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(mnt, "nix"))
			central := nixtest.New(t, mnt)
			paths := central.Fill(t)
			lib := central.AddTree(t, "lib-kept", map[string]string{"lib.txt": "library of generation 1\n"})
			gone := central.AddText(t, "gone", "nobody uses me\n")
			held := central.AddTree(t, "held", map[string]string{"big": strings.Repeat("held bytes of generation 1\n", 3000)})

			api, nfsPort := freePort(t), freePort(t)
			startStrataServer(t, strata, mnt, central, api, nfsPort)
			waitGenerations(t, api, 1)
			// Generation 2 (published from the guest) drops lib and gone and
			// adds fresh.
			central.Delete(t, gone)
			central.Delete(t, lib)
			fresh := central.AddText(t, "fresh", "new in generation 2\n")

			res := Boot(context.Background(), t, Guest{
				Kernel: k.kernel,
				Nix:    true,
				Env: map[string]string{"API": strconv.Itoa(api), "NFS": strconv.Itoa(nfsPort), "TOOL": paths[0],
					"DATA": paths[1], "LIB": lib, "GONE": gone, "HELD": held, "FRESH": fresh, "METHOD": k.method},
				Files: []File{
					{Guest: "/bin/strata", Host: strata},
					{Guest: "/bin/statloop", Host: statloop},
					{Guest: "/token", Data: []byte("vm-test-token\n")},
				},
				Script:  checkFuncs + builderScript,
				Timeout: 15 * time.Minute,
			})
			requireChecks(t, res, 19)
		})
	}
}

// startStrataServer runs `strata server` on central (publishing its first
// generation at start) with the API on api and NFS on nfsPort, token
// "vm-test-token"; it is killed at cleanup.
func startStrataServer(t *testing.T, strata, mnt string, central nixtest.Store, api, nfsPort int) {
	t.Helper()
	startStrataServerAllow(t, strata, mnt, central, api, nfsPort, "[127.0.0.0/8]")
}

// startStrataServerAllow is startStrataServer with nfs.allow set to allow
// (YAML flow list).
func startStrataServerAllow(t *testing.T, strata, mnt string, central nixtest.Store, api, nfsPort int, allow string) {
	t.Helper()
	dir := t.TempDir()
	token := filepath.Join(dir, "token")
	os.WriteFile(token, []byte("vm-test-token\n"), 0o600)
	cfg := fmt.Sprintf(`store:
  root: %s
snapshot:
  backend: btrfs
  snapshot_dir: %s
state_dir: %s
publish:
  interval: 0s
api:
  listen: 127.0.0.1:%d
  token_file: %s
nfs:
  listen: 127.0.0.1:%d
  allow: %s
`, central.NixRoot(), filepath.Join(mnt, "snaps"), filepath.Join(dir, "server"), api, token, nfsPort, allow)
	os.MkdirAll(filepath.Join(mnt, "snaps"), 0o755)
	os.WriteFile(filepath.Join(dir, "server.yaml"), []byte(cfg), 0o644)
	srv := exec.Command(strata, "server", "--config", filepath.Join(dir, "server.yaml"))
	srv.Stdout, srv.Stderr = os.Stderr, os.Stderr
	if err := srv.Start(); err != nil {
		t.Error(err)
		return
	}
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
}

func waitGenerations(t *testing.T, port, n int) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/v1/generations", port))
		if err == nil {
			var l struct{ Generations []json.RawMessage }
			json.NewDecoder(resp.Body).Decode(&l)
			resp.Body.Close()
			if len(l.Generations) >= n {
				return
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("server has not published %d generations after 60s", n)
}

const builderScript = `
export PAGER=cat
# nix-build runs the build hook (the nix binary called build-remote), which
# declines when no remote builders are configured.
mkdir -p /usr/libexec/nix && ln -sf "$(command -v nix)" /usr/libexec/nix/build-remote
S=unix:/var/lib/strata/builder/api.sock
mkdir -p /nix /var/lib/strata /etc/strata
mount -t tmpfs nix /nix && mkdir -p /nix/store /nix/var/nix
mount -t tmpfs state /var/lib/strata
cat > /etc/strata/builder.yaml <<EOF2
server:
  api: http://10.0.2.2:$API
  nfs: 10.0.2.2:$NFS
rotate:
  check_interval: 1h
EOF2
strata builder --config /etc/strata/builder.yaml > /builder.log 2>&1 &
BPID=$!
ready() { strata status --api $S --json 2>/dev/null | grep -q '"ready": true'; }
i=0; while ! ready && [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done
check "builder ready on generation 1" sh -c "strata status --api $S --json | grep -q '\"generation\": 1,'"
check "overlay of the NFS mount on /nix/store" sh -c "grep ' /nix/store overlay ' /proc/mounts && grep -q ' nfs ' /proc/mounts"
check "nix-store --verify --check-contents passes" sh -c "nix-store --verify --check-contents 2>&1 | tee /tmp/v; ! grep -qiE 'disappeared|modified|error' /tmp/v"
cat > /local.nix <<EOF2
derivation { name = "local"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "mkdir \$out; \$in0/bin/run > \$out/said; cat \$in1/lib.txt > \$out/lib" ];
  in0 = builtins.storePath "$TOOL"; in1 = builtins.storePath "$LIB"; }
EOF2
check "nix-build on generation-only inputs" sh -c "nix-build /local.nix --no-out-link > /tmp/out"
OUT=$(cat /tmp/out)
check "local output correct" sh -c "[ \"\$(cat $OUT/said)\" = a ]"
UP=/var/lib/strata/builder/upper
check "upper holds only the new output, its .drv and the generation's GC root" sh -c "ls $UP | grep -vE '\\-local(\\.drv)?$' | grep -v '\\.lock$' | grep -v -- '-strata-generation-1$' | wc -l | grep -qx 0 && [ -d $UP/$(basename $OUT) ]"
statloop -stop /tmp/stop -ready /tmp/ready -hold $HELD/big $DATA/data.txt $TOOL/bin/run > /tmp/loop 2>&1 &
LPID=$!
while [ ! -e /tmp/ready ]; do sleep 0.1; done
check "publish generation 2" sh -c "strata publish --api 10.0.2.2:$API --token-file /token"
t0=$(cut -d' ' -f1 /proc/uptime)
check "forced rotation" strata builder rotate --api $S
t1=$(cut -d' ' -f1 /proc/uptime)
echo "TIMING rotation: $t0 -> $t1 s (guest uptime)"
strata status --api $S --json > /tmp/held
check "status: the detached overlay of generation 1 is retired and held while the statloop holds a file in it" sh -c "tr -d ' \\n' < /tmp/held | grep -q '\"holding\":\\[2,1\\].*\"retired\":\\[{[^]]*\"generations\":\\[1\\]'"
sleep 1; touch /tmp/stop; wait $LPID; cat /tmp/loop
check "statloop: zero failures and held file intact" grep -q 'failures=0 heldfail=0' /tmp/loop
strata builder rotate --api $S > /dev/null
check "the statloop gone, a check releases the detached overlay" sh -c "! strata status --api $S --json | grep -q '\"retired\"'"
strata status --api $S --json | tee /tmp/status
check "status: generation 2 via $METHOD, generation 1 kept mounted" sh -c "grep -q '\"generation\": 2,' /tmp/status && grep -q '\"swap_method\": \"$METHOD\"' /tmp/status && grep -q '\"kept_paths\": 1' /tmp/status"
check "new path valid and readable" sh -c "nix-store --check-validity $FRESH && [ \"\$(cat $FRESH)\" = 'new in generation 2' ]"
check "local output and its removed input stay valid and readable" sh -c "nix-store --check-validity $OUT $LIB && grep -q 'generation 1' $LIB/lib.txt"
check "unused removed path invalid" sh -c "! nix-store --check-validity $GONE 2>/dev/null"
check "nix-store --verify --check-contents after rotation" sh -c "nix-store --verify --check-contents 2>&1 | tee /tmp/v; ! grep -qiE 'disappeared|modified|error' /tmp/v"
check "one overlay on /nix/store" sh -c "[ \$(grep -c ' /nix/store overlay ' /proc/mounts) -eq 1 ]"
check "builder still running" kill -0 $BPID
check "no NFS errors in dmesg" nfs_dmesg_clean
tail -20 /builder.log
`

// TestBuilderKillAndServerDown (6.12 guest, kernel NFS client): the builder
// starts while the server is down: it is not ready, leaves /nix/store
// alone and says why in status; once the host starts the server it
// becomes ready. Then, three times, the guest publishes a new generation,
// forces a rotation and kill -9s the agent 0.05, 0.2 or 0.6 s into it (the
// state reached is logged; the host integration test kills at every state);
// the restarted agent converges on the newest generation with one overlay,
// one NFS mount per lower, every path valid and readable, and a clean
// nix-store --verify --check-contents.
func TestBuilderKillAndServerDown(t *testing.T) {
	testenv.RequireRoot(t)
	strata := buildStatic(t, "github.com/strata-nix/strata/cmd/strata")
	mnt := testenv.LoopBtrfs(t, "1G")
	testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(mnt, "nix"))
	central := nixtest.New(t, mnt)
	central.Fill(t)
	api, nfsPort := freePort(t), freePort(t)
	var changes int
	onLine := func(line string) {
		switch {
		case strings.Contains(line, "HOST-START-SERVER"):
			startStrataServer(t, strata, mnt, central, api, nfsPort)
		case strings.Contains(line, "HOST-CHANGE-STORE"):
			changes++
			f := filepath.Join(t.TempDir(), fmt.Sprintf("change-%d", changes))
			os.WriteFile(f, []byte(strings.Repeat("change\n", changes)), 0o644)
			if out, err := central.Command("nix-store", "--add", f).CombinedOutput(); err != nil {
				t.Errorf("add change %d: %v %s", changes, err, out)
			}
		}
	}
	res := Boot(context.Background(), t, Guest{
		Kernel:  Kernel612,
		Nix:     true,
		Env:     map[string]string{"API": strconv.Itoa(api), "NFS": strconv.Itoa(nfsPort)},
		Files:   []File{{Guest: "/bin/strata", Host: strata}, {Guest: "/token", Data: []byte("vm-test-token\n")}},
		Script:  checkFuncs + killScript,
		Timeout: 20 * time.Minute,
		OnLine:  onLine,
	})
	requireChecks(t, res, 5+3*6)
}

const killScript = `
export PAGER=cat
S=unix:/var/lib/strata/builder/api.sock
ST=/var/lib/strata/builder/state.json
mkdir -p /nix /var/lib/strata /etc/strata
mount -t tmpfs nix /nix && mkdir -p /nix/store /nix/var/nix
mount -t tmpfs state /var/lib/strata
cat > /etc/strata/builder.yaml <<EOF2
server:
  api: http://10.0.2.2:$API
  nfs: 10.0.2.2:$NFS
rotate:
  check_interval: 1h
EOF2
startb() { strata builder --config /etc/strata/builder.yaml >> /builder.log 2>&1 & BPID=$!; }
ready() { strata status --api $S --json 2>/dev/null | grep -q '"ready": true'; }
waitready() { i=0; while ! ready && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done; ready; }
# status_says PATTERN: the agent's status (saved in /status.json) matches
# within 20 s. Under TCG the agent takes a few seconds before its socket
# answers, so the checks below wait for it instead of a fixed sleep.
status_says() { i=0; while [ $i -lt 200 ]; do strata status --api $S --json > /status.json 2>/dev/null && grep -q "$1" /status.json && return 0; sleep 0.1; i=$((i+1)); done; cat /status.json /builder.log; return 1; }
startb
sleep 4
check "builder API answers while the server is down" status_says '"role"'
check "not ready while the server is down" grep -q '"ready": false' /status.json
check "store dir untouched while the server is down" sh -c "! grep -q ' /nix/store ' /proc/mounts"
check "status names the connection error" status_says 'connection refused'
echo HOST-START-SERVER
check "ready once the server is up" waitready
for d in 0.05 0.2 0.6; do
	echo HOST-CHANGE-STORE
	until strata publish --api 10.0.2.2:$API --token-file /token | grep -q '^published'; do sleep 0.2; done
	want=$(strata generations --api 10.0.2.2:$API | tail -1 | awk '{print $1}')
	strata builder rotate --api $S > /dev/null 2>&1 &
	sleep $d
	kill -9 $BPID; wait $BPID 2>/dev/null
	echo "killed after $d s in: $(grep '"phase"' $ST) target $(grep '"target"' $ST)"
	startb
	check "restart after kill at $d s is ready" waitready
	check "converges on generation $want" sh -c "strata builder rotate --api $S && strata status --api $S --json | grep -q '\"generation\": $want,'"
	check "one overlay on /nix/store" sh -c "[ \$(grep -c ' /nix/store overlay ' /proc/mounts) -eq 1 ]"
	check "one NFS mount, of generation $want" sh -c "[ \$(grep -c ' nfs ' /proc/mounts) -eq 1 ] && grep -q \"/gen/$want /var/lib/strata/builder/lower/$want nfs\" /proc/mounts"
	check "new and old paths valid" sh -c "nix-store --check-validity \$(ls -d /nix/store/*-change-* /nix/store/*-tool-a)"
	check "verify --check-contents clean" sh -c "nix-store --verify --check-contents 2>&1 | tee /tmp/v; ! grep -qiE 'disappeared|modified|error' /tmp/v"
done
grep -iE 'level=(warn|error)' /builder.log | tail -20
`
