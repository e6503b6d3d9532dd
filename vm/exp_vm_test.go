//go:build vm

package vm

import (
	"context"
	"strconv"
	"testing"
)

func TestExpListing(t *testing.T) {
	store := btrfsGeneration(t, func(store string) { testTree(t, store, true) })
	vmtool := buildStatic(t, "github.com/strata-nix/strata/vm/internal/vmtool")
	port := serveInProcess(t, map[uint64]string{1: store})
	res := Boot(context.Background(), t, Guest{
		Kernel: Kernel612, Quiet: true,
		Env:   map[string]string{"P": strconv.Itoa(port)},
		Files: []File{{Guest: "/bin/vmtool", Host: vmtool}},
		Script: checkFuncs + `
mkdir -p /mnt/gen1; mount -t nfs -o "$(nfsopts $P 10.0.2.2)" 10.0.2.2:/gen/1 /mnt/gen1
ts() { echo "T $(cut -d' ' -f1 /proc/uptime) $*"; }
ts start; ls -1 /mnt/gen1/many | wc -l; ts ls1; ls -1 /mnt/gen1/many | wc -l; ts ls1again
ls -l /mnt/gen1/many | wc -l; ts lsl; echo 3 > /proc/sys/vm/drop_caches; ts drop
ls -l /mnt/gen1/many | wc -l; ts lsl-cold; vmtool manifest /mnt/gen1/many | wc -l; ts manifest-many
vmtool manifest /mnt/gen1/sizes | wc -l; ts manifest-sizes
cat /proc/self/mountstats | grep -A30 gen1 | grep -E 'READDIR|LOOKUP|GETATTR|ACCESS'
`,
	})
	for _, l := range splitLines(res.Output) {
		t.Log(l)
	}
}
