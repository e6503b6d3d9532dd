//go:build vm

package replica

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/strata-nix/strata/vm"
)

// BenchmarkReplicateZFSInVM runs BenchmarkReplicateZFS in a 6.12 guest
// with OpenZFS 2.3, a pool on a virtio disk, Debian's nix-bin and the
// host's rsync, and prints its table. Both sides of the comparison run in
// the same guest under QEMU's TCG, so their seconds compare with each
// other, not with the host's btrfs table.
func BenchmarkReplicateZFSInVM(b *testing.B) {
	bin := filepath.Join(b.TempDir(), "replica.test")
	cmd := exec.Command("go", "test", "-c", "-tags", "integration", "-o", bin, "github.com/strata-nix/strata/bench/replica")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("go test -c bench/replica: %v\n%s", err, out)
	}
	paths := os.Getenv("STRATA_BENCH_PATHS")
	if paths == "" {
		paths = "100000"
	}
	b.ResetTimer()
	res := vm.Boot(context.Background(), b, vm.Guest{
		Kernel:    vm.Kernel612,
		ZFS:       true,
		Nix:       true,
		Binaries:  []string{"/usr/bin/rsync"},
		DiskBytes: 12 << 30,
		MemoryMB:  6144,
		Timeout:   80 * time.Minute,
		Quiet:     true,
		Env:       map[string]string{"STRATA_BENCH_PATHS": paths},
		Files:     []vm.File{{Guest: "/bin/replica.test", Host: bin}},
		Script: `set -e
printf 'n\np\n1\n\n\nw\n' | fdisk /dev/vda >/dev/null 2>&1
zpool create -f -o ashift=12 -O mountpoint=none tank /dev/vda1
cd /tmp
CI=true STRATA_TEST_ZPOOL=tank /bin/replica.test -test.run '^$' -test.bench '^BenchmarkReplicateZFS$' -test.benchtime 1x -test.timeout 75m
`,
	})
	b.StopTimer()
	if res.Status != 0 {
		b.Fatalf("guest bench failed (status %d):\n%s", res.Status, res.Output)
	}
	var table []string
	on := false
	for _, l := range strings.Split(res.Output, "\n") {
		l = strings.TrimRight(l, "\r")
		if strings.HasPrefix(l, "replicate a generation") {
			on = true
		}
		if on {
			table = append(table, l)
			if strings.HasPrefix(l, "rsync / strata") {
				break
			}
		}
	}
	if len(table) == 0 {
		b.Fatalf("the guest printed no table:\n%s", res.Output)
	}
	os.Stdout.WriteString("\n" + strings.Join(table, "\n") + "\n")
}
