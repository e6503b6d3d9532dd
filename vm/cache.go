package vm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"syscall"
)

// DefaultCacheDir holds everything the harness builds once: kernel packages
// and their extracted trees, DKMS-built modules and the initramfs pieces.
// STRATA_VM_CACHE overrides it.
const DefaultCacheDir = "/var/cache/strata/vm"

// layoutVersion changes whenever what the cache holds changes meaning, so that
// old entries are not reused.
const layoutVersion = "2"

// CacheDir returns the cache directory in use.
func CacheDir() string {
	if d := os.Getenv("STRATA_VM_CACHE"); d != "" {
		return d
	}
	return DefaultCacheDir
}

// cache is the on-disk cache. Every entry is built in a temp name in the same
// directory and renamed into place, and builders hold an exclusive flock on
// cache/lock, so concurrent test processes never see a half-built entry.
type cache struct {
	dir string
	log *slog.Logger
}

func openCache(log *slog.Logger) (*cache, func(), error) {
	dir := CacheDir()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, nil, fmt.Errorf("open vm cache %s: %w", dir, err)
	}
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, nil, fmt.Errorf("open vm cache %s: %w", dir, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("lock vm cache %s: %w", dir, err)
	}
	unlock := func() { _ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }
	return &cache{dir: dir, log: log}, unlock, nil
}

// entry returns the path of a cache entry, building it with build(tmp) when
// it does not exist. build writes tmp (a file or a directory); it is renamed
// to the final path only when build succeeds.
func (c *cache) entry(kind, key string, build func(tmp string) error) (string, error) {
	final := filepath.Join(c.dir, kind, safeName(key))
	if _, err := os.Stat(final); err == nil {
		return final, nil
	}
	if err := os.MkdirAll(filepath.Dir(final), 0o755); err != nil {
		return "", fmt.Errorf("cache %s %s: %w", kind, key, err)
	}
	// Leftovers of builds killed midway: nobody else builds while we hold
	// the lock, so they can go.
	stale, _ := filepath.Glob(filepath.Join(filepath.Dir(final), ".tmp-"+filepath.Base(final)+"-*"))
	for _, p := range stale {
		_ = os.RemoveAll(p)
	}
	tmp := filepath.Join(filepath.Dir(final), ".tmp-"+filepath.Base(final)+fmt.Sprintf("-%d", os.Getpid()))
	c.log.Info("building vm cache entry", "kind", kind, "key", key)
	if err := build(tmp); err != nil {
		_ = os.RemoveAll(tmp)
		return "", fmt.Errorf("cache %s %s: %w", kind, key, err)
	}
	syncPath(tmp)
	if err := os.Rename(tmp, final); err != nil {
		_ = os.RemoveAll(tmp)
		return "", fmt.Errorf("cache %s %s: %w", kind, key, err)
	}
	syncPath(filepath.Dir(final))
	return final, nil
}

var unsafeChars = regexp.MustCompile(`[^A-Za-z0-9._+-]`)

func safeName(key string) string { return unsafeChars.ReplaceAllString(key, "_") }

func syncPath(p string) {
	if f, err := os.Open(p); err == nil {
		_ = f.Sync()
		f.Close()
	}
}

// writeFileAtomic writes data to a temp file next to name, fsyncs it and
// renames it over name.
func writeFileAtomic(name string, data []byte, perm fs.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(name), ".tmp-"+filepath.Base(name))
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), name)
}

// writeArchive writes a to the file tmp.
func writeArchive(a *archive, tmp string) error {
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	if err := a.writeTo(f); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// kernelTree downloads linux-image-KVER and extracts it; it returns the
// extracted tree (boot/vmlinuz-KVER, lib/modules/KVER/...).
func (c *cache) kernelTree(ctx context.Context, kver string) (string, error) {
	pkg := "linux-image-" + kver
	deb, err := c.entry("debs", pkg+".deb", func(tmp string) error {
		dl, err := os.MkdirTemp(filepath.Dir(tmp), ".dl-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dl)
		cmd := exec.CommandContext(ctx, "apt-get", "download", "-q", pkg)
		cmd.Dir = dl
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("apt-get download %s: %w: %s", pkg, err, lastLines(string(out), 10))
		}
		got, _ := filepath.Glob(filepath.Join(dl, pkg+"_*.deb"))
		if len(got) != 1 {
			return fmt.Errorf("apt-get download %s: found %d .deb files", pkg, len(got))
		}
		return os.Rename(got[0], tmp)
	})
	if err != nil {
		return "", err
	}
	return c.entry("kernel", kver, func(tmp string) error {
		if _, err := runCmd(ctx, "dpkg-deb", "-x", deb, tmp); err != nil {
			return err
		}
		if _, err := os.Stat(filepath.Join(tmp, "boot", "vmlinuz-"+kver)); err != nil {
			return fmt.Errorf("%s has no boot/vmlinuz-%s", deb, kver)
		}
		return nil
	})
}

// wantModules are the modules the guest loads (with their dependencies):
// virtio PCI, net and block, the NFSv3 client and overlayfs. Those built into
// a kernel are skipped.
var wantModules = []string{"virtio_pci", "virtio_net", "virtio_blk", "nfsv3", "overlay"}

// module is one kernel module to load in the guest.
type module struct {
	name string
	path string // host path, possibly compressed
}

// resolveModules returns the modules to insmod, dependencies first, for the
// wanted names, found in the kernel tree or in extra (name -> path). Names
// listed in modules.builtin are skipped.
func resolveModules(ctx context.Context, tree, kver string, want []string, extra map[string]string) ([]module, error) {
	moddir := filepath.Join(tree, "lib/modules", kver)
	index := map[string]string{}
	err := filepath.WalkDir(moddir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			if name, ok := moduleName(d.Name()); ok {
				index[name] = p
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("index modules of %s: %w", kver, err)
	}
	for n, p := range extra {
		index[n] = p
	}
	builtin := map[string]bool{}
	if data, err := os.ReadFile(filepath.Join(moddir, "modules.builtin")); err == nil {
		for _, line := range strings.Fields(string(data)) {
			if name, ok := moduleName(filepath.Base(line)); ok {
				builtin[name] = true
			}
		}
	}
	depends := func(p string) ([]string, error) {
		out, err := runCmd(ctx, "modinfo", "-F", "depends", p)
		if err != nil {
			return nil, err
		}
		var deps []string
		for _, d := range strings.Split(strings.TrimSpace(out), ",") {
			if d = strings.TrimSpace(d); d != "" {
				deps = append(deps, strings.ReplaceAll(d, "-", "_"))
			}
		}
		return deps, nil
	}
	return orderModules(want, index, builtin, depends)
}

// orderModules walks the dependency graph from want and returns modules in
// load order (each after all it depends on).
func orderModules(want []string, index map[string]string, builtin map[string]bool, depends func(path string) ([]string, error)) ([]module, error) {
	var order []module
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name string, from string) error
	visit = func(name, from string) error {
		name = strings.ReplaceAll(name, "-", "_")
		switch state[name] {
		case 1:
			return fmt.Errorf("module %s: dependency cycle", name)
		case 2:
			return nil
		}
		p, ok := index[name]
		if !ok {
			if builtin[name] {
				state[name] = 2
				return nil
			}
			if from != "" {
				return fmt.Errorf("module %s (needed by %s): not found", name, from)
			}
			return fmt.Errorf("module %s: not found and not built in", name)
		}
		state[name] = 1
		deps, err := depends(p)
		if err != nil {
			return fmt.Errorf("module %s: %w", name, err)
		}
		for _, d := range deps {
			if err := visit(d, name); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, module{name: name, path: p})
		return nil
	}
	for _, w := range want {
		if err := visit(w, ""); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// moduleName turns "virtio-net.ko.xz" into "virtio_net".
func moduleName(file string) (string, bool) {
	for _, ext := range []string{".ko", ".ko.xz", ".ko.zst", ".ko.gz"} {
		if base, ok := strings.CutSuffix(file, ext); ok {
			return strings.ReplaceAll(base, "-", "_"), true
		}
	}
	return "", false
}

// decompressModule writes the uncompressed module at src to dst.
func decompressModule(ctx context.Context, src, dst string) error {
	var tool string
	switch {
	case strings.HasSuffix(src, ".xz"):
		tool = "xz"
	case strings.HasSuffix(src, ".zst"):
		tool = "zstd"
	case strings.HasSuffix(src, ".gz"):
		tool = "gzip"
	default:
		data, err := os.ReadFile(src)
		if err != nil {
			return err
		}
		return os.WriteFile(dst, data, 0o644)
	}
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, tool, "-dc", src)
	cmd.Stdout = out
	runErr := cmd.Run()
	if err := out.Close(); runErr == nil {
		runErr = err
	}
	if runErr != nil {
		return fmt.Errorf("decompress %s: %w", src, runErr)
	}
	return nil
}

// baseArchive builds (or finds) the base initramfs for kver: busybox as
// /bin/busybox, the modules uncompressed under /lib/modules/NAME.ko and their
// load order in /lib/modules/order.
func (c *cache) baseArchive(ctx context.Context, kver, tree string, zfsMods []string, zfsKey string) (string, error) {
	bbver := pkgVersion(ctx, "busybox-static")
	key := fmt.Sprintf("%s-bb%s-zfs%s-%s.cpio", kver, bbver, zfsKey, layoutVersion)
	return c.entry("base", key, func(tmp string) error {
		want := append([]string(nil), wantModules...)
		extra := map[string]string{}
		for _, p := range zfsMods {
			name, _ := moduleName(filepath.Base(p))
			extra[name] = p
			want = append(want, name)
		}
		mods, err := resolveModules(ctx, tree, kver, want, extra)
		if err != nil {
			return err
		}
		work, err := os.MkdirTemp(filepath.Dir(tmp), ".mods-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(work)
		a := newArchive()
		bb, err := exec.LookPath("busybox")
		if err != nil {
			return fmt.Errorf("busybox-static not installed: %w", err)
		}
		if err := a.file("/bin/busybox", bb, 0o755); err != nil {
			return err
		}
		var names []string
		for _, m := range mods {
			dst := filepath.Join(work, m.name+".ko")
			if err := decompressModule(ctx, m.path, dst); err != nil {
				return err
			}
			if err := a.file("/lib/modules/"+m.name+".ko", dst, 0o644); err != nil {
				return err
			}
			names = append(names, m.name)
		}
		if err := a.bytes("/lib/modules/order", []byte(strings.Join(names, "\n")+"\n"), 0o644); err != nil {
			return err
		}
		c.log.Info("guest modules", "kernel", kver, "order", names)
		return writeArchive(a, tmp)
	})
}

// lddDeps returns the shared libraries (and loader) a dynamic binary needs.
func lddDeps(ctx context.Context, bin string) ([]string, error) {
	out, err := runCmd(ctx, "ldd", bin)
	if err != nil {
		if strings.Contains(out, "not a dynamic executable") {
			return nil, nil
		}
		return nil, err
	}
	var libs []string
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "not found") {
			return nil, fmt.Errorf("ldd %s: %s", bin, strings.TrimSpace(line))
		}
		for _, f := range strings.Fields(line) {
			if strings.HasPrefix(f, "/") {
				libs = append(libs, f)
			}
		}
	}
	return libs, nil
}

// addDynamic adds host binaries (at guest path = host path) and every library
// they load, at the same paths.
func addDynamic(ctx context.Context, a *archive, bins ...string) error {
	seen := map[string]bool{}
	for _, b := range bins {
		if err := a.file(b, b, 0); err != nil {
			return err
		}
		libs, err := lddDeps(ctx, b)
		if err != nil {
			return err
		}
		for _, l := range libs {
			if !seen[l] {
				seen[l] = true
				if err := a.file(l, l, 0); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// libgccS is the unwinder glibc dlopens for pthread_cancel.
const libgccS = "/lib/x86_64-linux-gnu/libgcc_s.so.1"

// zfsArchive holds OpenZFS userland: zfs, zpool, mount.zfs, zdb and their
// libraries, /etc/zfs.
func (c *cache) zfsArchive(ctx context.Context) (string, error) {
	ver := pkgVersion(ctx, "zfsutils-linux")
	if ver == "" {
		return "", errors.New("zfs userland: zfsutils-linux is not installed")
	}
	return c.entry("zfsuser", "zfsutils-"+ver+"-"+layoutVersion+"-libgcc.cpio", func(tmp string) error {
		a := newArchive()
		if err := addDynamic(ctx, a, "/sbin/zfs", "/sbin/zpool", "/sbin/mount.zfs", "/sbin/zdb"); err != nil {
			return err
		}
		// glibc loads libgcc_s at run time for pthread_cancel, which zfs
		// send's threads use; ldd does not list it.
		if err := a.file(libgccS, libgccS, 0); err != nil {
			return err
		}
		if err := a.dir("/etc/zfs", 0o755); err != nil {
			return err
		}
		return writeArchive(a, tmp)
	})
}

// nixArchive holds Debian's nix-bin: nix and its nix-* links, its libraries,
// /etc/nix/nix.conf with sandbox=false and no build users.
func (c *cache) nixArchive(ctx context.Context) (string, error) {
	ver := pkgVersion(ctx, "nix-bin")
	if ver == "" {
		return "", errors.New("nix bundle: nix-bin is not installed")
	}
	return c.entry("nix", "nix-bin-"+ver+"-"+layoutVersion+".cpio", func(tmp string) error {
		a := newArchive()
		if err := addDynamic(ctx, a, "/usr/bin/nix"); err != nil {
			return err
		}
		// The nix-* commands and the build hook are symlinks to nix.
		links, _ := filepath.Glob("/usr/bin/nix-*")
		hooks, _ := filepath.Glob("/usr/libexec/nix/*")
		links = append(links, hooks...)
		sort.Strings(links)
		for _, l := range links {
			if target, err := os.Readlink(l); err == nil {
				if err := a.symlink(l, target); err != nil {
					return err
				}
			}
		}
		// Nix dlopens the NSS modules (no DNS in the guest, but no warning).
		for _, l := range []string{"libnss_dns.so.2", "libnss_files.so.2"} {
			if p, err := filepath.EvalSymlinks("/lib/x86_64-linux-gnu/" + l); err == nil {
				if err := a.file("/lib/x86_64-linux-gnu/"+l, p, 0); err != nil {
					return err
				}
			}
		}
		conf := "sandbox = false\nbuild-users-group =\nsubstituters =\n"
		if err := a.bytes("/etc/nix/nix.conf", []byte(conf), 0o644); err != nil {
			return err
		}
		return writeArchive(a, tmp)
	})
}

// NixTrixieDir is where scripts/nix-trixie.sh unpacked Debian trixie's Nix
// (STRATA_NIX_TRIXIE, default /var/cache/strata/nix-trixie).
func NixTrixieDir() string {
	if d := os.Getenv("STRATA_NIX_TRIXIE"); d != "" {
		return d
	}
	return "/var/cache/strata/nix-trixie"
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// NixTrixieBin is where a guest with Guest.NixTrixie has trixie's nix tools.
const NixTrixieBin = "/opt/nix-trixie/bin"

// nixTrixieArchive holds Debian trixie's Nix (2.26) under /opt/nix-trixie:
// the nix binary, trixie's loader and exactly the libraries the loader
// resolves for it (trixie's glibc included, so it runs next to bookworm's),
// and the wrappers of scripts/nix-trixie.sh in bin/.
func (c *cache) nixTrixieArchive(ctx context.Context) (string, error) {
	dir := NixTrixieDir()
	debs, _ := filepath.Glob(filepath.Join(dir, "debs", "nix-bin_*.deb"))
	if len(debs) != 1 {
		return "", fmt.Errorf("nix-trixie bundle: no trixie nix-bin in %s (run scripts/nix-trixie.sh)", dir)
	}
	return c.entry("nix-trixie", filepath.Base(debs[0])+"-"+layoutVersion+".cpio", func(tmp string) error {
		root := filepath.Join(dir, "root")
		ld := filepath.Join(root, "usr", "lib64", "ld-linux-x86-64.so.2")
		libdir := filepath.Join(root, "usr", "lib", "x86_64-linux-gnu")
		nix := filepath.Join(root, "usr", "bin", "nix")
		out, err := runCmd(ctx, ld, "--library-path", libdir+":"+filepath.Join(root, "lib", "x86_64-linux-gnu"), "--list", nix)
		if err != nil {
			return err
		}
		a := newArchive()
		const g = "/opt/nix-trixie/root"
		if err := a.file(g+"/usr/lib64/ld-linux-x86-64.so.2", ld, 0o755); err != nil {
			return err
		}
		if err := a.file(g+"/usr/bin/nix", nix, 0o755); err != nil {
			return err
		}
		for _, line := range strings.Split(out, "\n") {
			name, path, ok := strings.Cut(strings.TrimSpace(line), " => ")
			if !ok {
				continue
			}
			path, _, _ = strings.Cut(path, " (")
			if !strings.HasPrefix(path, root+"/") {
				return fmt.Errorf("nix-trixie bundle: %s resolves outside trixie's tree: %s", name, path)
			}
			if err := a.file(g+"/usr/lib/x86_64-linux-gnu/"+name, path, 0); err != nil {
				return err
			}
		}
		// Nix dlopens the NSS modules of its own glibc.
		for _, l := range []string{"libnss_dns.so.2", "libnss_files.so.2"} {
			if p := filepath.Join(libdir, l); fileExists(p) {
				if err := a.file(g+"/usr/lib/x86_64-linux-gnu/"+l, p, 0); err != nil {
					return err
				}
			}
		}
		wrappers, _ := filepath.Glob(filepath.Join(dir, "bin", "*"))
		if len(wrappers) == 0 {
			return fmt.Errorf("nix-trixie bundle: no wrappers in %s/bin", dir)
		}
		for _, w := range wrappers {
			if err := a.file(NixTrixieBin+"/"+filepath.Base(w), w, 0o755); err != nil {
				return err
			}
		}
		return writeArchive(a, tmp)
	})
}

func shortHash(parts ...string) string {
	h := sha256.New()
	for _, p := range parts {
		h.Write([]byte(p))
		h.Write([]byte{0})
	}
	return hex.EncodeToString(h.Sum(nil))[:12]
}

// zfsModules returns spl.ko and zfs.ko for kver, matching the installed
// OpenZFS userland (zfsutils-linux from bookworm-backports), and the OpenZFS
// version. They are kept in the cache (zfsmod/KVER-zfsVERSION), so a machine
// that restores the cache directory skips the DKMS build; otherwise DKMS
// builds them once.
func (c *cache) zfsModules(ctx context.Context, kver string) ([]string, string, error) {
	if err := ensureBackports(ctx, c.log); err != nil {
		return nil, "", err
	}
	if err := aptInstall(ctx, c.log, "zfsutils-linux/bookworm-backports"); err != nil {
		return nil, "", fmt.Errorf("zfs userland: %w", err)
	}
	zver := pkgVersion(ctx, "zfsutils-linux")
	dir, err := c.entry("zfsmod", kver+"-zfs"+zver, func(tmp string) error {
		built, err := ensureDKMS(ctx, c.log, kver)
		if err != nil {
			return err
		}
		if dver := pkgVersion(ctx, "zfs-dkms"); dver != zver {
			return fmt.Errorf("zfs-dkms %s does not match zfsutils-linux %s", dver, zver)
		}
		if err := os.Mkdir(tmp, 0o755); err != nil {
			return err
		}
		for _, p := range built {
			name, _ := moduleName(filepath.Base(p))
			if err := decompressModule(ctx, p, filepath.Join(tmp, name+".ko")); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, "", err
	}
	return []string{filepath.Join(dir, "spl.ko"), filepath.Join(dir, "zfs.ko")}, zver, nil
}
