package systemd

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/strata-nix/strata/internal/testenv"
)

var units = []string{"strata-server.service", "strata-builder.service"}

// buildStrata builds cmd/strata into a temp dir.
func buildStrata(t *testing.T) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "strata")
	goBin := filepath.Join(os.Getenv("GOROOT"), "bin", "go")
	if _, err := os.Stat(goBin); err != nil {
		goBin = "go"
	}
	cmd := exec.Command(goBin, "build", "-o", out, "github.com/strata-nix/strata/cmd/strata")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build strata: %v\n%s", err, b)
	}
	return out
}

// TestVerify runs `systemd-analyze verify` on both units (ExecStart pointed
// at a freshly built strata, since /usr/bin/strata is not installed here):
// it must exit 0 and print nothing on stderr (unknown keys and bad values
// are only warnings there).
func TestVerify(t *testing.T) {
	testenv.RequireCommands(t, "systemd-analyze")
	bin := buildStrata(t)
	dir := t.TempDir()
	var paths []string
	for _, name := range units {
		b, _ := Files.ReadFile(name)
		p := filepath.Join(dir, name)
		os.WriteFile(p, bytes.ReplaceAll(b, []byte("/usr/bin/strata"), []byte(bin)), 0o644)
		paths = append(paths, p)
	}
	cmd := exec.Command("systemd-analyze", append([]string{"verify", "--man=no"}, paths...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil || stderr.Len() > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, stderr.String())
	}
}

// exposureLimit is the highest `systemd-analyze security` exposure each
// unit may have. The server cannot run as a dynamic user (it needs
// CAP_SYS_ADMIN for btrfs subvolume delete and ZFS snapshot mounts) but
// sandboxes everything else; the builder must mount on the host's
// /nix/store, so it can have no private mount namespace (no ProtectSystem,
// PrivateTmp, ProtectHome, ...), and only capabilities and seccomp remain.
var exposureLimit = map[string]float64{"strata-server.service": 3.5, "strata-builder.service": 5.0}

// TestSecurityExposure scores both units with `systemd-analyze security
// --offline=true` (systemd 252 has it) and prints the score.
func TestSecurityExposure(t *testing.T) {
	testenv.RequireCommands(t, "systemd-analyze")
	re := regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+) (\S+)`)
	for _, name := range units {
		b, _ := Files.ReadFile(name)
		p := filepath.Join(t.TempDir(), name)
		os.WriteFile(p, b, 0o644)
		out, err := exec.Command("systemd-analyze", "security", "--offline=true", "--no-pager", p).CombinedOutput()
		m := re.FindSubmatch(out)
		if m == nil {
			t.Fatalf("systemd-analyze security %s: %v\n%s", name, err, out)
		}
		score, _ := strconv.ParseFloat(string(m[1]), 64)
		fmt.Printf("systemd-analyze security --offline=true %s: exposure %.1f %s (limit %.1f)\n", name, score, m[2], exposureLimit[name])
		if score > exposureLimit[name] {
			t.Errorf("%s: exposure %.1f above the limit %.1f\n%s", name, score, exposureLimit[name], out)
		}
	}
}

// The units say what the daemons rely on.
func TestUnitSemantics(t *testing.T) {
	for _, name := range units {
		u, err := Load(name)
		if err != nil {
			t.Fatal(err)
		}
		for key, want := range map[string]string{"Type": "notify", "NotifyAccess": "main", "WatchdogSec": "60s",
			"Restart": "on-failure", "StateDirectoryMode": "0700", "LoadCredential": "strata:/etc/strata/credentials",
			"NoNewPrivileges": "yes", "ExecReload": "/bin/kill -HUP $MAINPID",
			// strata exits 2 on a configuration error (cmd/strata): no
			// restart loop on it.
			"RestartPreventExitStatus": "2"} {
			if got := strings.Join(u.Get("Service", key), " "); got != want {
				t.Errorf("%s: %s=%q, want %q", name, key, got, want)
			}
		}
		env := strings.Join(u.Get("Service", "Environment"), " ")
		// Go exits 2 on a panic and on SIGABRT (the watchdog's signal)
		// unless GOTRACEBACK=crash: without it RestartPreventExitStatus=2
		// would keep a hung or panicked daemon down (TestAnsibleNspawn's
		// watchdog restart caught it).
		for _, want := range []string{"GOTRACEBACK=crash", "STRATA_API_TOKEN_FILE=%d/strata_api-token", "STRATA_CLUSTER_KEYRING_FILE=%d/strata_cluster.keys"} {
			if !strings.Contains(env, want) {
				t.Errorf("%s: Environment lacks %s", name, want)
			}
		}
		if name == "strata-server.service" && !strings.Contains(env, "STRATA_REPLICA_TOKEN_FILE=%d/strata_replica-token") {
			t.Errorf("%s: Environment lacks the replica token credential", name)
		}
	}
	b, _ := Load("strata-builder.service")
	if got := b.Get("Unit", "Before"); strings.Join(got, " ") != "nix-daemon.service" {
		t.Errorf("builder Before=%q", got)
	}
	if after := strings.Join(b.Get("Unit", "After"), " "); !strings.Contains(after, "network-online.target") {
		t.Errorf("builder After=%q lacks network-online.target", after)
	}
	if caps := strings.Join(b.Get("Service", "CapabilityBoundingSet"), " "); !strings.Contains(caps, "CAP_SYS_ADMIN") {
		t.Errorf("builder lacks CAP_SYS_ADMIN: %q", caps)
	}
	for _, k := range []string{"ProtectSystem", "PrivateTmp", "ProtectHome", "PrivateMounts", "ReadWritePaths", "TemporaryFileSystem"} {
		if v := b.Get("Service", k); v != nil {
			t.Errorf("builder sets %s=%q: a private mount namespace would hide its /nix/store overlay from the host", k, v)
		}
	}
	s, _ := Load("strata-server.service")
	if after := strings.Join(s.Get("Unit", "After"), " "); !strings.Contains(after, "zfs-mount.service") {
		t.Errorf("server After=%q lacks zfs-mount.service", after)
	}
	// A replica's btrfs receive needs CAP_CHOWN, CAP_DAC_OVERRIDE and
	// CAP_FOWNER.
	if caps := strings.Join(s.Get("Service", "CapabilityBoundingSet"), " "); caps != "CAP_DAC_READ_SEARCH CAP_SYS_ADMIN CAP_NET_BIND_SERVICE CAP_CHOWN CAP_DAC_OVERRIDE CAP_FOWNER" {
		t.Errorf("server capabilities %q", caps)
	}
}

// strata.tmpfiles creates the state and credential dirs with mode 0700.
func TestTmpfiles(t *testing.T) {
	testenv.RequireCommands(t, "systemd-tmpfiles")
	testenv.RequireRoot(t)
	root := t.TempDir()
	b, _ := Files.ReadFile("strata.tmpfiles")
	conf := filepath.Join(t.TempDir(), "strata.conf")
	os.WriteFile(conf, b, 0o644)
	if out, err := exec.Command("systemd-tmpfiles", "--create", "--root="+root, conf).CombinedOutput(); err != nil || len(out) > 0 {
		t.Fatalf("systemd-tmpfiles --create: %v\n%s", err, out)
	}
	for dir, mode := range map[string]os.FileMode{"var/lib/strata/server": 0o700, "var/lib/strata/builder": 0o700,
		"etc/strata/credentials": 0o700, "etc/strata": 0o755} {
		fi, err := os.Stat(filepath.Join(root, dir))
		if err != nil || !fi.IsDir() || fi.Mode().Perm() != mode {
			t.Errorf("/%s: %v %v, want a directory of mode %o", dir, fi.Mode(), err, mode)
		}
	}
}

func TestParseErrors(t *testing.T) {
	if _, err := Parse("Type=notify\n"); err == nil || !strings.Contains(err.Error(), "line 1") {
		t.Errorf("key outside a section: %v", err)
	}
	u, err := Parse("[Service]\nEnvironment=A=1\nEnvironment=B=2\n")
	if err != nil || strings.Join(u.Get("Service", "Environment"), ",") != "A=1,B=2" {
		t.Errorf("repeated key: %v %v", u, err)
	}
}
