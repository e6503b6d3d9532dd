//go:build vm && demo

package vm

import (
	"context"
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

// TestDemo is `make demo`: strata's whole story with real parts, narrated.
// The host runs `strata server` on a loop-backed btrfs central store filled
// by nix-bin; a qemu guest (Debian's 6.12 kernel, its NFS client) runs
// `strata builder`, which mounts generation 1 under /nix/store and builds on
// it; the host adds a path and publishes generation 2; the builder rotates
// to it atomically and keeps its local build.
func TestDemo(t *testing.T) {
	say := func(format string, args ...any) { fmt.Printf("\n\033[1m== "+format+"\033[0m\n", args...) }
	show := func(format string, args ...any) { fmt.Printf("   "+format+"\n", args...) }
	testenv.RequireRoot(t)
	strata := buildStatic(t, "github.com/strata-nix/strata/cmd/strata")

	say("1. the central Nix store: a btrfs subvolume on a loop device, filled by nix-bin")
	mnt := testenv.LoopBtrfs(t, "1G")
	testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(mnt, "nix"))
	central := nixtest.New(t, mnt)
	hello := central.AddTree(t, "hello", map[string]string{"bin/hello*": "#!/bin/sh\necho hello from generation 1\n"})
	data := central.AddText(t, "dataset.txt", "a data set every builder needs\n")
	tool := central.Build(t, "tool", `mkdir -p $out/bin; echo '#!/bin/sh' > $out/bin/tool; echo "exec $in0/bin/hello" >> $out/bin/tool; chmod +x $out/bin/tool`, hello)
	show("%s\n   %s\n   %s (built by nix-build, refers to hello)", hello, data, tool)

	say("2. strata server publishes generation 1 and exports it over NFSv3 (/gen/1)")
	api, nfsPort := freePort(t), freePort(t)
	startStrataServer(t, strata, mnt, central, api, nfsPort)
	waitGenerations(t, api, 1)
	cli := func(args ...string) string {
		out, err := exec.Command(strata, append(args, "--api", "127.0.0.1:"+strconv.Itoa(api))...).CombinedOutput()
		if err != nil {
			t.Errorf("strata %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	fmt.Print(cli("generations"))

	say("3. a builder node (qemu guest, Debian 6.12 kernel) runs strata builder")
	var fresh string
	published := make(chan struct{})
	onLine := func(line string) {
		rest, ok := strings.CutPrefix(line, "DEMO ")
		if !ok {
			return
		}
		if rest == "want-generation-2" {
			say("4. the central store changes; the server publishes generation 2")
			fresh = central.AddText(t, "new-input.txt", "added after generation 1\n")
			show("added %s", fresh)
			tok := filepath.Join(t.TempDir(), "token")
			os.WriteFile(tok, []byte("vm-test-token\n"), 0o600)
			fmt.Print(cli("publish", "--token-file", tok))
			fmt.Print(cli("delta", "2", "--from", "1"))
			say("5. the builder sees generation 2 and rotates atomically under a stat loop")
			close(published)
			return
		}
		fmt.Println("   guest| " + rest)
	}
	res := Boot(context.Background(), t, Guest{
		Kernel: Kernel612,
		Nix:    true,
		Quiet:  true,
		Env:    map[string]string{"API": strconv.Itoa(api), "NFS": strconv.Itoa(nfsPort), "TOOL": tool, "DATA": data},
		Files: []File{
			{Guest: "/bin/strata", Host: strata},
			{Guest: "/bin/statloop", Host: buildStatic(t, "github.com/strata-nix/strata/internal/cmd/statloop")},
		},
		Script:  demoScript,
		Timeout: 15 * time.Minute,
		OnLine:  onLine,
	})
	select {
	case <-published:
	default:
		t.Fatalf("the guest never asked for generation 2:\n%s", res.Output)
	}
	if res.Status != 0 {
		t.Fatalf("demo guest failed (status %d):\n%s", res.Status, res.Output)
	}
	say("done: generation 1 built on without copying, generation 2 rotated in with 0 failed lookups")
	fmt.Print(cli("generations"))
}

const demoScript = `
set -e
d() { echo "DEMO $*"; }
# run shows a command and its output, and fails the demo when it fails.
run() {
	d "\$ $*"
	if "$@" > /tmp/run.out 2>&1; then rc=0; else rc=$?; fi
	while IFS= read -r l; do d "  $l"; done < /tmp/run.out
	[ $rc -eq 0 ] || d "  (exit status $rc)"
	return $rc
}
export PAGER=cat
mkdir -p /usr/libexec/nix && ln -sf "$(command -v nix)" /usr/libexec/nix/build-remote
mkdir -p /nix /var/lib/strata /etc/strata
mount -t tmpfs nix /nix && mkdir -p /nix/store /nix/var/nix
mount -t tmpfs state /var/lib/strata
cat > /etc/strata/builder.yaml <<EOF2
server:
  api: http://10.0.2.2:$API
  nfs: 10.0.2.2:$NFS
rotate:
  check_interval: 2s
EOF2
d "builder config /etc/strata/builder.yaml: server http://10.0.2.2:$API, NFS 10.0.2.2:$NFS"
strata builder --config /etc/strata/builder.yaml > /builder.log 2>&1 &
S=unix:/var/lib/strata/builder/api.sock
ready() { strata status --api $S --json 2>/dev/null | grep -q '"ready": true'; }
i=0; while ! ready; do sleep 1; i=$((i+1)); [ $i -lt 120 ] || { d "builder not ready"; cat /builder.log; exit 1; }; done
d "builder ready after ${i}s:"
run strata status --api $S
run sh -c "grep -E ' /nix/store | nfs ' /proc/mounts"
run nix-store --verify --check-contents
d "a local build whose input ($TOOL) exists only in generation 1:"
cat > /local.nix <<EOF2
derivation { name = "local-build"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "mkdir \$out; \$tool/bin/tool > \$out/greeting" ];
  tool = builtins.storePath "$TOOL"; }
EOF2
OUT=$(nix-build /local.nix --no-out-link 2>/dev/null)
run cat $OUT/greeting
d "the upper layer holds only what was built here (nothing was copied), and the generation's GC root:"
run sh -c "ls /var/lib/strata/builder/upper | grep -v '\.lock$'"
statloop -stop /tmp/stop -ready /tmp/ready $DATA $TOOL/bin/tool > /tmp/loop 2>&1 &
LOOP=$!
while [ ! -e /tmp/ready ]; do sleep 0.1; done
d "want-generation-2"
i=0; until strata status --api $S --json | grep -q '"state": "idle(2)"'; do sleep 1; i=$((i+1)); [ $i -lt 180 ] || { d "no rotation"; cat /builder.log; exit 1; }; done
touch /tmp/stop; wait $LOOP # not the builder, which keeps running
run strata status --api $S
d "stat loop over paths of both generations during the rotation:"
run cat /tmp/loop
grep -q 'failures=0' /tmp/loop
NEW=$(ls -d /nix/store/*-new-input.txt)
run cat $NEW
run nix-store --check-validity $NEW $OUT
run nix-store --verify --check-contents
`
