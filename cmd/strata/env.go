package main

import (
	"os"

	"github.com/strata-nix/strata/builder"
	"github.com/strata-nix/strata/config"
	"github.com/strata-nix/strata/server"
)

// otherEnv lists every STRATA_* variable that is not a configuration key of
// either daemon, and what reads it. A daemon refuses a STRATA_* variable
// that is neither a key nor listed here (a mistyped key would otherwise be
// ignored without a word), so a name added anywhere in the repository goes
// here too: TestEnvNamesKnown fails until it does.
var otherEnv = map[string]string{
	// Read by strata itself.
	"STRATA_API":                 "the CLI's daemon API address",
	"STRATA_DEBUG_PUBLISH_PAUSE": "server debug hook: pause a publish at a step",
	"STRATA_DEBUG_REPLICA_PAUSE": "replica debug hook: pause a receive at a step",

	// Test harnesses: re-executed test binaries and their children.
	"STRATA_TEST_RUN_MAIN":           "cmd/strata tests: run main",
	"STRATA_TEST_GOSSIP_MEMBER":      "cmd/strata tests: run a gossip member",
	"STRATA_TEST_GOSSIP_BIND":        "cmd/strata tests: gossip member bind address",
	"STRATA_TEST_GOSSIP_JOIN":        "cmd/strata tests: gossip member join address",
	"STRATA_TEST_GOSSIP_KEYS":        "cmd/strata tests: gossip member keyring",
	"STRATA_TEST_GOSSIP_HOLD":        "cmd/strata tests: gossip member holds",
	"STRATA_BUILDER_TEST_AGENT":      "builder tests: run an agent",
	"STRATA_TEST_PRIVATE_MOUNT_NS":   "builder, overlay tests: in a private mount namespace (testenv.PrivateMountNS)",
	"STRATA_OVERLAYTEST_MMAP":        "overlay tests: map a file and hold only the mapping",
	"STRATA_NFSTEST_SERVE":           "server/nfs tests: serve an export",
	"STRATA_NFSTEST_MAX_CONNS":       "server/nfs tests: connection cap",
	"STRATA_NFSTEST_NOFILE":          "server/nfs tests: file descriptor limit",
	"STRATA_GUARDTEST_SERVE":         "server/nfs/guard tests: serve",
	"STRATA_SERVERTEST_REPLICA_SYNC": "server tests: run a replica sync",
	"STRATA_ZFSTEST_RECEIVE":         "snapshot/zfs tests: run a receive",
	"STRATA_HELPER_INSTALL":          "nixstore tests: install a generation DB",

	// Test and benchmark knobs (TESTING.md), set around runs that start daemons.
	"STRATA_TEST_ZPOOL":       "tests: the ZFS pool to use",
	"STRATA_ZFS_IN_VM":        "tests: run ZFS cases in a VM",
	"STRATA_NFS_HANDLES":      "server/nfs tests: handle count",
	"STRATA_GCROOT_PATHS":     "builder tests: GC root path count",
	"STRATA_NIX_TRIXIE":       "VM tests: the Nix-on-Debian cache dir",
	"STRATA_NIXPKGS_LIB":      "nixos tests: a nixpkgs lib checkout",
	"STRATA_VM_CACHE":         "VM tests: the image cache",
	"STRATA_VM_KERNEL_61":     "VM tests: a 6.1 kernel",
	"STRATA_VM_KERNEL_612":    "VM tests: a 6.12 kernel",
	"STRATA_DEPLOY_CACHE":     "deploy tests: the rootfs cache",
	"STRATA_BENCH_BUSYPOLL":   "bench knob",
	"STRATA_BENCH_CLIENTS":    "bench knob",
	"STRATA_BENCH_CLOSURE_MB": "bench knob",
	"STRATA_BENCH_CONNS":      "bench knob",
	"STRATA_BENCH_CPUPROFILE": "bench knob",
	"STRATA_BENCH_LOADDB_1M":  "bench knob",
	"STRATA_BENCH_LOADS":      "bench knob",
	"STRATA_BENCH_MANY":       "bench knob",
	"STRATA_BENCH_PATHS":      "bench knob",
	"STRATA_BENCH_POLL":       "bench knob",
	"STRATA_BENCH_PUBLISHES":  "bench knob",
	"STRATA_BENCH_REPS":       "bench knob",
	"STRATA_BENCH_SERVE":      "bench knob",
	"STRATA_BENCH_SIZES":      "bench knob",
}

// knownEnv is every STRATA_* variable a daemon accepts in its environment:
// both daemons' keys (one environment often serves both: a shell, a
// container image; the other daemon's keys are ignored) and otherEnv.
func knownEnv() map[string]string {
	known := make(map[string]string, len(otherEnv)+len(server.Keys)+len(builder.Keys))
	for name, what := range otherEnv {
		known[name] = what
	}
	for _, k := range server.Keys {
		known[k.EnvName()] = "strata server key " + k.Name
	}
	for _, k := range builder.Keys {
		if what, ok := known[k.EnvName()]; ok && what == "strata server key "+k.Name {
			known[k.EnvName()] = "key " + k.Name
		} else {
			known[k.EnvName()] = "strata builder key " + k.Name
		}
	}
	return known
}

// checkEnv refuses a STRATA_* variable no daemon reads, as an unknown key
// in the file is refused.
func checkEnv() error { return config.CheckEnv(os.Environ(), knownEnv()) }
