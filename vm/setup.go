package vm

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"unicode"
)

// backportsSources is the apt source the 6.12 kernel, its headers and
// OpenZFS 2.3 (contrib) come from.
const backportsSources = `Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
`

const backportsFile = "/etc/apt/sources.list.d/strata-vm-backports.sources"

// hostPackages are the Debian packages the harness itself needs on the host.
var hostPackages = []string{"qemu-system-x86", "busybox-static", "kmod", "xz-utils", "dpkg", "apt"}

// runCmd runs a command and returns its stdout; the error names the command
// and carries its stderr.
func runCmd(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C")
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, lastLines(stderr.String(), 20))
	}
	return stdout.String(), nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// pkgVersion returns the installed version of a Debian package, or "" if it
// is not installed.
func pkgVersion(ctx context.Context, pkg string) string {
	out, err := exec.CommandContext(ctx, "dpkg-query", "-W", "-f", "${Status}\t${Version}", pkg).Output()
	if err != nil {
		return ""
	}
	status, ver, _ := strings.Cut(string(out), "\t")
	if !strings.HasSuffix(status, " installed") {
		return ""
	}
	return ver
}

// aptInstall installs the packages (apt syntax, e.g. "pkg/bookworm-backports")
// whose plain names are not installed yet.
func aptInstall(ctx context.Context, log *slog.Logger, pkgs ...string) error {
	var missing []string
	for _, p := range pkgs {
		name, _, _ := strings.Cut(p, "/")
		if pkgVersion(ctx, name) == "" {
			missing = append(missing, p)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	log.Info("installing host packages", "packages", missing)
	args := append([]string{"install", "-y", "-q", "--no-install-recommends"}, missing...)
	if _, err := runCmd(ctx, "apt-get", args...); err != nil {
		// A stale package index is the usual cause on a fresh machine.
		if _, uerr := runCmd(ctx, "apt-get", "update", "-q"); uerr != nil {
			return fmt.Errorf("install %v: %w (and apt-get update: %v)", missing, err, uerr)
		}
		if _, err := runCmd(ctx, "apt-get", args...); err != nil {
			return fmt.Errorf("install %v: %w", missing, err)
		}
	}
	return nil
}

// ensureBackports adds bookworm-backports (main contrib) to apt's sources
// unless zfs-dkms is already installable, and refreshes the index.
func ensureBackports(ctx context.Context, log *slog.Logger) error {
	if out, _ := runCmd(ctx, "apt-cache", "policy", "zfs-dkms"); strings.Contains(out, "bookworm-backports/contrib") {
		return nil
	}
	if _, err := os.Stat(backportsFile); err != nil {
		log.Info("adding apt source", "file", backportsFile)
		if err := writeFileAtomic(backportsFile, []byte(backportsSources), 0o644); err != nil {
			return fmt.Errorf("add bookworm-backports: %w", err)
		}
	}
	if _, err := runCmd(ctx, "apt-get", "update", "-q"); err != nil {
		return fmt.Errorf("add bookworm-backports: %w", err)
	}
	return nil
}

var (
	re612 = regexp.MustCompile(`^linux-image-(6\.12\.[0-9]+\+deb12-amd64)$`)
	re61  = regexp.MustCompile(`^linux-image-(6\.1\.0-[0-9]+-amd64)$`)
)

// kernelCandidates lists the kernel releases ("6.12.117+deb12-amd64") whose
// image package apt knows and whose name matches re, oldest first.
func kernelCandidates(ctx context.Context, re *regexp.Regexp) ([]string, error) {
	pattern := strings.NewReplacer(`(`, ``, `)`, ``).Replace(re.String())
	out, err := runCmd(ctx, "apt-cache", "search", "--names-only", pattern)
	if err != nil {
		return nil, err
	}
	var vers []string
	for _, line := range strings.Split(out, "\n") {
		name, _, _ := strings.Cut(line, " ")
		if m := re.FindStringSubmatch(name); m != nil {
			vers = append(vers, m[1])
		}
	}
	sort.Slice(vers, func(i, j int) bool { return versionLess(vers[i], vers[j]) })
	return vers, nil
}

// versionLess compares version-like strings by their runs of digits
// numerically and the rest bytewise ("6.12.95" < "6.12.117").
func versionLess(a, b string) bool {
	as, bs := splitRuns(a), splitRuns(b)
	for i := 0; i < len(as) && i < len(bs); i++ {
		x, y := as[i], bs[i]
		if x == y {
			continue
		}
		if isDigits(x) && isDigits(y) {
			x, y = strings.TrimLeft(x, "0"), strings.TrimLeft(y, "0")
			if len(x) != len(y) {
				return len(x) < len(y)
			}
		}
		return x < y
	}
	return len(as) < len(bs)
}

func isDigits(s string) bool { return s != "" && unicode.IsDigit(rune(s[0])) }

func splitRuns(s string) []string {
	var runs []string
	start := 0
	for i := 1; i <= len(s); i++ {
		if i == len(s) || unicode.IsDigit(rune(s[i])) != unicode.IsDigit(rune(s[i-1])) {
			runs = append(runs, s[start:i])
			start = i
		}
	}
	return runs
}

// pickKernel returns the kernel release to boot for k. STRATA_VM_KERNEL_612
// or STRATA_VM_KERNEL_61 overrides the choice. For 6.12 it prefers the newest
// release for which spl/zfs are cached or already built by DKMS, so that a
// new backports upload does not force a 10-minute rebuild.
func pickKernel(ctx context.Context, log *slog.Logger, k Kernel, cacheDir string) (string, error) {
	if v := os.Getenv(k.envOverride()); v != "" {
		return v, nil
	}
	re := re61
	if k == Kernel612 {
		if err := ensureBackports(ctx, log); err != nil {
			return "", err
		}
		re = re612
	}
	vers, err := kernelCandidates(ctx, re)
	if err == nil && len(vers) == 0 {
		if _, uerr := runCmd(ctx, "apt-get", "update", "-q"); uerr != nil {
			return "", fmt.Errorf("pick %s kernel: %w", k, uerr)
		}
		vers, err = kernelCandidates(ctx, re)
	}
	if err != nil {
		return "", fmt.Errorf("pick %s kernel: %w", k, err)
	}
	// Kernels already extracted in the cache stay usable after apt's index
	// has moved on to a newer upload.
	cached, _ := filepath.Glob(filepath.Join(cacheDir, "kernel", "*"))
	for _, c := range cached {
		name := filepath.Base(c)
		if re.MatchString("linux-image-"+name) && !slices.Contains(vers, name) {
			vers = append(vers, name)
		}
	}
	sort.Slice(vers, func(i, j int) bool { return versionLess(vers[i], vers[j]) })
	if len(vers) == 0 {
		return "", fmt.Errorf("pick %s kernel: apt knows no package matching %s", k, re)
	}
	if k == Kernel612 {
		for i := len(vers) - 1; i >= 0; i-- {
			cached, _ := filepath.Glob(filepath.Join(cacheDir, "zfsmod", safeName(vers[i])+"-zfs*"))
			if len(cached) > 0 || dkmsModules(vers[i]) != nil {
				return vers[i], nil
			}
		}
	}
	return vers[len(vers)-1], nil
}

// dkmsModules returns the host paths of spl and zfs built by DKMS for kernel
// release kver, or nil if either is missing.
func dkmsModules(kver string) []string {
	var paths []string
	for _, m := range []string{"spl", "zfs"} {
		found := ""
		for _, ext := range []string{".ko", ".ko.xz", ".ko.zst"} {
			p := filepath.Join("/lib/modules", kver, "updates/dkms", m+ext)
			if _, err := os.Stat(p); err == nil {
				found = p
				break
			}
		}
		if found == "" {
			return nil
		}
		paths = append(paths, found)
	}
	return paths
}

// ensureDKMS makes DKMS build spl/zfs (zfs-dkms from bookworm-backports) for
// kver and returns the module paths. This is the slow step of a cold cache
// (~10 minutes on 2 cores).
func ensureDKMS(ctx context.Context, log *slog.Logger, kver string) ([]string, error) {
	if p := dkmsModules(kver); p != nil {
		return p, nil
	}
	if err := ensureBackports(ctx, log); err != nil {
		return nil, err
	}
	log.Info("building OpenZFS modules with DKMS (about 10 minutes)", "kernel", kver)
	if err := aptInstall(ctx, log, "linux-headers-"+kver, "zfs-dkms/bookworm-backports", "zfsutils-linux/bookworm-backports"); err != nil {
		return nil, fmt.Errorf("build zfs modules for %s: %w", kver, err)
	}
	if p := dkmsModules(kver); p != nil {
		return p, nil
	}
	// zfs-dkms was installed before these headers: build for kver now.
	if _, err := runCmd(ctx, "dkms", "autoinstall", "-k", kver); err != nil {
		return nil, fmt.Errorf("build zfs modules for %s: %w", kver, err)
	}
	if p := dkmsModules(kver); p != nil {
		return p, nil
	}
	return nil, fmt.Errorf("build zfs modules for %s: dkms finished but /lib/modules/%s/updates/dkms has no spl and zfs", kver, kver)
}
