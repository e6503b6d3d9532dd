//go:build deploy

package deploy

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/vm"
)

const guestKernel = "6.12.117+deb12-amd64"

// freeAddr returns a loopback TCP address nobody listens on.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func port(addr string) string { _, p, _ := net.SplitHostPort(addr); return p }

// hostServer runs `strata server` on the host over a loop-backed btrfs
// central store with real Nix paths, and returns its API and NFS addresses
// and the store.
func hostServer(t *testing.T, bin string) (api, nfs string, paths []string) {
	t.Helper()
	mnt := testenv.LoopBtrfs(t, "1G")
	testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(mnt, "nix"))
	st := nixtest.New(t, mnt)
	paths = st.Fill(t)
	os.Mkdir(filepath.Join(mnt, "snaps"), 0o700)
	api, nfs = freeAddr(t), freeAddr(t)
	cfg := filepath.Join(t.TempDir(), "server.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf("store:\n  root: %s\nsnapshot:\n  snapshot_dir: %s\nstate_dir: %s\npublish:\n  interval: 0s\napi:\n  listen: %s\nnfs:\n  listen: %s\n  allow: [127.0.0.0/8]\n",
		st.NixRoot(), filepath.Join(mnt, "snaps"), filepath.Join(t.TempDir(), "state"), api, nfs)), 0o600)
	cmd := exec.Command(bin, "server", "--config", cfg)
	logf, _ := os.Create(filepath.Join(t.TempDir(), "server.log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		logf.Close()
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		res, err := http.Get("http://" + api + "/v1/generations")
		if err == nil {
			b, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if bytes.Contains(b, []byte(`"id": 1`)) {
				return api, nfs, paths
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("host strata server: no generation 1 within 60 s (%v)", err)
		}
		time.Sleep(300 * time.Millisecond)
	}
}

// guestImage writes an ext4 disk image of rootfs plus what the guest needs:
// ssh key, static network for qemu's user net, nix.conf, and the kernel
// modules (with depmod) so modprobe in the guest finds them.
func guestImage(t *testing.T, rootfs, pub string) string {
	t.Helper()
	dir := t.TempDir()
	for _, d := range []string{"upper", "work", "root"} {
		os.MkdirAll(filepath.Join(dir, d), 0o755)
	}
	root := filepath.Join(dir, "root")
	testenv.Run(t, "mount", "-t", "overlay", "overlay", "-o",
		"lowerdir="+rootfs+",upperdir="+filepath.Join(dir, "upper")+",workdir="+filepath.Join(dir, "work"), root)
	defer syscall.Unmount(root, syscall.MNT_DETACH)
	write := func(p, s string, mode os.FileMode) {
		p = filepath.Join(root, p)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(s), mode); err != nil {
			t.Fatal(err)
		}
	}
	write("root/.ssh/authorized_keys", pub, 0o600)
	os.Chmod(filepath.Join(root, "root/.ssh"), 0o700)
	write("etc/hostname", "strata-vm\n", 0o644)
	write("etc/fstab", "/dev/vda / ext4 rw,noatime 0 1\n", 0o644)
	write("etc/systemd/network/10-eth0.network", "[Match]\nName=eth0\n\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n", 0o644)
	os.Symlink("/lib/systemd/system/systemd-networkd.service", filepath.Join(root, "etc/systemd/system/multi-user.target.wants/systemd-networkd.service"))
	write("etc/nix/nix.conf", "build-users-group =\nsandbox = false\nsubstituters =\n", 0o644)
	// A builder machine has a Nix store already (Debian's nix-bin does not
	// make one until first use).
	for _, d := range []string{"nix/store", "nix/var/nix/db"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	// The guest kernel's modules for modprobe (systemd-modules-load, the
	// role): the ones the initramfs loads, from the VM tier's cache.
	kmods := filepath.Join(vm.CacheDir(), "kernel", guestKernel, "lib", "modules", guestKernel)
	os.MkdirAll(filepath.Join(root, "lib", "modules"), 0o755)
	testenv.Run(t, "cp", "-a", kmods, filepath.Join(root, "lib", "modules")+"/")
	testenv.Run(t, "depmod", "-b", root, guestKernel)
	img := filepath.Join(dir, "disk.img")
	testenv.Run(t, "mkfs.ext4", "-q", "-L", "strata-vm", "-d", root, img, "3G")
	return img
}

// guestInitrd is the VM tier's base initramfs (busybox, virtio, NFS and
// overlay modules) plus ext4's modules and an /init that mounts /dev/vda
// and hands over to systemd with switch_root.
func guestInitrd(t *testing.T) (kernel, initrd string) {
	t.Helper()
	cache := vm.CacheDir()
	kernel = filepath.Join(cache, "kernel", guestKernel, "boot", "vmlinuz-"+guestKernel)
	bases, _ := filepath.Glob(filepath.Join(cache, "base", guestKernel+"-*-zfsnone-*.cpio"))
	testenv.Require(t, len(bases) > 0 && fileExists(kernel), "needs the VM tier's 6.12 kernel and base initramfs in "+cache+" (run make test-vm once)")
	dir := t.TempDir()
	x := filepath.Join(dir, "x")
	os.MkdirAll(filepath.Join(x, "lib", "modules"), 0o755)
	kmods := filepath.Join(cache, "kernel", guestKernel, "lib", "modules", guestKernel, "kernel")
	var order []string
	for _, m := range []string{"lib/crc16", "fs/mbcache", "fs/jbd2/jbd2", "crypto/crc32c_generic", "fs/ext4/ext4"} {
		name := filepath.Base(m)
		out, err := exec.Command("xz", "-dc", filepath.Join(kmods, m+".ko.xz")).Output()
		if err != nil {
			t.Fatalf("xz -dc %s: %v", m, err)
		}
		os.WriteFile(filepath.Join(x, "lib", "modules", "boot-"+name+".ko"), out, 0o644)
		order = append(order, "boot-"+name)
	}
	os.WriteFile(filepath.Join(x, "init"), []byte(`#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read m; do [ -n "$m" ] && insmod /lib/modules/$m.ko; done < /lib/modules/order
for m in `+strings.Join(order, " ")+`; do insmod /lib/modules/$m.ko || echo "insmod $m failed"; done
mount -t ext4 -o rw /dev/vda /newroot || { echo "STRATA-DEPLOY: cannot mount /dev/vda"; poweroff -f; }
umount /sys /proc
mount --move /dev /newroot/dev
exec switch_root /newroot /lib/systemd/systemd
`), 0o755)
	extra := filepath.Join(dir, "extra.cpio")
	cmd := exec.Command("sh", "-c", "cd "+x+" && find . | cpio -o -H newc --quiet > "+extra)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio: %v\n%s", err, out)
	}
	initrd = filepath.Join(dir, "initrd.img")
	testenv.Run(t, "sh", "-c", "cat "+bases[0]+" "+extra+" > "+initrd)
	return kernel, initrd
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// TestBuilderVM boots the deploy rootfs under qemu with systemd as PID 1
// (Debian's 6.12 kernel; the rootfs as an ext4 virtio disk), applies the
// strata_builder role to it from the host with ansible-playbook, and checks
// that the agent reached READY on a real kernel NFS mount of a strata
// server running on the host: systemctl is-active, the mounts, and
// nix-store --verify.
func TestBuilderVM(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommands(t, "qemu-system-x86_64", "mkfs.ext4", "depmod", "cpio", "xz", "ansible-playbook", "ssh", "btrfs", "nix-store")
	fs := rootfs(t)
	bin := buildStrata(t)
	key, pub := sshKey(t)
	api, nfs, paths := hostServer(t, bin)
	kernel, initrd := guestInitrd(t)
	img := guestImage(t, fs, pub)

	sshAddr := freeAddr(t)
	masked := []string{"apt-daily.timer", "apt-daily-upgrade.timer", "man-db.timer", "e2scrub_all.timer", "e2scrub_reap.service",
		"fstrim.timer", "systemd-networkd-wait-online.service", "rpc-statd-notify.service", "dpkg-db-backup.timer"}
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()
	qemu := exec.CommandContext(ctx, "qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-smp", "2", "-nodefaults",
		"-nographic", "-no-reboot", "-serial", "stdio", "-kernel", kernel, "-initrd", initrd,
		"-append", "console=ttyS0 panic=-1 tsc=reliable net.ifnames=0 quiet systemd.show_status=1 systemd.mask="+strings.Join(masked, " systemd.mask="),
		"-drive", "file="+img+",if=virtio,format=raw,cache=unsafe",
		"-netdev", "user,id=n0,hostfwd=tcp:"+sshAddr+"-:22", "-device", "virtio-net-pci,netdev=n0")
	console := filepath.Join(t.TempDir(), "console.log")
	cf, _ := os.Create(console)
	qemu.Stdout, qemu.Stderr = cf, cf
	start := time.Now()
	if err := qemu.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- qemu.Wait() }()
	defer func() {
		qemu.Process.Kill()
		<-exited
		cf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(console)
			fmt.Printf("--- guest console (last lines):\n%s\n", tail(string(b), 60))
		}
	}()
	g := &container{name: "strata-vm", addr: "127.0.0.1", key: key}
	port := port(sshAddr)
	g.sshOpts = []string{"-p", port}
	deadline := time.Now().Add(15 * time.Minute)
	for {
		if _, err := g.try("true"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("guest: no ssh within 15 minutes")
		}
		select {
		case err := <-exited:
			exited <- err // for the deferred cleanup
			t.Fatalf("guest: qemu exited before ssh answered: %v", err)
		case <-time.After(3 * time.Second):
		}
	}
	fmt.Printf("--- guest booted to ssh in %s (systemd is PID 1: %s)\n", time.Since(start).Round(time.Second), g.sh(t, "readlink /proc/1/exe"))

	_, apiPort, _ := net.SplitHostPort(api)
	_, nfsPort, _ := net.SplitHostPort(nfs)
	p := newPlayFor(t, "strata_builders", g, "ansible_port="+port, map[string]any{"strata_binary": bin,
		"strata_server_api": "http://10.0.2.2:" + apiPort, "strata_server_nfs": "10.0.2.2:" + nfsPort})
	p.playbook = filepath.Join(p.repoRoot, "deploy", "testdata", "vm.yml")
	p.run("strata_builder on the VM guest, waits for READY", nil)

	const unit = "strata-builder.service"
	if s := g.sh(t, "systemctl is-active "+unit); s != "active" {
		t.Fatalf("builder unit %s, want active", s)
	}
	mounts := g.sh(t, "cat /proc/mounts")
	var nfsGen1, storeOverlay bool
	for _, l := range strings.Split(mounts, "\n") {
		f := strings.Fields(l)
		if len(f) < 3 {
			continue
		}
		nfsGen1 = nfsGen1 || (f[2] == "nfs" && strings.HasPrefix(f[0], "10.0.2.2:") && strings.HasSuffix(f[0], "/gen/1"))
		storeOverlay = storeOverlay || (f[1] == "/nix/store" && f[2] == "overlay")
	}
	if !nfsGen1 || !storeOverlay {
		t.Fatalf("want a kernel NFS mount of 10.0.2.2:/gen/1 and an overlay on /nix/store in the guest:\n%s", mounts)
	}
	out := g.sh(t, "nix-store --verify 2>&1; echo rc=$?")
	if !strings.HasSuffix(out, "rc=0") {
		t.Fatalf("nix-store --verify in the guest: %s", out)
	}
	// The central store's paths are valid (imported) and readable there.
	g.sh(t, "nix-store --check-validity "+strings.Join(paths, " ")+" && cat "+paths[0]+"/* >/dev/null 2>&1 || ls "+paths[0])
	fmt.Printf("--- guest: %s active, /gen/1 mounted over NFS from the host, overlay on /nix/store, %d central paths valid, nix-store --verify rc=0\n%s\n",
		unit, len(paths), grepLines(mounts, " nfs ", "overlay"))
}
