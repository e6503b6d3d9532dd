//go:build vm

package vm

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/testenv"
)

// buildTestBinary compiles a package's tests (CGO_ENABLED=0, with tags) into
// a static binary, or fails t (skips outside CI) when it has no tests.
func buildTestBinary(t *testing.T, pkg, tags string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), filepath.Base(pkg)+".test")
	cmd := exec.Command("go", "test", "-c", "-tags", tags, "-o", out, pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go test -c %s: %v\n%s", pkg, err, b)
	}
	_, err := os.Stat(out)
	testenv.Require(t, err == nil, pkg+" has no tests to run in the guest")
	return out
}

// TestOpenZFS boots a 6.12 guest with OpenZFS 2.3 and a pool on a
// partitioned virtio disk, runs the snapshot/zfs conformance tests (go-zfs
// against the real zfs tools) in it, then serves an explicitly mounted ZFS
// snapshot with server/nfs inside the guest to the guest's own NFS client and
// checks: the NFS view equals the host tree (the snapshot's, not the live
// filesystem's changed content); file handles, an open file and a held
// directory survive dropping every cache, a lazy remount of the snapshot,
// and a SIGKILL restart of the export that then serves the new mount.
func TestOpenZFS(t *testing.T) {
	treeDir := filepath.Join(t.TempDir(), "tree")
	testTree(t, treeDir, false)
	want := writeManifest(t, treeDir)
	tarball := filepath.Join(t.TempDir(), "tree.tar")
	testenv.Run(t, "tar", "--numeric-owner", "--owner=0", "--group=0", "-cf", tarball, "-C", treeDir, ".")
	zfsTest := buildTestBinary(t, "github.com/strata-nix/strata/snapshot/zfs", "integration")
	res := Boot(context.Background(), t, Guest{
		Kernel:    Kernel612,
		ZFS:       true,
		DiskBytes: 2 << 30,
		Timeout:   20 * time.Minute,
		Files: []File{
			{Guest: "/bin/vmtool", Host: buildStatic(t, "github.com/strata-nix/strata/vm/internal/vmtool")},
			{Guest: "/bin/nfsserve", Host: buildStatic(t, "github.com/strata-nix/strata/vm/internal/nfsserve")},
			{Guest: "/bin/zfs.test", Host: zfsTest},
			{Guest: "/host.manifest", Data: want},
			{Guest: "/tree.tar", Host: tarball},
		},
		Script: checkFuncs + openZFSScript,
	})
	requireChecks(t, res, 23)
	if !strings.Contains(res.Output, "--- PASS: TestConformance") {
		t.Fatalf("the zfs conformance test did not run")
	}
}

const openZFSScript = `
echo "OpenZFS module $(cat /sys/module/zfs/version), $(zfs version 2>&1 | head -n 1)"
check "partition /dev/vda (whole-disk vdevs need udev)" sh -c "printf 'n\np\n1\n\n\nw\n' | fdisk /dev/vda >/dev/null 2>&1; [ -b /dev/vda1 ]"
check "zpool create tank on /dev/vda1" zpool create -f -o ashift=12 -O mountpoint=none tank /dev/vda1
check "snapshot/zfs conformance tests pass with STRATA_TEST_ZPOOL=tank" sh -c "CI=true STRATA_TEST_ZPOOL=tank /bin/zfs.test -test.v -test.count=1 > /tmp/zfs.out 2>&1; rc=\$?; cat /tmp/zfs.out; exit \$rc"
check "no zfs test skipped" sh -c "! grep -q -- '--- SKIP' /tmp/zfs.out"

check "create tank/store" zfs create -o mountpoint=/tank/store tank/store
check "unpack the host tree into tank/store" tar xf /tree.tar -C /tank/store
check "snapshot tank/store@strata-1" zfs snapshot tank/store@strata-1
mkdir -p /srv && mount -t tmpfs srv /srv && mkdir -p /srv/s1 /srv/state /mnt/gen1
check "mount the snapshot explicitly (mount -t zfs)" mount -t zfs tank/store@strata-1 /srv/s1
check "ZFS snapshot equals the host tree" vmtool compare /host.manifest /srv/s1
echo changed > /tank/store/dir/a.txt && rm /tank/store/dir/rmme.txt

startsrv() {
	: > /tmp/srv.out
	nfsserve -listen 127.0.0.1:2049 -state /srv/state -gen 1=/srv/s1 > /tmp/srv.out 2>>/tmp/srv.err &
	spid=$!
	i=0; while ! grep -q LISTEN /tmp/srv.out; do i=$((i+1)); [ $i -lt 100 ] || return 1; sleep 0.1; done
}
check "start the export of /srv/s1 in the guest" startsrv
check "mount /gen/1 from the guest's export" mount -t nfs -o "$(nfsopts 2049 127.0.0.1)" 127.0.0.1:/gen/1 /mnt/gen1
check "NFS view equals the host tree (the snapshot, not the changed live fs)" vmtool compare /host.manifest /mnt/gen1

big=sizes/f7-8388608
bigsha=$(grep " $big\$" /host.manifest | cut -d' ' -f6)
exec 3< /mnt/gen1/$big
dd bs=1048576 count=3 <&3 > /tmp/part1 2>/dev/null
(cd /mnt/gen1/dir/sub && exec sleep 100000) &
hpid=$!
sleep 1
leafsha=$(grep " dir/sub/deeper/leaf\$" /host.manifest | cut -d' ' -f6)
held_dir_ok() { [ "$(ls /proc/$hpid/cwd)" = deeper ] && [ "$(sha256sum < /proc/$hpid/cwd/deeper/leaf | cut -d' ' -f1)" = "$leafsha" ]; }

echo 3 > /proc/sys/vm/drop_caches
check "after drop_caches: NFS view equals the host tree" vmtool compare /host.manifest /mnt/gen1
check "after drop_caches: held directory still lists and reads" held_dir_ok
dd bs=1048576 count=2 <&3 > /tmp/part2 2>/dev/null

check "lazy umount of the snapshot under the export" umount -l /srv/s1
check "mount the snapshot again" mount -t zfs tank/store@strata-1 /srv/s1
echo 3 > /proc/sys/vm/drop_caches
check "after remount: NFS view equals the host tree" vmtool compare /host.manifest /mnt/gen1
check "after remount: held directory still lists and reads" held_dir_ok

kill -9 $spid; wait $spid 2>/dev/null
check "restart the export: it opens the new snapshot mount" startsrv
echo 3 > /proc/sys/vm/drop_caches
check "after restart on the new mount: NFS view equals the host tree" vmtool compare /host.manifest /mnt/gen1
check "after restart: held directory still lists and reads" held_dir_ok
cat <&3 > /tmp/part3
check "file held open since before drop_caches, remount and restart reads whole and right" sh -c "[ \"\$(cat /tmp/part1 /tmp/part2 /tmp/part3 | sha256sum | cut -d' ' -f1)\" = $bigsha ]"
exec 3<&-
kill $hpid
check "no kernel NFS errors in dmesg" nfs_dmesg_clean
cat /tmp/srv.err
`
