package nixos

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/strata-nix/strata/config"
	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/server"
	"github.com/strata-nix/strata/systemd"
)

var update = flag.Bool("update", false, "rewrite keys.json from the daemons' key tables")

// keys.json is what the module builds its typed settings from: it must
// list exactly the keys the daemons have.
func TestKeysJSONUpToDate(t *testing.T) {
	want, err := KeysJSON()
	if err != nil {
		t.Fatal(err)
	}
	if *update {
		if err := os.WriteFile("keys.json", want, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile("keys.json")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("nixos/keys.json differs from the daemons' key tables (a key was added, removed or changed): " +
			"run `go test ./nixos/ -run TestKeysJSONUpToDate -update` and commit it")
	}
}

// evalMachine evaluates tests/eval.nix with machine (a Nix function of
// fakePackage returning a NixOS module) and returns the JSON result, or the
// evaluation error.
func evalMachine(t *testing.T, machine string) (result, error) {
	t.Helper()
	testenv.RequireCommands(t, "nix-instantiate")
	lib := nixpkgsLib(t)
	m := filepath.Join(t.TempDir(), "machine.nix")
	os.WriteFile(m, []byte(machine), 0o644)
	cmd := exec.Command("nix-instantiate", "--eval", "--strict", "--json", "tests/eval.nix",
		"--arg", "lib", "import "+lib, "--arg", "machine", m)
	// No store or daemon is needed to evaluate; keep nix quiet about the
	// missing build users group.
	cmd.Env = append(os.Environ(), "NIX_CONFIG=build-users-group =")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return result{}, fmt.Errorf("%v: %s", err, stderr.String())
	}
	var r result
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		t.Fatalf("eval output: %v\n%s", err, stdout.String())
	}
	return r, nil
}

// nixpkgsLib is nixpkgs' lib/ vendored for tests (never copied into the
// project); STRATA_NIXPKGS_LIB overrides where it is.
func nixpkgsLib(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("STRATA_NIXPKGS_LIB")
	if dir == "" {
		dir = "/work/shared/vendor/nixpkgs-lib/lib"
	}
	_, err := os.Stat(filepath.Join(dir, "default.nix"))
	testenv.Require(t, err == nil, "needs nixpkgs' lib/ at "+dir+" (STRATA_NIXPKGS_LIB)")
	return dir
}

type unitJSON struct {
	Description   string                     `json:"description"`
	After         []string                   `json:"after"`
	Wants         []string                   `json:"wants"`
	Before        []string                   `json:"before"`
	WantedBy      []string                   `json:"wantedBy"`
	UnitConfig    map[string]json.RawMessage `json:"unitConfig"`
	ServiceConfig map[string]json.RawMessage `json:"serviceConfig"`
}

type result struct {
	Etc      map[string]string   `json:"etc"`
	Services map[string]unitJSON `json:"services"`
	Firewall struct {
		TCP []int `json:"tcp"`
		UDP []int `json:"udp"`
	} `json:"firewall"`
	KernelModules    []string `json:"kernelModules"`
	Tmpfiles         []string `json:"tmpfiles"`
	FailedAssertions []string `json:"failedAssertions"`
}

// values decodes a serviceConfig value (a string or a list of strings).
func values(t *testing.T, raw json.RawMessage) []string {
	if raw == nil {
		return nil
	}
	var one string
	if json.Unmarshal(raw, &one) == nil {
		return []string{one}
	}
	var many []string
	if err := json.Unmarshal(raw, &many); err != nil {
		t.Fatalf("serviceConfig value %s", raw)
	}
	return many
}

const machine = `{ fakePackage }:
{
  services.strata.server = {
    enable = true;
    package = fakePackage "strata";
    openFirewall = true;
    apiTokenFile = "/run/secrets/strata-token";
    replicaTokenFile = "/run/secrets/strata-replica-token";
    settings = {
      nfs.allow = [ "10.0.0.0/8" ];
      nfs.listen = "0.0.0.0:2049";
      api.listen = "0.0.0.0:7480";
      log.level = "debug";
      publish.interval = "10m";
      retention.keep = 20;
      state_dir = "/var/lib/strata/server";
      store.root = "/srv/strata/nix";
      snapshot.snapshot_dir = "/srv/strata/snapshots";
    };
  };
  services.strata.builder = {
    enable = true;
    package = fakePackage "strata";
    openFirewall = true;
    settings = {
      server.api = "http://central:7480";
      rotate.policy = "idle";
      mount.options = [ "timeo=600" ];
      cluster = { bind = "0.0.0.0:7946"; join = [ "central:7946" ]; insecure = true; };
    };
  };
}
`

// The module evaluates with the real module system; its config files are
// ones strata accepts; its units are the shipped ones.
func TestModuleEval(t *testing.T) {
	r, err := evalMachine(t, machine)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.FailedAssertions) > 0 {
		t.Fatalf("failed assertions: %q", r.FailedAssertions)
	}
	if strings.Join(r.Tmpfiles, "\n") != "d /srv/strata/snapshots 0700 root root -" {
		t.Errorf("tmpfiles rules %q, want the btrfs snapshot dir", r.Tmpfiles)
	}
	// The builder's --check-config validates the file alone; the server's
	// also inspects the store on disk, so here its file goes through the
	// same validation (config loader + ConfigFrom) in-process, and
	// TestServerCheckConfigOnRealStore (integration) runs --check-config
	// against a real btrfs store.
	bin := buildStrata(t)
	p := filepath.Join(t.TempDir(), "builder.yaml")
	os.WriteFile(p, []byte(r.Etc["strata/builder.yaml"]), 0o600)
	if out, err := exec.Command(bin, "builder", "--check-config", "--config", p).CombinedOutput(); err != nil || !strings.Contains(string(out), "configuration: ok") {
		t.Fatalf("strata builder --check-config of the rendered builder.yaml (%s): %v\n%s", r.Etc["strata/builder.yaml"], err, out)
	}
	checkServerYAML(t, r.Etc["strata/server.yaml"])
	if want := `{"api":{"listen":"0.0.0.0:7480"},"log":{"level":"debug"},"nfs":{"allow":["10.0.0.0/8"],"listen":"0.0.0.0:2049"},"publish":{"interval":"10m"},"retention":{"keep":20},"snapshot":{"snapshot_dir":"/srv/strata/snapshots"},"state_dir":"/var/lib/strata/server","store":{"root":"/srv/strata/nix"}}`; r.Etc["strata/server.yaml"] != want {
		t.Errorf("server.yaml:\n got %s\nwant %s", r.Etc["strata/server.yaml"], want)
	}

	for role, name := range map[string]string{"server": "strata-server", "builder": "strata-builder"} {
		shipped, err := systemd.Load(name + ".service")
		if err != nil {
			t.Fatal(err)
		}
		got, ok := r.Services[name]
		if !ok {
			t.Fatalf("no systemd.services.%s", name)
		}
		words := func(k string) []string { return strings.Fields(strings.Join(shipped.Get("Unit", k), " ")) }
		for k, g := range map[string][]string{"After": got.After, "Wants": got.Wants, "Before": got.Before} {
			if strings.Join(g, " ") != strings.Join(words(k), " ") {
				t.Errorf("%s: %s = %q, shipped unit %q", name, k, g, words(k))
			}
		}
		if strings.Join(got.WantedBy, " ") != "multi-user.target" {
			t.Errorf("%s: wantedBy %q", name, got.WantedBy)
		}
		// The server adds its store layout, as the Ansible role's drop-in.
		wantRM, wantRW := words("RequiresMountsFor"), []string(nil)
		if role == "server" {
			wantRM = append(wantRM, "/srv/strata/nix", "/srv/strata/snapshots")
			wantRW = []string{"/srv/strata/nix", "/srv/strata/snapshots"}
		}
		if rm := values(t, got.UnitConfig["RequiresMountsFor"]); strings.Join(rm, " ") != strings.Join(wantRM, " ") {
			t.Errorf("%s: RequiresMountsFor %q, want %q", name, rm, wantRM)
		}
		if rw := values(t, got.ServiceConfig["ReadWritePaths"]); strings.Join(rw, " ") != strings.Join(wantRW, " ") {
			t.Errorf("%s: ReadWritePaths %q, want %q", name, rw, wantRW)
		}
		// Every [Service] directive of the shipped unit, same values, with
		// the executables of the NixOS system and the secrets from their
		// own paths.
		pkg := "/nix/store/00000000000000000000000000000006-strata"
		coreutils := "/nix/store/00000000000000000000000000000009-coreutils"
		for k, want := range shipped["Service"] {
			switch k {
			case "LoadCredential":
				want = nil
				if role == "server" {
					want = []string{"strata_api-token:/run/secrets/strata-token", "strata_replica-token:/run/secrets/strata-replica-token"}
				}
			default:
				for i, v := range want {
					want[i] = strings.NewReplacer("/usr/bin/strata", pkg+"/bin/strata", "/bin/kill", coreutils+"/bin/kill",
						"/bin/mkdir", coreutils+"/bin/mkdir").Replace(v)
				}
			}
			gv := values(t, got.ServiceConfig[k])
			if len(want) == 0 && len(gv) == 0 {
				continue
			}
			if strings.Join(gv, "\n") != strings.Join(want, "\n") {
				t.Errorf("%s: serviceConfig.%s = %q, shipped %q", name, k, gv, want)
			}
		}
		for k := range got.ServiceConfig {
			if shipped.Get("Service", k) == nil && k != "ReadWritePaths" {
				t.Errorf("%s: serviceConfig.%s is not in the shipped unit", name, k)
			}
		}
		for k, want := range map[string]string{"Type": "notify", "NotifyAccess": "main", "WatchdogSec": "60s"} {
			if g := values(t, got.ServiceConfig[k]); len(g) != 1 || g[0] != want {
				t.Errorf("%s: %s = %q, want %s", name, k, g, want)
			}
		}
	}
	if b := r.Services["strata-builder"].Before; strings.Join(b, " ") != "nix-daemon.service" {
		t.Errorf("builder before = %q, want nix-daemon.service", b)
	}
	if fmt.Sprint(r.Firewall.TCP) != "[2049 7480 7946]" || fmt.Sprint(r.Firewall.UDP) != "[7946]" {
		t.Errorf("firewall (server: NFS and API; builder: gossip): tcp %v udp %v, want [2049 7480 7946] [7946]", r.Firewall.TCP, r.Firewall.UDP)
	}
	if strings.Join(r.KernelModules, " ") != "nfs overlay" {
		t.Errorf("kernelModules %q, want nfs overlay", r.KernelModules)
	}
}

// openFirewall defaults to false, and nothing is enabled by default; the
// only key a btrfs server must be given is snapshot.snapshot_dir.
func TestModuleDefaults(t *testing.T) {
	r, err := evalMachine(t, `{ fakePackage }: { services.strata.server = { enable = true; package = fakePackage "strata";
  settings.snapshot.snapshot_dir = "/srv/snapshots"; }; }`)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Firewall.TCP)+len(r.Firewall.UDP) != 0 || len(r.KernelModules) != 0 || len(r.Services) != 1 || len(r.FailedAssertions) != 0 {
		t.Fatalf("defaults: firewall %v/%v, modules %v, services %d, failed assertions %q", r.Firewall.TCP, r.Firewall.UDP, r.KernelModules, len(r.Services), r.FailedAssertions)
	}
	if want := `{"snapshot":{"snapshot_dir":"/srv/snapshots"}}`; r.Etc["strata/server.yaml"] != want {
		t.Fatalf("rendered %q, want %s (strata's defaults for the rest)", r.Etc["strata/server.yaml"], want)
	}
	checkServerYAML(t, r.Etc["strata/server.yaml"])
}

// checkServerYAML validates a rendered server.yaml as a start does (config
// loader and ConfigFrom; the store on disk is TestServerCheckConfigOnRealStore's).
func checkServerYAML(t *testing.T, text string) server.Config {
	t.Helper()
	p := filepath.Join(t.TempDir(), "server.yaml")
	os.WriteFile(p, []byte(text), 0o600)
	v, err := config.New(server.Keys).Load(p, true)
	var c server.Config
	if err == nil {
		c, err = server.ConfigFrom(v)
	}
	if err != nil {
		t.Fatalf("rendered server.yaml (%s): %v", text, err)
	}
	return c
}

// A btrfs replica: its config is one strata accepts as a replica's, its
// layout is the snapshot dir alone (no store root: a replica has none, and
// ReadWritePaths= of a missing /nix would fail the unit), and the
// primary's token comes in as the replica-token credential.
func TestModuleReplica(t *testing.T) {
	r, err := evalMachine(t, `{ fakePackage }: { services.strata.server = { enable = true; package = fakePackage "strata";
  replicaTokenFile = "/run/secrets/primary-token";
  settings = { snapshot.snapshot_dir = "/srv/replica"; replica.of = "http://primary:7480"; nfs.allow = [ "10.0.0.0/8" ]; }; }; }`)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.FailedAssertions) != 0 {
		t.Fatalf("failed assertions: %q", r.FailedAssertions)
	}
	if c := checkServerYAML(t, r.Etc["strata/server.yaml"]); !c.Replica() || c.ReplicaOf != "http://primary:7480" {
		t.Fatalf("rendered server.yaml is not a replica's: %+v", c)
	}
	s := r.Services["strata-server"]
	shipped, _ := systemd.Load("strata-server.service")
	wantRM := append(strings.Fields(strings.Join(shipped.Get("Unit", "RequiresMountsFor"), " ")), "/srv/replica")
	if rm := values(t, s.UnitConfig["RequiresMountsFor"]); strings.Join(rm, " ") != strings.Join(wantRM, " ") {
		t.Errorf("replica RequiresMountsFor %q, want %q", rm, wantRM)
	}
	if rw := values(t, s.ServiceConfig["ReadWritePaths"]); strings.Join(rw, " ") != "/srv/replica" {
		t.Errorf("replica ReadWritePaths %q, want the snapshot dir alone", rw)
	}
	if lc := values(t, s.ServiceConfig["LoadCredential"]); strings.Join(lc, " ") != "strata_replica-token:/run/secrets/primary-token" {
		t.Errorf("replica LoadCredential %q", lc)
	}
	if strings.Join(values(t, s.ServiceConfig["RestartPreventExitStatus"]), " ") != "2" {
		t.Errorf("RestartPreventExitStatus %s, want 2 (no restart loop on a config error)", s.ServiceConfig["RestartPreventExitStatus"])
	}
}

// What would stop the daemon at its first start, or a setting the unit
// silently overrides, fails evaluation (a NixOS assertion) naming the
// option to set.
func TestModuleAssertions(t *testing.T) {
	for name, tc := range map[string]struct{ role, cfg, want string }{
		"btrfs without snapshot dir": {"server", `settings.store.root = "/srv/nix";`,
			"services.strata.server.settings.snapshot.snapshot_dir must be set with the btrfs backend: a directory on the btrfs filesystem of the central store, outside store.root."},
		"replica without snapshot dir": {"server", `settings.replica.of = "http://p:7480"; replicaTokenFile = "/run/t";`,
			"services.strata.server.settings.snapshot.snapshot_dir must be set with the btrfs backend: any directory on a btrfs filesystem"},
		"replica without token": {"server", `settings.snapshot.snapshot_dir = "/s"; settings.replica.of = "http://p:7480";`,
			"services.strata.server: a replica (settings.replica.of or settings.replica.from_cluster) needs the primary's API token: set services.strata.server.replicaTokenFile."},
		"replica from cluster without token": {"server", `settings.snapshot.snapshot_dir = "/s"; settings.replica.from_cluster = true; settings.cluster.join = [ "p:7946" ]; clusterKeyringFile = "/run/k";`,
			"set services.strata.server.replicaTokenFile."},
		"gossip without keyring": {"builder", `settings.cluster.join = [ "central:7946" ];`,
			"services.strata.builder: gossip is on (settings.cluster.bind or settings.cluster.join) and needs a keyring: set services.strata.builder.clusterKeyringFile"},
		"server gossip without keyring": {"server", `settings.snapshot.snapshot_dir = "/s"; settings.cluster.bind = "0.0.0.0:7946";`,
			"set services.strata.server.clusterKeyringFile"},
		"token_file in settings": {"server", `settings.snapshot.snapshot_dir = "/s"; settings.api.token_file = "/etc/token";`,
			"services.strata.server.settings.api.token_file is set, but the unit sets api.token_file to its credential (LoadCredential=), so the value would be ignored: set services.strata.server.apiTokenFile instead."},
		"keyring_file in settings": {"builder", `settings.cluster.keyring_file = "/etc/keys"; settings.cluster.insecure = true;`,
			"set services.strata.builder.clusterKeyringFile instead."},
		"replica token_file in settings": {"server", `settings.snapshot.snapshot_dir = "/s"; settings.replica.token_file = "/etc/rt";`,
			"set services.strata.server.replicaTokenFile instead."},
	} {
		t.Run(name, func(t *testing.T) {
			r, err := evalMachine(t, `{ fakePackage }: { services.strata.`+tc.role+` = { enable = true; package = fakePackage "strata"; `+tc.cfg+` }; }`)
			if err != nil {
				t.Fatal(err)
			}
			if len(r.FailedAssertions) != 1 || !strings.Contains(r.FailedAssertions[0], tc.want) {
				t.Fatalf("failed assertions %q, want one containing %q", r.FailedAssertions, tc.want)
			}
		})
	}
	// Gossip with cluster.insecure needs no keyring.
	r, err := evalMachine(t, `{ fakePackage }: { services.strata.builder = { enable = true; package = fakePackage "strata"; settings.cluster = { join = [ "c:7946" ]; insecure = true; }; }; }`)
	if err != nil || len(r.FailedAssertions) != 0 {
		t.Fatalf("insecure gossip: %v %q", err, r.FailedAssertions)
	}
}

// A wrong type or an unknown key in settings is an evaluation error that
// names the option.
func TestModuleEvalErrors(t *testing.T) {
	for name, tc := range map[string]struct{ settings, want string }{
		"unknown key":         {`settings.nfs.alow = [ "10.0.0.0/8" ];`, "services.strata.server.settings.nfs.alow' does not exist"},
		"unknown section":     {`settings.bogus.x = 1;`, "services.strata.server.settings.bogus' does not exist"},
		"int as string":       {`settings.retention.keep = "ten";`, "services.strata.server.settings.retention.keep' is not of type"},
		"list as string":      {`settings.nfs.allow = "10.0.0.0/8";`, "services.strata.server.settings.nfs.allow' is not of type"},
		"bad enum":            {`settings.log.level = "verbose";`, "services.strata.server.settings.log.level' is not of type"},
		"bad duration":        {`settings.publish.interval = "five minutes";`, "services.strata.server.settings.publish.interval' is not of type"},
		"secret as Nix path":  {`apiTokenFile = ./token;`, "services.strata.server.apiTokenFile' is not of type"},
		"openFirewall string": {`openFirewall = "yes";`, "services.strata.server.openFirewall' is not of type"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := evalMachine(t, `{ fakePackage }: { services.strata.server = { enable = true; package = fakePackage "strata"; `+tc.settings+` }; }`)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

// buildStrata builds cmd/strata into a temp dir.
func buildStrata(t *testing.T) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "strata")
	if b, err := exec.Command("go", "build", "-o", out, "github.com/strata-nix/strata/cmd/strata").CombinedOutput(); err != nil {
		t.Fatalf("build strata: %v\n%s", err, b)
	}
	return out
}

// The nixpkgs-format VM test and its package expression cannot run here
// (no nixpkgs, no KVM), but they must at least parse, and the test must be
// a function of strata giving a name, nodes and a test script.
func TestVMTestParses(t *testing.T) {
	testenv.RequireCommands(t, "nix-instantiate")
	for _, f := range []string{"tests/strata.nix", "tests/package.nix"} {
		if out, err := exec.Command("nix-instantiate", "--parse", f).CombinedOutput(); err != nil {
			t.Errorf("nix-instantiate --parse %s: %v\n%s", f, err, out)
		}
	}
	cmd := exec.Command("nix-instantiate", "--eval", "--strict", "--json", "-E",
		`builtins.attrNames ((import ./tests/strata.nix { strata = null; }).nodes) ++ [ (import ./tests/strata.nix { strata = null; }).name ]`)
	cmd.Env = append(os.Environ(), "NIX_CONFIG=build-users-group =")
	out, err := cmd.Output()
	if err != nil || string(out) != `["builder","central","strata"]` {
		t.Fatalf("nixos/tests/strata.nix: nodes and name %s, %v", out, err)
	}
	// The central node's server settings are a configuration strata
	// accepts (snapshot.snapshot_dir is required with btrfs).
	cmd = exec.Command("nix-instantiate", "--eval", "--strict", "--json", "-E",
		`let lib = import `+nixpkgsLib(t)+`; node = (import ./tests/strata.nix { strata = null; }).nodes.central { pkgs = { inherit lib; btrfs-progs = null; nix = null; }; };
		 in builtins.toJSON node.services.strata.server.settings`)
	cmd.Env = append(os.Environ(), "NIX_CONFIG=build-users-group =")
	out, err = cmd.Output()
	var settings string
	if err == nil {
		err = json.Unmarshal(out, &settings)
	}
	if err != nil {
		t.Fatalf("nixos/tests/strata.nix: central's settings: %v %s", err, out)
	}
	if c := checkServerYAML(t, settings); c.SnapshotDir != "/srv/snapshots" {
		t.Fatalf("nixos/tests/strata.nix: central's snapshot dir %q", c.SnapshotDir)
	}
}
