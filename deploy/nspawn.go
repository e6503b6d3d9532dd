//go:build deploy

package deploy

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
)

// repoRoot is the repository's top directory (tests run in deploy/).
func repoRoot(t *testing.T) string {
	t.Helper()
	d, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// rootfs returns the cached bookworm rootfs directory (deploy/rootfs.sh).
func rootfs(t *testing.T) string {
	t.Helper()
	out, err := exec.Command(filepath.Join(repoRoot(t), "deploy", "rootfs.sh")).Output()
	if err != nil {
		var stderr string
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("deploy/rootfs.sh: %v\n%s", err, stderr)
	}
	return strings.TrimSpace(string(out))
}

// buildStrata builds a static strata binary for the guests.
func buildStrata(t *testing.T) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "strata")
	cmd := exec.Command(filepath.Join(os.Getenv("GOROOT"), "bin", "go"), "build", "-trimpath", "-o", out, "github.com/strata-nix/strata/cmd/strata")
	if os.Getenv("GOROOT") == "" {
		cmd.Path, _ = exec.LookPath("go")
	}
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build strata: %v\n%s", err, b)
	}
	return out
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// sshKey makes a key pair; it returns the private key's path and the
// public key.
func sshKey(t *testing.T) (string, string) {
	t.Helper()
	key := filepath.Join(t.TempDir(), "id_ed25519")
	testenv.Run(t, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
	pub, err := os.ReadFile(key + ".pub")
	if err != nil {
		t.Fatal(err)
	}
	return key, string(pub)
}

// bridge is a host bridge the containers' veths join; the host has the
// first address of net/24, so it reaches every container (ssh, NFS).
type bridge struct {
	name   string
	prefix string // "10.X.Y."
}

func newBridge(t *testing.T) bridge {
	t.Helper()
	b := bridge{name: "stbr" + randHex(4)}
	rb := make([]byte, 2)
	rand.Read(rb)
	b.prefix = fmt.Sprintf("10.%d.%d.", 200+int(rb[0])%50, rb[1])
	testenv.Run(t, "ip", "link", "add", b.name, "type", "bridge")
	t.Cleanup(func() { exec.Command("ip", "link", "del", b.name).Run() })
	testenv.Run(t, "ip", "addr", "add", b.prefix+"1/24", "dev", b.name)
	testenv.Run(t, "ip", "link", "set", b.name, "up")
	return b
}

// nspawnRuntime mounts the tmpfs systemd-nspawn needs on a host whose PID 1
// is not systemd (unless something is mounted there already).
func nspawnRuntime(t *testing.T) {
	t.Helper()
	dir := "/run/systemd/nspawn"
	os.MkdirAll(dir, 0o755)
	var st, parent unix.Stat_t
	unix.Stat(dir, &st)
	unix.Stat(filepath.Dir(dir), &parent)
	if st.Dev != parent.Dev {
		return
	}
	testenv.Run(t, "mount", "-t", "tmpfs", "-o", "mode=0755", "strata-nspawn", dir)
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
}

// nspawnHost checks for root and the tools an nspawn deploy test runs,
// then readies what every one needs: the cached rootfs (fs), the strata
// binary (bin), nspawn's runtime dir, a bridge for the containers and an
// SSH key pair for Ansible (key, pub).
func nspawnHost(t *testing.T) (fs, bin string, br bridge, key, pub string) {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireCommands(t, "systemd-nspawn", "mmdebstrap", "ansible-playbook", "ssh", "ssh-keygen", "btrfs", "nix-store")
	fs = rootfs(t)
	bin = buildStrata(t)
	nspawnRuntime(t)
	br = newBridge(t)
	key, pub = sshKey(t)
	return fs, bin, br, key, pub
}

// centralStore makes a filled Nix store in a btrfs subvolume nix/ on its
// own loop device mounted at mnt, for a container to bind as a server's
// /srv/strata.
func centralStore(t *testing.T) (mnt string, st nixtest.Store) {
	t.Helper()
	mnt = testenv.LoopBtrfs(t, "1G")
	testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(mnt, "nix"))
	st = nixtest.New(t, mnt)
	st.Fill(t)
	return mnt, st
}

// container is one booted systemd-nspawn machine.
type container struct {
	name, addr, root string
	key              string
	sshOpts          []string // extra ssh options (a port)
	cmd              *exec.Cmd
	log              string
}

// boot starts a container from rootfs (a fresh overlay over the cached
// directory, so the cache stays clean) on br at address ip, with extra
// nspawn arguments, and waits for its sshd.
func boot(t *testing.T, rootfs string, br bridge, host int, key, pub string, extra ...string) *container {
	t.Helper()
	c := &container{name: "strata-" + randHex(4), addr: fmt.Sprintf("%s%d", br.prefix, host), key: key}
	dir := t.TempDir()
	for _, d := range []string{"upper", "work", "root"} {
		os.MkdirAll(filepath.Join(dir, d), 0o755)
	}
	c.root = filepath.Join(dir, "root")
	testenv.Run(t, "mount", "-t", "overlay", "overlay", "-o",
		"lowerdir="+rootfs+",upperdir="+filepath.Join(dir, "upper")+",workdir="+filepath.Join(dir, "work"), c.root)
	t.Cleanup(func() {
		for range 3 {
			if unix.Unmount(c.root, unix.MNT_DETACH) != nil {
				break
			}
		}
	})
	write := func(p, s string, mode os.FileMode) {
		p = filepath.Join(c.root, p)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(s), mode); err != nil {
			t.Fatal(err)
		}
	}
	write("root/.ssh/authorized_keys", pub, 0o600)
	os.Chmod(filepath.Join(c.root, "root/.ssh"), 0o700)
	write("etc/hostname", c.name+"\n", 0o644)
	write("etc/systemd/network/10-strata-host0.network", "[Match]\nName=host0\n\n[Network]\nAddress="+c.addr+"/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n", 0o644)
	os.Symlink("/lib/systemd/system/systemd-networkd.service", filepath.Join(c.root, "etc/systemd/system/multi-user.target.wants/systemd-networkd.service"))
	// Nothing in the container may wait for a network it cannot reach.
	for _, u := range []string{"systemd-networkd-wait-online.service", "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer"} {
		os.Symlink("/dev/null", filepath.Join(c.root, "etc/systemd/system", u))
	}
	c.log = filepath.Join(dir, "console.log")
	logf, err := os.Create(c.log)
	if err != nil {
		t.Fatal(err)
	}
	args := append([]string{"-b", "-D", c.root, "-M", c.name, "--register=no", "--keep-unit",
		"--network-bridge=" + br.name, "--console=read-only"}, extra...)
	c.cmd = exec.Command("systemd-nspawn", args...)
	c.cmd.Stdout, c.cmd.Stderr = logf, logf
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// The container's init (systemd, PID 1 inside) is nspawn's child; it
	// must not outlive the test.
	var initPID int
	for range 100 {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", c.cmd.Process.Pid, c.cmd.Process.Pid)); err == nil {
			if f := strings.Fields(string(b)); len(f) > 0 {
				fmt.Sscan(f[0], &initPID)
				break
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Cleanup(func() {
		// SIGTERM: nspawn sends the container's init SIGRTMIN+3, an
		// orderly shutdown, and exits when it is done.
		c.cmd.Process.Signal(unix.SIGTERM)
		done := make(chan struct{})
		go func() { c.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(60 * time.Second):
			if initPID > 0 {
				unix.Kill(initPID, unix.SIGKILL) // ends the whole PID namespace
			}
			c.cmd.Process.Kill()
			<-done
		}
		logf.Close()
		if initPID > 0 {
			for range 100 {
				if unix.Kill(initPID, 0) != nil {
					return
				}
				time.Sleep(100 * time.Millisecond)
			}
			t.Errorf("container %s: its init (pid %d) outlived systemd-nspawn", c.name, initPID)
			unix.Kill(initPID, unix.SIGKILL)
		}
	})
	deadline := time.Now().Add(120 * time.Second)
	for {
		conn, err := net.DialTimeout("tcp", c.addr+":22", time.Second)
		if err == nil {
			conn.Close()
			if _, err := c.try("true"); err == nil {
				return c
			}
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(c.log)
			t.Fatalf("container %s: no ssh on %s within 120 s\n%s", c.name, c.addr, tail(string(b), 40))
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func (c *container) sshArgs() []string {
	return append(append([]string{}, c.sshOpts...), "-i", c.key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
		"-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5", "-o", "BatchMode=yes", "root@"+c.addr)
}

// try runs a shell command in the container over ssh.
func (c *container) try(script string) (string, error) {
	out, err := exec.Command("ssh", append(c.sshArgs(), script)...).CombinedOutput()
	return string(out), err
}

// sh runs a shell command in the container and fails t if it fails.
func (c *container) sh(t *testing.T, script string) string {
	t.Helper()
	out, err := c.try(script)
	if err != nil {
		t.Fatalf("%s: %s: %v\n%s", c.name, script, err, out)
	}
	return strings.TrimSpace(out)
}

// prop returns one `systemctl show` property of unit.
func (c *container) prop(t *testing.T, unit, name string) string {
	t.Helper()
	return c.sh(t, "systemctl show -p "+name+" --value "+unit)
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// recap is one host's line of an Ansible PLAY RECAP.
type recap struct{ ok, changed, unreachable, failed int }

// parseRecap returns each host's recap counts.
func parseRecap(out string) map[string]recap {
	res := map[string]recap{}
	in := false
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "PLAY RECAP") {
			in = true
			continue
		}
		if !in || !strings.Contains(line, " : ") {
			continue
		}
		host, rest, _ := strings.Cut(line, " : ")
		var r recap
		for _, f := range strings.Fields(rest) {
			k, v, _ := strings.Cut(f, "=")
			var n int
			fmt.Sscan(v, &n)
			switch k {
			case "ok":
				r.ok = n
			case "changed":
				r.changed = n
			case "unreachable":
				r.unreachable = n
			case "failed":
				r.failed = n
			}
		}
		res[strings.TrimSpace(host)] = r
	}
	return res
}

// recapText is the PLAY RECAP section of an ansible-playbook output.
func recapText(out string) string {
	if i := strings.LastIndex(out, "PLAY RECAP"); i >= 0 {
		return strings.TrimRight(out[i:], "\n")
	}
	return tail(out, 20)
}
