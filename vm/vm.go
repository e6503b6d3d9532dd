// Package vm boots Debian kernels under QEMU (TCG) with a busybox initramfs
// to test strata against the real Linux NFS client, overlayfs and OpenZFS.
// It is a test helper: tests that use it carry the build tag "vm" and run as
// root with `go test -tags vm -p 1 ./vm/...` (make test-vm).
//
// A test describes a guest with Guest and calls Boot:
//
//	res := vm.Boot(ctx, t, vm.Guest{
//		Kernel: vm.Kernel612,
//		Script: "mount -t nfs -o ... 10.0.2.2:/gen/1 /mnt && ls /mnt",
//		Files:  []vm.File{{Guest: "/bin/helper", Host: helperPath}},
//	})
//	if res.Status != 0 { t.Fatalf(...) }
//
// The guest's /init loads the modules (virtio net and block, the NFSv3
// client, overlay; spl and zfs with Guest.ZFS), configures eth0 as 10.0.2.15
// with the host's loopback reachable as 10.0.2.2 (QEMU user networking: host
// servers listen on 127.0.0.1), mounts /proc, /sys, /dev and a tmpfs on /tmp,
// runs Script with /bin/sh (busybox; every applet is installed at its usual
// path), prints the kernel log if the script failed, prints the marker line
// "STRATA-VM-EXIT=<status>" and powers off. Boot returns the serial console
// and the script's exit status. Guest.OnLine sees each console line as it
// arrives, so a host-side test can act during the run (kill a server when the
// guest prints a marker, for example).
//
// Everything slow is built once into a cache (CacheDir: /var/cache/strata/vm
// or $STRATA_VM_CACHE), keyed by package versions: the kernel .debs and their
// extracted trees, spl/zfs built by DKMS (zfs-dkms 2.3.2 from
// bookworm-backports, for the 6.12 kernel), and the initramfs pieces (busybox
// and modules; OpenZFS userland; Debian's nix-bin with its libraries). On a
// fresh machine Boot first installs what it needs with apt (qemu-system-x86,
// busybox-static, kmod, xz-utils; for ZFS bookworm-backports with contrib,
// linux-headers for the kernel, zfs-dkms and zfsutils-linux; nix-bin for
// Nix). A warm start takes seconds; /dev/kvm is never used (-accel tcg).
// STRATA_VM_KERNEL_612 or STRATA_VM_KERNEL_61 (a release such as
// "6.12.117+deb12-amd64") pins the kernel instead of the newest apt knows.
//
// The suites of this package (build tag vm) are:
//   - TestKernelClient: a btrfs snapshot exported by server/nfs, mounted
//     with the builders' options by the 6.12 and 6.1 clients: tree and
//     sha256s, a 20,000-entry directory, read-only, overlay on top, dmesg.
//   - TestServerRestart: reads through held fds and fresh opens while the
//     export (a child process) is killed with SIGKILL and restarted.
//   - TestOpenZFS: snapshot/zfs's tests against a real pool, and a ZFS
//     snapshot export whose handles survive cache drops, remount, restart.
//   - TestNixOnMount: overlay on /nix/store over the export, load-db,
//     verify --check-contents, nix-build into the upper.
//   - TestBootSmoke: each kernel boots and reports status and kernel log.
package vm

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/testenv"
)

// Kernel selects the guest kernel.
type Kernel int

const (
	// Kernel612 is the newest 6.12 kernel from bookworm-backports: it has
	// MOVE_MOUNT_BENEATH, and OpenZFS 2.3.2 is built for it.
	Kernel612 Kernel = iota
	// Kernel61 is Debian 12's stock 6.1 kernel: no MOVE_MOUNT_BENEATH (the
	// builder's fallback swap), no ZFS.
	Kernel61
)

// String returns "6.12" or "6.1".
func (k Kernel) String() string {
	switch k {
	case Kernel612:
		return "6.12"
	case Kernel61:
		return "6.1"
	}
	return "Kernel(" + strconv.Itoa(int(k)) + ")"
}

func (k Kernel) envOverride() string {
	if k == Kernel612 {
		return "STRATA_VM_KERNEL_612"
	}
	return "STRATA_VM_KERNEL_61"
}

// File is one extra file put into the guest: a copy of the host file Host
// (symlinks followed), or Data when Host is empty. Mode 0 keeps the host
// file's permissions (0644 for Data).
type File struct {
	Guest string
	Host  string
	Data  []byte
	Mode  os.FileMode
}

// Guest describes one boot.
type Guest struct {
	// Kernel to boot (default Kernel612).
	Kernel Kernel
	// Script is the test, run by busybox sh as /test.sh from /. Its exit
	// status is the run's Status.
	Script string
	// Env is exported to Script.
	Env map[string]string
	// Files are added to the initramfs (static binaries, test binaries, data).
	Files []File
	// ZFS loads spl and zfs and adds zfs, zpool, mount.zfs and zdb (6.12 only).
	ZFS bool
	// Nix adds Debian's nix-bin (nix, nix-store, nix-build, ... and their
	// libraries) and /etc/nix/nix.conf (sandbox = false, build-users-group =).
	Nix bool
	// NixTrixie adds Debian trixie's Nix 2.26 under /opt/nix-trixie
	// (wrappers in NixTrixieBin, its own loader and glibc), next to Nix
	// (which also provides /etc/nix/nix.conf). Needs scripts/nix-trixie.sh.
	NixTrixie bool
	// Binaries are host dynamic binaries (e.g. "/usr/bin/rsync") added at
	// the same paths in the guest with every library they load (ldd).
	Binaries []string
	// DiskBytes > 0 attaches an empty sparse virtio disk of that size as
	// /dev/vda (partition it before zpool create: no udev in the guest).
	DiskBytes int64
	// DiskPath, if set, is the host file behind /dev/vda instead of a fresh
	// one: it is created with DiskBytes if missing and kept, so a second
	// Boot with the same DiskPath sees what the first wrote (a reboot).
	DiskPath string
	// MemoryMB and CPUs default to 2048 and 2.
	MemoryMB, CPUs int
	// Timeout bounds the whole run from QEMU start (default 10 minutes).
	Timeout time.Duration
	// OnLine, if set, is called with every console line (without "\r\n"),
	// in order, from the goroutine reading the console; while it runs the
	// guest's console output waits. It must not call t.Fatal.
	OnLine func(line string)
	// Quiet stops Boot from logging each console line with t.Log.
	Quiet bool
	// HostFwd adds QEMU user-network forwards from host loopback into the
	// guest, as "tcp:127.0.0.1:HOSTPORT-:GUESTPORT" or "udp:...": the way
	// the host reaches a guest service (the guest reaches the host at
	// 10.0.2.2 by itself). Gossip needs both directions: see
	// cluster_vm_test.go.
	HostFwd []string
}

// Result is what a finished guest run gave.
type Result struct {
	// Output is the serial console, lines joined with "\n".
	Output string
	// Status is the exit status of Script as /init printed it.
	Status int
	// Elapsed is the QEMU wall time.
	Elapsed time.Duration
	// Prepare is the time spent preparing the kernel and initramfs.
	Prepare time.Duration
}

// ExitMarker starts the line /init prints after the script: ExitMarker+status.
const ExitMarker = "STRATA-VM-EXIT="

// initDone starts the line /init prints once the guest is set up, before
// the script runs.
const initDone = "STRATA-VM: init done"

// Boot prepares the guest (from the cache, building what is missing), boots
// it and waits for the script to finish. It fails t if the host lacks root
// (skips outside CI), the guest cannot be prepared, the run times out or the
// guest stops without printing its exit status. A non-zero Status is for the
// caller to judge.
func Boot(ctx context.Context, t testing.TB, g Guest) Result {
	t.Helper()
	testenv.RequireRoot(t)
	log := slog.New(slog.NewTextHandler(testWriter{t}, nil))
	start := time.Now()
	initrd, kernel, err := prepare(ctx, log, g, t.TempDir())
	if err != nil {
		t.Fatalf("prepare %s guest: %v", g.Kernel, err)
	}
	prep := time.Since(start)
	t.Logf("vm: %s guest prepared in %.1fs", g.Kernel, prep.Seconds())
	var res Result
	for attempt := 1; ; attempt++ {
		res, err = run(ctx, t, g, kernel, initrd)
		// A kernel that dies before /init ran (seen: an int3 Oops in
		// early initcalls while TCG's vCPU threads patch kernel text)
		// is the emulator's fault and ran nothing of the test: boot
		// again, at most twice.
		if err == nil || !errors.Is(err, errNoMarker) || strings.Contains(res.Output, initDone) || attempt == 3 {
			break
		}
		t.Logf("vm: %s guest died before its init ran (attempt %d); booting again. Last output:\n%s",
			g.Kernel, attempt, lastLines(res.Output, 15))
	}
	res.Prepare = prep
	if err != nil {
		t.Fatalf("%s guest: %v", g.Kernel, err)
	}
	t.Logf("vm: %s guest finished in %.1fs with status %d", g.Kernel, res.Elapsed.Seconds(), res.Status)
	return res
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// prepare returns the initrd for g (written into dir) and the kernel image.
func prepare(ctx context.Context, log *slog.Logger, g Guest, dir string) (initrd, kernel string, err error) {
	if g.ZFS && g.Kernel != Kernel612 {
		return "", "", fmt.Errorf("zfs needs Kernel612, not %s", g.Kernel)
	}
	c, unlock, err := openCache(log)
	if err != nil {
		return "", "", err
	}
	defer unlock()
	pkgs := append([]string(nil), hostPackages...)
	if g.Nix {
		pkgs = append(pkgs, "nix-bin")
	}
	if err := aptInstall(ctx, log, pkgs...); err != nil {
		return "", "", err
	}
	kver, err := pickKernel(ctx, log, g.Kernel, c.dir)
	if err != nil {
		return "", "", err
	}
	tree, err := c.kernelTree(ctx, kver)
	if err != nil {
		return "", "", err
	}
	var zfsMods []string
	zfsKey := "none"
	if g.ZFS {
		if zfsMods, zfsKey, err = c.zfsModules(ctx, kver); err != nil {
			return "", "", err
		}
	}
	parts := []string{}
	base, err := c.baseArchive(ctx, kver, tree, zfsMods, zfsKey)
	if err != nil {
		return "", "", err
	}
	parts = append(parts, base)
	if g.ZFS {
		p, err := c.zfsArchive(ctx)
		if err != nil {
			return "", "", err
		}
		parts = append(parts, p)
	}
	if g.Nix {
		p, err := c.nixArchive(ctx)
		if err != nil {
			return "", "", err
		}
		parts = append(parts, p)
	}
	if g.NixTrixie {
		p, err := c.nixTrixieArchive(ctx)
		if err != nil {
			return "", "", err
		}
		parts = append(parts, p)
	}
	if len(g.Binaries) > 0 {
		a := newArchive()
		if err := addDynamic(ctx, a, g.Binaries...); err != nil {
			return "", "", fmt.Errorf("add host binaries %v: %w", g.Binaries, err)
		}
		p := filepath.Join(dir, "binaries.cpio")
		if err := writeArchive(a, p); err != nil {
			return "", "", fmt.Errorf("write binaries archive: %w", err)
		}
		parts = append(parts, p)
	}
	runArch, err := runArchive(g)
	if err != nil {
		return "", "", err
	}
	own := filepath.Join(dir, "run.cpio")
	if err := writeArchive(runArch, own); err != nil {
		return "", "", fmt.Errorf("write run archive: %w", err)
	}
	parts = append(parts, own)
	initrd = filepath.Join(dir, "initrd.img")
	if err := concat(initrd, parts); err != nil {
		return "", "", fmt.Errorf("write initrd: %w", err)
	}
	return initrd, filepath.Join(tree, "boot", "vmlinuz-"+kver), nil
}

func concat(dst string, parts []string) error {
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	for _, p := range parts {
		in, err := os.Open(p)
		if err != nil {
			out.Close()
			return err
		}
		_, err = io.Copy(out, in)
		in.Close()
		if err != nil {
			out.Close()
			return err
		}
	}
	return out.Close()
}

// initScript is the guest's /init.
const initScript = `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin /mnt /root
/bin/busybox --install -s
export PATH=/sbin:/usr/sbin:/bin:/usr/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs tmpfs /run
ln -sf /proc/self/mounts /etc/mtab
while read m; do
	[ -n "$m" ] || continue
	insmod /lib/modules/$m.ko || echo "STRATA-VM: insmod $m failed"
done < /lib/modules/order
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
echo "` + initDone + ` after $(cut -d' ' -f1 /proc/uptime)s"
cd /
/bin/sh /test.sh
rc=$?
if [ $rc -ne 0 ]; then
	echo "STRATA-VM: script failed with status $rc; kernel log follows"
	dmesg
fi
sync
echo "` + ExitMarker + `$rc"
poweroff -f
`

// runArchive holds /init, /test.sh, /etc/passwd and the extra files.
func runArchive(g Guest) (*archive, error) {
	a := newArchive()
	if err := a.bytes("/init", []byte(initScript), 0o755); err != nil {
		return nil, err
	}
	var sb strings.Builder
	sb.WriteString("#!/bin/sh\n")
	keys := make([]string, 0, len(g.Env))
	for k := range g.Env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(&sb, "export %s=%s\n", k, shellQuote(g.Env[k]))
	}
	sb.WriteString(g.Script)
	sb.WriteString("\n")
	if err := a.bytes("/test.sh", []byte(sb.String()), 0o755); err != nil {
		return nil, err
	}
	if err := a.bytes("/etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"), 0o644); err != nil {
		return nil, err
	}
	if err := a.bytes("/etc/group", []byte("root:x:0:\nnogroup:x:65534:\n"), 0o644); err != nil {
		return nil, err
	}
	for _, f := range g.Files {
		var err error
		if f.Host != "" {
			err = a.file(f.Guest, f.Host, f.Mode)
		} else {
			mode := f.Mode
			if mode == 0 {
				mode = 0o644
			}
			err = a.bytes(f.Guest, f.Data, mode)
		}
		if err != nil {
			return nil, err
		}
	}
	return a, nil
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// qemuArgs returns the QEMU command line for g.
func qemuArgs(g Guest, kernel, initrd, disk string) []string {
	mem, cpus := g.MemoryMB, g.CPUs
	if mem == 0 {
		mem = 2048
	}
	if cpus == 0 {
		cpus = 2
	}
	args := []string{
		"-accel", "tcg", "-m", strconv.Itoa(mem), "-smp", strconv.Itoa(cpus),
		"-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
		"-kernel", kernel, "-initrd", initrd,
		// tsc=reliable: under TCG on a busy host the clocksource watchdog
		// declares the TSC unstable, and the static-key text poke that
		// follows races with the other vCPU ("Oops: int3" in
		// sched_clock_cpu, kernel panic). Seen twice on loaded 2-core hosts.
		"-append", "console=ttyS0 panic=-1 quiet loglevel=4 tsc=reliable",
		"-netdev", netdev(g.HostFwd), "-device", "virtio-net-pci,netdev=n0,romfile=",
	}
	if disk != "" {
		args = append(args, "-drive", "file="+disk+",if=virtio,format=raw,cache=unsafe")
	}
	return args
}

func netdev(fwds []string) string {
	s := "user,id=n0"
	for _, f := range fwds {
		s += ",hostfwd=" + f
	}
	return s
}

// errNoMarker means the guest stopped without printing its exit status.
var errNoMarker = errors.New("guest stopped without printing " + ExitMarker)

// parseExit returns the status from an exit marker line.
func parseExit(line string) (int, bool) {
	rest, ok := strings.CutPrefix(line, ExitMarker)
	if !ok {
		return 0, false
	}
	n, err := strconv.Atoi(strings.TrimSpace(rest))
	if err != nil {
		return 0, false
	}
	return n, true
}

func run(ctx context.Context, t testing.TB, g Guest, kernel, initrd string) (Result, error) {
	timeout := g.Timeout
	if timeout == 0 {
		timeout = 10 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	disk := g.DiskPath
	if disk == "" && g.DiskBytes > 0 {
		disk = filepath.Join(filepath.Dir(initrd), "disk.img")
	}
	if disk != "" {
		if _, err := os.Stat(disk); errors.Is(err, os.ErrNotExist) {
			if g.DiskBytes <= 0 {
				return Result{}, fmt.Errorf("create disk %s: DiskBytes not set", disk)
			}
			f, err := os.OpenFile(disk, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
			if err != nil {
				return Result{}, fmt.Errorf("create disk: %w", err)
			}
			err = f.Truncate(g.DiskBytes)
			f.Close()
			if err != nil {
				return Result{}, fmt.Errorf("create disk: %w", err)
			}
		}
	}
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", qemuArgs(g, kernel, initrd, disk)...)
	cmd.WaitDelay = 5 * time.Second
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return Result{}, err
	}
	cmd.Stderr = cmd.Stdout
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return Result{}, fmt.Errorf("start qemu: %w", err)
	}
	var (
		mu     sync.Mutex
		lines  []string
		status = -1
		found  bool
	)
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 4<<20)
		for sc.Scan() {
			line := strings.TrimRight(sc.Text(), "\r")
			mu.Lock()
			lines = append(lines, line)
			if n, ok := parseExit(line); ok {
				status, found = n, true
			}
			mu.Unlock()
			if !g.Quiet {
				t.Log("guest: " + line)
			}
			if g.OnLine != nil {
				g.OnLine(line)
			}
		}
	}()
	<-done
	waitErr := cmd.Wait()
	res := Result{Elapsed: time.Since(start)}
	mu.Lock()
	res.Output = strings.Join(lines, "\n")
	res.Status = status
	mu.Unlock()
	switch {
	case ctx.Err() != nil && !found:
		return res, fmt.Errorf("timed out after %s; last output:\n%s", timeout, lastLines(res.Output, 40))
	case !found:
		return res, fmt.Errorf("%w (qemu: %v); last output:\n%s", errNoMarker, waitErr, lastLines(res.Output, 40))
	}
	return res, nil
}
