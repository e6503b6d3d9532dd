//go:build vm

package vm

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/testenv"
)

// TestInUseGuestKernels runs overlay's real-kernel InUse tests on the
// guests' kernels: 6.12 (unique mount ids; /proc/<pid>/maps shows a
// mapped file of an overlay with the overlay's device) and 6.1 (no
// unique ids: device and mount id; maps shows the layer's device, the
// lower's or the upper's, with the overlay's path). A freed overlay's
// device and mount id go to the next overlay, and a process on that one
// does not hold the old one while a table shows it (6.1) or at all
// (6.12); a process that only maps a file of a detached overlay laid out
// as a builder's (lower on a filesystem of its own, listed and detached
// after the overlay; upper and workdir on a local filesystem), from the
// lower or the upper, holds it until it exits.
func TestInUseGuestKernels(t *testing.T) {
	testenv.RequireRoot(t)
	bin := buildTestBinary(t, "github.com/strata-nix/strata/overlay", "integration")
	for _, k := range []Kernel{Kernel612, Kernel61} {
		t.Run(k.String(), func(t *testing.T) {
			res := Boot(context.Background(), t, Guest{
				Kernel:  k,
				Files:   []File{{Guest: "/bin/overlay.test", Host: bin}},
				Script:  checkFuncs + inUseScript,
				Timeout: 5 * time.Minute,
			})
			requireChecks(t, res, 2)
			for _, name := range []string{"TestInUseNumbersReusedRealKernel", "TestInUseMappedOnlyRealKernel/lowerfile", "TestInUseMappedOnlyRealKernel/upperfile"} {
				if !strings.Contains(res.Output, "--- PASS: "+name+" ") {
					t.Fatalf("%s did not pass in the guest", name)
				}
			}
		})
	}
}

const inUseScript = `
mount -t tmpfs tmp /tmp
check "overlay InUse tests pass on this kernel" sh -c "cd /tmp && CI=true /bin/overlay.test -test.v -test.count=1 -test.run '^(TestInUseNumbersReusedRealKernel|TestInUseMappedOnlyRealKernel)$' > /tmp/inuse.out 2>&1; rc=\$?; cat /tmp/inuse.out; exit \$rc"
check "no InUse test skipped" sh -c "! grep -q -- '--- SKIP' /tmp/inuse.out"
`
