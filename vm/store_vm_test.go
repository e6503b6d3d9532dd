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

// TestBuilderGarbageCollection (6.12 and 6.1 guests, kernel NFS client):
//   - a user who does not own them (a build user) lists and reads
//     generation files through the overlay;
//   - a builder pointed at a server whose nfs.allow leaves it out says so
//     in status and log (address and allowlist) and mounts nothing;
//   - a builder configured with mount.options noacl is refused at start,
//     naming noacl and why (build users could not read the generation);
//   - a sandboxed build (sandbox = true, nixbld build users, as NixOS runs
//     it) whose inputs are a 16 MiB single-file path and a directory path
//     of the generation, then nix-store --optimise: the upper grows by no
//     more than the output and its .drv plus metadata (bytes printed);
//   - after that local build and a rotation, nix-collect-garbage -d frees
//     the unreferenced local output, while a stat loop over generation
//     files sees no failure, and no generation path is invalid or hidden
//     by a whiteout;
//   - a publish that adds a path referring to a generation path, then a
//     "reboot" (agent killed, every mount gone): the agent is READY and
//     every path of the newest generation is valid and readable.
func TestBuilderGarbageCollection(t *testing.T) {
	testenv.RequireRoot(t)
	strata := buildStatic(t, "github.com/strata-nix/strata/cmd/strata")
	statloop := buildStatic(t, "github.com/strata-nix/strata/internal/cmd/statloop")
	for _, k := range []Kernel{Kernel612, Kernel61} {
		t.Run(k.String(), func(t *testing.T) {
			mnt := testenv.LoopBtrfs(t, "1G")
			testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(mnt, "nix"))
			central := nixtest.New(t, mnt)
			central.Fill(t)
			big := central.AddText(t, "big-input.tar", strings.Repeat("sixteen MiB of generation input\n", 16<<20/32))
			dirIn := central.AddTree(t, "dir-input", map[string]string{"data.txt": strings.Repeat("d", 5000), "sub/more": "more\n"})
			api, nfsPort := freePort(t), freePort(t)
			startStrataServer(t, strata, mnt, central, api, nfsPort)
			waitGenerations(t, api, 1)

			// A second server that admits no builder of this test.
			mnt2 := testenv.LoopBtrfs(t, "1G")
			testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(mnt2, "nix"))
			central2 := nixtest.New(t, mnt2)
			central2.AddText(t, "other", "other store\n")
			api2, nfs2 := freePort(t), freePort(t)
			startStrataServerAllow(t, strata, mnt2, central2, api2, nfs2, "[10.99.0.0/16]")
			waitGenerations(t, api2, 1)

			onLine := hostChanges(t, central, map[string]func(){
				"HOST-ADD-REF": func() {
					t.Logf("added %s", central.Build(t, "uses-dir-input", `mkdir $out; cat $in0/data.txt > $out/copy`, dirIn))
				},
			})
			res := Boot(context.Background(), t, Guest{
				Kernel: k,
				Nix:    true,
				Env: map[string]string{"API": strconv.Itoa(api), "NFS": strconv.Itoa(nfsPort), "API2": strconv.Itoa(api2),
					"NFS2": strconv.Itoa(nfs2), "BIG": big, "DIRIN": dirIn},
				Files: []File{
					{Guest: "/bin/strata", Host: strata},
					{Guest: "/bin/statloop", Host: statloop},
					{Guest: "/token", Data: []byte("vm-test-token\n")},
				},
				Script:   checkFuncs + storeCommon + gcScript,
				Timeout:  25 * time.Minute,
				MemoryMB: 2048,
				OnLine:   onLine,
			})
			requireChecks(t, res, 27)
		})
	}
}

const gcScript = `
echo 'nixbld:x:30000:nixbld1' >> /etc/group
echo 'nixbld1:x:30001:30000:nix build user:/var/empty:/bin/false' >> /etc/passwd
cat > /etc/strata/builder.yaml <<EOF2
server:
  api: http://10.0.2.2:$API
  nfs: 10.0.2.2:$NFS
rotate:
  check_interval: 1h
EOF2
startb
check "builder ready" waitready
# Every generation file is owned by root: a build user (or anyone else)
# reading one through the overlay makes overlayfs ask the NFS lower for its
# ACL (NFSACL GETACL, answered by the server).
check "a user who does not own them lists and reads generation files through the overlay" su -s /bin/sh nixbld1 -c "ls $DIRIN/sub > /dev/null && [ \$(cat $DIRIN/data.txt | wc -c) -eq 5000 ] && [ \$(wc -c < $BIG) -eq 16777216 ]"

# A server whose nfs.allow leaves this builder out. The second builder on
# this guest uses a chroot store (nix.store: /nix2), whose paths are named
# in /nix/store as the server's are: a store.dir of /nix2/store would be
# refused before any NFS call (generations of another store dir).
mkdir -p /nix2/nix/store /nix2/nix/var/nix
cat > /etc/strata/b2.yaml <<EOF2
server:
  api: http://10.0.2.2:$API2
  nfs: 10.0.2.2:$NFS2
store:
  dir: /nix2/nix/store
nix:
  store: /nix2
  state_dir: /nix2/nix/var/nix
state_dir: /var/lib/strata/b2
swap:
  staging_dir: /run/strata/swap2
EOF2
strata builder --config /etc/strata/b2.yaml > /b2.log 2>&1 &
B2=$!
S2=unix:/var/lib/strata/b2/api.sock
i=0; until strata status --api $S2 --json 2>/dev/null | grep -q 'refuses NFS' || [ $i -ge 300 ]; do sleep 0.1; i=$((i+1)); done
strata status --api $S2
check "status names the refusal, the address the server sees and its nfs.allow" sh -c "strata status --api $S2 --json > /tmp/s2; grep -q 'refuses NFS connections from this builder' /tmp/s2 && grep -q 'as 127.0.0.1, which is not in its nfs.allow' /tmp/s2 && grep -q '10.99.0.0/16' /tmp/s2 && grep -q '\"ready\": false' /tmp/s2"
check "the log says so" grep -q 'refuses NFS connections from this builder' /b2.log
check "nothing mounted for the refused builder" sh -c "! grep -qE ' /nix2/nix/store |/var/lib/strata/b2/' /proc/mounts"
kill $B2; wait $B2

# A builder configured to mount with noacl (build users could not read
# through its overlay) is refused before it mounts anything, naming noacl.
mkdir -p /nix3/nix/store /nix3/nix/var/nix
cat > /etc/strata/b3.yaml <<EOF2
server:
  api: http://10.0.2.2:$API
  nfs: 10.0.2.2:$NFS
mount:
  options: [noacl]
store:
  dir: /nix3/nix/store
nix:
  store: /nix3
  state_dir: /nix3/nix/var/nix
state_dir: /var/lib/strata/b3
swap:
  staging_dir: /run/strata/swap3
EOF2
rc=0; strata builder --config /etc/strata/b3.yaml > /b3.log 2>&1 || rc=$?
cat /b3.log
check "a builder with mount.options noacl is refused (exit 2), naming the option and why; nothing mounted" sh -c "[ $rc = 2 ] && grep -q '\"noacl\"' /b3.log && grep -q 'Operation not supported' /b3.log && ! grep -qE ' /nix3/nix/store |/var/lib/strata/b3/' /proc/mounts"
check "the main builder's mount answers POSIX ACL queries" sh -c "! grep -q 'POSIX ACL' /builder.log"

# Sandboxed build on generation inputs, then optimise.
SH=$(readlink -f /bin/sh)
NIXOPTS="--option sandbox true --option build-users-group nixbld --option sandbox-paths /bin/sh=$SH"
cat > /sb.nix <<EOF2
derivation { name = "sandboxed"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "mkdir \$out; wc -c < \$big > \$out/size; cat \$dir/data.txt \$dir/sub/more | wc -c > \$out/dirsize; [ -e /var/lib/strata ] || echo yes > \$out/sandboxed; id -u > \$out/uid" ];
  big = builtins.storePath "$BIG"; dir = builtins.storePath "$DIRIN"; }
EOF2
U0=$(du -sk $UP | cut -f1)
# Nix's sandbox pivot_roots, which the initramfs root (rootfs, the
# namespace root) refuses: build from a recursive bind of / instead, as a
# booted system's root is a real mount.
mkdir -p /newroot && mount --rbind / /newroot
check "sandboxed build (sandbox = true, build users) on a 16 MiB file and a directory of the generation" sh -c "chroot /newroot nix-build /sb.nix --no-out-link $NIXOPTS > /tmp/sbout 2> /tmp/sberr || { cat /tmp/sberr; exit 1; }"
umount -l /newroot
SB=$(cat /tmp/sbout)
check "it read both inputs" sh -c "[ \$(cat $SB/size) -eq 16777216 ] && [ \$(cat $SB/dirsize) -eq 5005 ]"
echo "builder uid in the sandbox: $(cat $SB/uid)"
check "the build ran in the sandbox (no host paths) and not as root" sh -c "[ \"\$(cat $SB/sandboxed)\" = yes ] && [ \$(cat $SB/uid) -ne 0 ]"
check "nix-store --optimise" sh -c "nix-store --optimise > /tmp/opt 2>&1 || { cat /tmp/opt; exit 1; }"
tail -2 /tmp/opt
ls -ls $UP/$(basename $BIG) $UP/$(basename $DIRIN)/data.txt
check "the 16 MiB input and a file of the directory input are hard-linked, and the upper holds them as metadata only (0 data blocks)" sh -c "[ \$(stat -c %h $BIG) -ge 2 ] && [ \$(stat -c %h $DIRIN/data.txt) -ge 2 ] && [ \$(du -k $UP/\$(basename $BIG) | cut -f1) -eq 0 ] && [ \$(du -k $UP/\$(basename $DIRIN)/data.txt | cut -f1) -eq 0 ]"
U1=$(du -sk $UP | cut -f1)
O=$(du -sk $SB $(nix-store -qd $SB) | awk '{s+=$1} END {print s}')
echo "UPPER before=$((U0*1024)) after=$((U1*1024)) growth=$(((U1-U0)*1024)) bytes; output+drv=$((O*1024)) bytes"
check "upper grew by no more than the output and its .drv plus 256 KiB of metadata" [ $((U1-U0)) -le $((O+256)) ]
sleep 6
strata status --api $S | grep upper
check "status: nothing of the generation copied up with data" sh -c "strata status --api $S --json | grep -q '\"from_lowers_bytes\": 0,'"

# A rotation, then garbage collection under a stat loop.
echo HOST-CHANGE-STORE
publish
check "rotation" strata builder rotate --api $S
G=$(newest)
genpaths $G > /genpaths
find $(cat /genpaths) -type f | head -200 > /genfiles
statloop -stop /tmp/stop -ready /tmp/ready $(cat /genfiles) > /tmp/loop 2>&1 &
LPID=$!
while [ ! -e /tmp/ready ]; do sleep 0.1; done
t0=$(cut -d' ' -f1 /proc/uptime)
check "nix-collect-garbage -d" sh -c "nix-collect-garbage -d > /tmp/gc 2>&1 || { cat /tmp/gc; exit 1; }"
t1=$(cut -d' ' -f1 /proc/uptime)
echo "TIMING nix-collect-garbage -d: $t0 -> $t1 s (guest uptime)"
tail -3 /tmp/gc
touch /tmp/stop; wait $LPID; cat /tmp/loop
check "stat loop over generation files during GC: 0 failures" grep -q 'failures=0 heldfail=0' /tmp/loop
check "every generation path still valid" sh -c "nix-store --check-validity \$(cat /genpaths)"
check "no generation path has a whiteout in the upper" sh -c "for p in \$(cat /genpaths); do [ -c $UP/\$(basename \$p) ] && { echo whiteout: \$p; exit 1; }; done; exit 0"
check "the unreferenced local output was freed" sh -c "! nix-store --check-validity $SB 2>/dev/null && [ ! -e $SB ]"

# A path referring to a generation path, then a reboot. The host adds the
# .drv before it builds the output: publish until a generation has it.
echo HOST-ADD-REF
until publish && strata registration --api 10.0.2.2:$API $(newest) | grep -q -- '-uses-dir-input$'; do sleep 0.5; done
kill -9 $BPID; wait $BPID 2>/dev/null
for i in 1 2 3; do umount -l /nix/store 2>/dev/null; done
for m in $(awk '$2 ~ /^\/var\/lib\/strata\/builder\// {print $2}' /proc/mounts | sort -r); do umount -l $m; done
check "reboot: no strata mount left" sh -c "! grep -qE ' /nix/store |/var/lib/strata/builder/' /proc/mounts"
startb
check "after the reboot the agent is READY" waitready
check "rotation to the newest generation" strata builder rotate --api $S
G=$(newest)
genpaths $G > /genpaths2
check "every path of generation $G valid and readable" sh -c "nix-store --check-validity \$(cat /genpaths2) && for p in \$(cat /genpaths2); do [ -e \$p ] || exit 1; done"
check "the new path reads its generation input" sh -c "cat /nix/store/*-uses-dir-input/copy | wc -c | grep -qx 5000"
check "verify --check-contents clean" verify
check "no NFS errors in dmesg" nfs_dmesg_clean
grep -iE 'level=(warn|error)' /builder.log | tail -20
`
