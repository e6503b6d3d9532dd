//go:build vm

package vm

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
)

// hostChanges answers the guest's markers: HOST-CHANGE-STORE adds a new
// file to the central store (the guest then publishes it), and each
// extra marker runs its action once per line.
func hostChanges(t *testing.T, central nixtest.Store, extra map[string]func()) func(string) {
	var mu sync.Mutex
	changes := 0
	return func(line string) {
		mu.Lock()
		defer mu.Unlock()
		if strings.Contains(line, "HOST-CHANGE-STORE") {
			changes++
			f := filepath.Join(t.TempDir(), fmt.Sprintf("change-%d", changes))
			os.WriteFile(f, []byte(strings.Repeat("change\n", changes)), 0o644)
			if out, err := central.Command("nix-store", "--add", f).CombinedOutput(); err != nil {
				t.Errorf("add change %d: %v %s", changes, err, out)
			}
		}
		for marker, f := range extra {
			if strings.Contains(line, marker) && !strings.Contains(line, "echo") {
				f()
			}
		}
	}
}

// TestBuilderLocalStore: a builder whose /nix/store already holds a
// nix-store --add path, Nix's own closure (the nix binary and its
// libraries as a store path, and a locally built nix-store wrapper that
// refers to it, which the agent runs as nix.bin) keeps every one of them
// valid, readable and runnable through the first start, two rotations
// (MOVE_MOUNT_BENEATH on 6.12, the propagation fallback on 6.1) and an
// agent restart; nothing leaves the DB and nix-store --verify
// --check-contents stays clean. The first rotation happens while a build
// writes, renames and deletes in its output through a cwd in the old
// overlay: the build succeeds and its output verifies.
func TestBuilderLocalStore(t *testing.T) {
	testenv.RequireRoot(t)
	strata := buildStatic(t, "github.com/strata-nix/strata/cmd/strata")
	for _, k := range []struct {
		kernel Kernel
		method string
	}{{Kernel612, "beneath"}, {Kernel61, "propagation"}} {
		t.Run(k.kernel.String(), func(t *testing.T) {
			mnt := testenv.LoopBtrfs(t, "1G")
			testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(mnt, "nix"))
			central := nixtest.New(t, mnt)
			central.Fill(t)
			api, nfsPort := freePort(t), freePort(t)
			startStrataServer(t, strata, mnt, central, api, nfsPort)
			waitGenerations(t, api, 1)
			res := Boot(context.Background(), t, Guest{
				Kernel:  k.kernel,
				Nix:     true,
				Env:     map[string]string{"API": strconv.Itoa(api), "NFS": strconv.Itoa(nfsPort), "METHOD": k.method},
				Files:   []File{{Guest: "/bin/strata", Host: strata}, {Guest: "/token", Data: []byte("vm-test-token\n")}},
				Script:  checkFuncs + storeCommon + localStoreScript,
				Timeout: 25 * time.Minute,
				OnLine:  hostChanges(t, central, nil),
			})
			requireChecks(t, res, 22)
		})
	}
}

// storeCommon sets up the guest's store and state tmpfs and helpers.
const storeCommon = `
export PAGER=cat
mkdir -p /usr/libexec/nix && ln -sf "$(command -v nix)" /usr/libexec/nix/build-remote
S=unix:/var/lib/strata/builder/api.sock
UP=/var/lib/strata/builder/upper
mkdir -p /nix /var/lib/strata /etc/strata
mount -t tmpfs nix /nix && mkdir -p /nix/store /nix/var/nix
mount -t tmpfs state /var/lib/strata
startb() { strata builder --config /etc/strata/builder.yaml >> /builder.log 2>&1 & BPID=$!; }
ready() { strata status --api $S --json 2>/dev/null | grep -q '"ready": true'; }
waitready() { i=0; while ! ready && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done; ready; }
publish() { until strata publish --api 10.0.2.2:$API --token-file /token | grep -q '^published'; do sleep 0.2; done; }
newest() { strata generations --api 10.0.2.2:$API | tail -1 | awk '{print $1}'; }
verify() { nix-store --verify --check-contents > /tmp/v 2>&1; cat /tmp/v; ! grep -qiE 'disappeared|modified|error|removing|invalid' /tmp/v; }
genpaths() { ls /var/lib/strata/builder/lower/$1 | grep -v '^\.' | grep -v '\.lock$' | sed 's,^,/nix/store/,'; }
`

const localStoreScript = `
# The store before strata: a nix-store --add path; Nix itself as a store
# path (the binary and every library it loads); a local build: a nix-store
# wrapper referring to it.
mkdir -p /localadd/bin && printf '#!/bin/sh\necho hi from the local store\n' > /localadd/bin/hi && chmod +x /localadd/bin/hi
ADD=$(nix-store --add /localadd)
mkdir -p /nixpkg/bin /nixpkg/lib && cp /usr/bin/nix /nixpkg/bin/nix
for l in $(/lib64/ld-linux-x86-64.so.2 --list /usr/bin/nix | grep -o '/[^ ]*'); do cp -L $l /nixpkg/lib/; done
NIXP=$(nix-store --add /nixpkg)
cat > /wrap.sh <<'EOF3'
mkdir -p $out/bin
cat > $out/bin/nix-store <<EOF
#!/bin/sh
exec $p/lib/ld-linux-x86-64.so.2 --argv0 nix-store --library-path $p/lib $p/bin/nix "\$@"
EOF
chmod +x $out/bin/nix-store
EOF3
cat > /wrap.nix <<EOF2
derivation { name = "nix-store-wrapper"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ /wrap.sh ]; p = builtins.storePath "$NIXP"; }
EOF2
W=$(nix-build /wrap.nix --no-out-link)
check "nix-store runs from the local store" sh -c "$W/bin/nix-store --version | grep -q 'nix-store (Nix)'"
nix-store -qR $ADD $W $(nix-store -qd $W) | sort -u > /before
echo "local paths before strata: $(wc -l < /before)"; cat /before
cat > /etc/strata/builder.yaml <<EOF2
server:
  api: http://10.0.2.2:$API
  nfs: 10.0.2.2:$NFS
nix:
  bin: $W/bin/nix-store
rotate:
  check_interval: 1h
EOF2
localok() {
	$W/bin/nix-store --check-validity $(cat /before) || return 1
	for p in $(cat /before); do [ -e $p ] || { echo "unreadable: $p"; return 1; }; done
	[ "$($ADD/bin/hi)" = "hi from the local store" ] || return 1
	$W/bin/nix-store --version > /dev/null
}
startb
check "builder ready, running nix-store from the local store" waitready
check "first start: local paths valid, readable, runnable" localok
check "first start: verify --check-contents clean" verify

# Rotation 1 while a build writes, renames and deletes in its output
# (its cwd is in the old overlay).
cat > /busy.sh <<'EOF3'
mkdir $out; cd $out
echo one > a
touch /tmp/mid
while [ ! -e /tmp/go ]; do sleep 0.1; done
echo two > b; mv a c; rm b; mkdir d; echo e > d/e; mv d dd
echo gone > $out/abs; rm $out/abs; echo done > done
EOF3
cat > /busy.nix <<EOF2
derivation { name = "busy"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ /busy.sh ]; }
EOF2
nix-build /busy.nix --no-out-link > /tmp/busyout 2> /tmp/busyerr &
BB=$!
while [ ! -e /tmp/mid ]; do sleep 0.1; done
echo HOST-CHANGE-STORE
publish
check "rotation 1 while the build runs" strata builder rotate --api $S
touch /tmp/go
check "the build that spanned the rotation succeeds" wait $BB
OUT=$(cat /tmp/busyout)
check "its output holds what it wrote, renamed and deleted" sh -c "[ \"\$(cat $OUT/c)\" = one ] && [ \"\$(cat $OUT/dd/e)\" = e ] && [ -f $OUT/done ] && [ ! -e $OUT/a ] && [ ! -e $OUT/b ] && [ ! -e $OUT/abs ] && [ ! -e $OUT/d ]"
check "its output verifies" nix-store --verify-path $OUT
check "rotation 1: swapped with $METHOD" sh -c "strata status --api $S --json | grep -q '\"swap_method\": \"$METHOD\"'"
check "rotation 1: local paths valid, readable, runnable" localok
check "rotation 1: verify --check-contents clean" verify

echo HOST-CHANGE-STORE
publish
check "rotation 2" strata builder rotate --api $S
G=$(newest)
check "rotation 2: on the newest generation" sh -c "strata status --api $S --json | grep -q '\"generation\": $G,'"
check "rotation 2: local paths valid, readable, runnable" localok
check "rotation 2: verify --check-contents clean" verify

kill $BPID; wait $BPID
startb
check "agent restart: ready again" waitready
check "agent restart: local paths valid, readable, runnable" localok
check "agent restart: verify --check-contents clean" verify
check "agent restart: nothing dropped from the DB" sh -c "$W/bin/nix-store --check-validity \$(cat /before) $OUT"
check "one overlay on /nix/store, one local store bind" sh -c "[ \$(grep -c ' /nix/store overlay ' /proc/mounts) -eq 1 ] && [ \$(grep -c ' /var/lib/strata/builder/local ' /proc/mounts) -eq 1 ]"
check "no NFS errors in dmesg" nfs_dmesg_clean
check "builder log has no error" sh -c "! grep -q 'level=ERROR' /builder.log"
grep -iE 'level=(warn|error)' /builder.log | tail -20
`
