package testenv

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"testing"
)

// privateMountNSEnv is set in the test binary PrivateMountNS runs again.
const privateMountNSEnv = "STRATA_TEST_PRIVATE_MOUNT_NS"

// PrivateMountNS is the first call of the TestMain of a package whose tests
// mount: as root, it runs the test binary again, with the same arguments,
// in a mount namespace of its own (the Go runtime makes / rprivate there)
// and exits with its status, so every mount the tests make, and any a
// failing test leaves behind, dies with that process and never reaches the
// host. In that process, and when not root, it returns at once. Processes
// the tests start inherit the namespace.
func PrivateMountNS() {
	if os.Geteuid() != 0 || InPrivateMountNS() {
		return
	}
	cmd := exec.Command(os.Args[0], os.Args[1:]...)
	cmd.Env = append(os.Environ(), privateMountNSEnv+"=1")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		os.Exit(ee.ExitCode())
	case err != nil:
		fmt.Fprintf(os.Stderr, "re-exec in a private mount namespace: %v\n", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// InPrivateMountNS reports whether this is the test binary PrivateMountNS
// ran in a mount namespace of its own.
func InPrivateMountNS() bool { return os.Getenv(privateMountNSEnv) == "1" }

// RequireOverlay needs overlayfs in the kernel (it loads the module if
// need be).
func RequireOverlay(t testing.TB) {
	t.Helper()
	fs, _ := os.ReadFile("/proc/filesystems")
	if !bytes.Contains(fs, []byte("\toverlay\n")) {
		_ = exec.Command("modprobe", "overlay").Run()
		fs, _ = os.ReadFile("/proc/filesystems")
	}
	Require(t, bytes.Contains(fs, []byte("\toverlay\n")), "needs overlayfs in the kernel")
}
