//go:build vm

package vm

import (
	"context"
	"strings"
	"testing"
	"time"
)

// TestOpenZFSServerState runs the server's issue-13 test on a real OpenZFS
// pool in a 6.12 guest with Debian's nix-bin: generations published through
// the ZFS backend carry strata:* user properties, a server with an empty
// state dir rebuilds manifests, registrations and pins from them, and only
// the state's own unfinished publish is destroyed
// (server.TestZFSStateRebuiltFromProperties). In the same guest, a replica
// server follows a ZFS primary through its API, and one killed with SIGKILL
// in the middle of a stream resumes it (server.TestZFSReplicaFollowsPrimary).
func TestOpenZFSServerState(t *testing.T) {
	serverTest := buildTestBinary(t, "github.com/strata-nix/strata/server", "integration")
	res := Boot(context.Background(), t, Guest{
		Kernel:    Kernel612,
		ZFS:       true,
		Nix:       true,
		DiskBytes: 2 << 30,
		Timeout:   20 * time.Minute,
		Files:     []File{{Guest: "/bin/server.test", Host: serverTest}},
		Script:    checkFuncs + serverStateScript,
	})
	requireChecks(t, res, 5)
	for _, name := range []string{"TestZFSStateRebuiltFromProperties", "TestZFSReplicaFollowsPrimary"} {
		if !strings.Contains(res.Output, "--- PASS: "+name) {
			t.Fatalf("the server's ZFS test %s did not pass", name)
		}
	}
}

const serverStateScript = `
check "partition /dev/vda (whole-disk vdevs need udev)" sh -c "printf 'n\np\n1\n\n\nw\n' | fdisk /dev/vda >/dev/null 2>&1; [ -b /dev/vda1 ]"
check "zpool create tank on /dev/vda1" zpool create -f -o ashift=12 -O mountpoint=none tank /dev/vda1
check "server ZFS state test passes with STRATA_TEST_ZPOOL=tank" sh -c "cd /tmp && CI=true STRATA_TEST_ZPOOL=tank /bin/server.test -test.v -test.count=1 -test.run '^TestZFSStateRebuiltFromProperties$' > /tmp/srv.out 2>&1; rc=\$?; cat /tmp/srv.out; exit \$rc"
check "server ZFS replica test passes (whole, incremental, kill -9 and resume)" sh -c "cd /tmp && CI=true STRATA_TEST_ZPOOL=tank /bin/server.test -test.v -test.count=1 -test.run '^TestZFSReplicaFollowsPrimary$' > /tmp/rep.out 2>&1; rc=\$?; cat /tmp/rep.out; exit \$rc"
check "no test skipped" sh -c "! grep -q -- '--- SKIP' /tmp/srv.out /tmp/rep.out"
`
