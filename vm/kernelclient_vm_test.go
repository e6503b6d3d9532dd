//go:build vm

package vm

import (
	"context"
	"path/filepath"
	"strconv"
	"testing"
)

// TestKernelClient mounts a btrfs read-only snapshot exported by server/nfs
// (in this process) with the Linux NFSv3 client of each guest kernel, with
// the builders' documented options, and checks: the whole tree and every
// file's sha256 equal the host's; a 20,000-entry directory lists completely
// without duplicates; the mount is read-only; an overlay on top creates,
// copies up on append and deletes with a 0/0 whiteout while the lower stays
// unchanged; a user who owns none of the files lists and reads them through
// the overlay; the kernel logs no NFS errors.
func TestKernelClient(t *testing.T) {
	store := btrfsGeneration(t, func(store string) { testTree(t, store, true) })
	want := writeManifest(t, store)
	wantDir := writeManifest(t, filepath.Join(store, "dir"))
	vmtool := buildStatic(t, "github.com/strata-nix/strata/vm/internal/vmtool")
	port := serveInProcess(t, map[uint64]string{1: store})
	for _, k := range []Kernel{Kernel612, Kernel61} {
		t.Run(k.String(), func(t *testing.T) {
			res := Boot(context.Background(), t, Guest{
				Kernel: k,
				Env:    map[string]string{"P": strconv.Itoa(port)},
				Files: []File{
					{Guest: "/bin/vmtool", Host: vmtool},
					{Guest: "/host.manifest", Data: want},
					{Guest: "/host-dir.manifest", Data: wantDir},
				},
				Script: checkFuncs + kernelClientScript,
			})
			requireChecks(t, res, 14)
		})
	}
}

const kernelClientScript = `
mkdir -p /mnt/gen1 /ovl /merged
t0=$(cut -d' ' -f1 /proc/uptime)
check "mount /gen/1 with the builder options" mount -t nfs -o "$(nfsopts $P 10.0.2.2)" 10.0.2.2:/gen/1 /mnt/gen1
grep ' /mnt/gen1 ' /proc/mounts
check "mount is ro, hard, nolock, nconnect=4" sh -c "grep ' /mnt/gen1 ' /proc/mounts | grep -q 'ro,.*hard.*nolock.*nconnect=4'"
check "tree and sha256 of every file equal the host snapshot" vmtool compare /host.manifest /mnt/gen1
t1=$(cut -d' ' -f1 /proc/uptime)
echo "TIMING manifest over NFS: $t0 -> $t1 s (guest uptime)"
n=$(ls -1 /mnt/gen1/many | wc -l); u=$(ls -1 /mnt/gen1/many | sort -u | wc -l)
echo "many/: $n entries, $u unique"
check "20,000-entry directory lists completely" [ "$n" -eq 20000 ]
check "20,000-entry directory has no duplicates" [ "$u" -eq 20000 ]
check "writes to the export fail with EROFS" sh -c "! touch /mnt/gen1/new 2>/tmp/err && grep -q 'Read-only file system' /tmp/err"
mount -t tmpfs tmpfs /ovl && mkdir -p /ovl/upper /ovl/work
check "overlay with the NFS mount as lower" mount -t overlay overlay -o lowerdir=/mnt/gen1,upperdir=/ovl/upper,workdir=/ovl/work /merged
echo created > /merged/created.txt
check "create in overlay lands in upper" sh -c '[ "$(cat /ovl/upper/created.txt)" = created ]'
lower=$(sha256sum < /mnt/gen1/dir/a.txt)
echo appended >> /merged/dir/a.txt
check "append copies up: old content then new" sh -c "head -c 100 /merged/dir/a.txt | cmp -s - /mnt/gen1/dir/a.txt && [ \"\$(tail -c 9 /merged/dir/a.txt)\" = appended ] && [ -f /ovl/upper/dir/a.txt ]"
rm /merged/dir/rmme.txt
check "delete leaves a whiteout char dev 0/0" sh -c "[ ! -e /merged/dir/rmme.txt ] && [ -c /ovl/upper/dir/rmme.txt ] && [ \"\$(stat -c '%t %T' /ovl/upper/dir/rmme.txt)\" = '0 0' ]"
echo 3 > /proc/sys/vm/drop_caches
check "lower dir/ unchanged after overlay writes" vmtool compare /host-dir.manifest /mnt/gen1/dir
check "lower file content unchanged" sh -c "[ \"\$(sha256sum < /mnt/gen1/dir/a.txt)\" = '$lower' ]"
# A user who owns nothing in the tree lists and reads it through the
# overlay: overlayfs asks the NFS lower for each inode's ACL (NFSACL GETACL).
echo 'nobody:x:65534:65534:nobody:/:/bin/sh' >> /etc/passwd
check "a user who does not own the files lists and reads lower files through the overlay" su -s /bin/sh nobody -c "ls /merged/dir/sub/deeper > /dev/null && cmp -s /merged/dir/sub/deeper/leaf /mnt/gen1/dir/sub/deeper/leaf"
umount /merged
check "no kernel NFS errors in dmesg" nfs_dmesg_clean
`
