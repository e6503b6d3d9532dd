// Package nixtest makes real Nix stores for tests with Debian's nix-bin: a
// chroot store at ROOT (ROOT/nix/store, ROOT/nix/var/nix/db) filled with
// `nix-store --add` and `nix-build --store ROOT`, so there are derivers and
// references, with no network and no daemon.
package nixtest

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/strata-nix/strata/internal/testenv"
)

// Store is a chroot Nix store at Root; its central-store root (holding
// store/ and var/nix/db/) is Root/nix.
type Store struct {
	Root string
	// Bin is the directory of the nix tools to run (nix-store, nix,
	// nix-build); "" means PATH (Debian's nix-bin). See Trixie.
	Bin string
	// Features are extra experimental features every command enables
	// (e.g. "ca-derivations").
	Features []string
}

// NixRoot is the central-store root: the directory holding store/ and
// var/nix/db/.
func (s Store) NixRoot() string { return filepath.Join(s.Root, "nix") }

// Options common to every nix command on a chroot store without network,
// daemon or build users.
func (s Store) opts() []string {
	return []string{"--store", s.Root,
		"--option", "build-users-group", "",
		"--option", "substituters", "",
	}
}

// Tool returns the path of a nix tool of this store's Nix.
func (s Store) Tool(tool string) string {
	if s.Bin != "" {
		return filepath.Join(s.Bin, tool)
	}
	return tool
}

// Command returns a nix-store (or other nix tool) command on this store.
func (s Store) Command(tool string, args ...string) *exec.Cmd {
	all := append(s.opts(), args...)
	cmd := exec.Command(s.Tool(tool), all...)
	conf := "experimental-features = nix-command " + strings.Join(s.Features, " ")
	cmd.Env = append(os.Environ(), "NIX_CONFIG="+conf, "PAGER=cat")
	return cmd
}

// Run runs a nix tool on this store and returns its trimmed stdout.
func (s Store) Run(t testing.TB, tool string, args ...string) string {
	t.Helper()
	return s.run(t, tool, args...)
}

func (s Store) run(t testing.TB, tool string, args ...string) string {
	t.Helper()
	cmd := s.Command(tool, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", tool, strings.Join(args, " "), err, stderr.String())
	}
	return strings.TrimSpace(string(out))
}

// New makes an empty chroot store under root (created if missing).
func New(t testing.TB, root string) Store {
	return NewWith(t, Store{Root: root})
}

// NewWith makes the empty chroot store s (s.Root created if missing), run
// with s.Bin's Nix and s.Features.
func NewWith(t testing.TB, s Store) Store {
	t.Helper()
	root := s.Root
	if s.Bin == "" {
		testenv.RequireCommands(t, "nix-store", "nix-build", "busybox")
	} else {
		testenv.RequireCommands(t, "busybox")
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	// Any query initialises the store's directories and database.
	s.run(t, "nix-store", "--dump-db")
	return s
}

// AddTree writes files (relative path -> content; a content starting with
// "->" makes a symlink to the rest, a path ending in "*" is made executable
// with the star dropped) into a fresh directory called name and adds it with
// nix-store --add. It returns the store path.
func (s Store) AddTree(t testing.TB, name string, files map[string]string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), name)
	for rel, content := range files {
		mode := os.FileMode(0o644)
		if strings.HasSuffix(rel, "*") {
			rel, mode = strings.TrimSuffix(rel, "*"), 0o755
		}
		p := filepath.Join(dir, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if target, ok := strings.CutPrefix(content, "->"); ok {
			if err := os.Symlink(target, p); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
	}
	if len(files) == 0 {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return s.run(t, "nix-store", "--add", dir)
}

// AddText adds a single file called name with content.
func (s Store) AddText(t testing.TB, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return s.run(t, "nix-store", "--add", p)
}

// Build builds a derivation called name whose builder is busybox sh running
// script, with the store paths in inputs available (and referenced) as
// $in0, $in1, …. It returns the output path. The .drv is the output's deriver
// and the inputs are its references when script writes them into $out.
func (s Store) Build(t testing.TB, name, script string, inputs ...string) string {
	t.Helper()
	return s.build(t, name, script, "", inputs...)
}

// BuildFloatingCA builds a floating content-addressed derivation (needs
// s.Features to hold "ca-derivations", Nix ≥ 2.4): its .drv has no output
// path, and the build registers a Realisation.
func (s Store) BuildFloatingCA(t testing.TB, name, script string, inputs ...string) string {
	t.Helper()
	return s.build(t, name, script, "  __contentAddressed = true;\n  outputHashMode = \"recursive\";\n  outputHashAlgo = \"sha256\";\n", inputs...)
}

func (s Store) build(t testing.TB, name, script, attrs string, inputs ...string) string {
	t.Helper()
	var env strings.Builder
	env.WriteString(attrs)
	for i, in := range inputs {
		fmt.Fprintf(&env, "  in%d = builtins.storePath %q;\n", i, in)
	}
	expr := fmt.Sprintf(`derivation {
  name = %q;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" %q ];
%s}
`, name, script, env.String())
	f := filepath.Join(t.TempDir(), name+".nix")
	if err := os.WriteFile(f, []byte(expr), 0o644); err != nil {
		t.Fatal(err)
	}
	sh, err := filepath.EvalSymlinks(mustLook(t, "busybox"))
	if err != nil {
		t.Fatal(err)
	}
	args := []string{f, "--no-out-link", "--option", "sandbox-paths", "/bin/sh=" + sh}
	if s.Bin != "" {
		// A wrapped Nix cannot re-execute itself as the build hook (its
		// /proc/self/exe is the loader); no remote builders are used.
		args = append(args, "--option", "build-hook", "")
	}
	return s.run(t, "nix-build", args...)
}

// DumpDB returns `nix-store --dump-db` of the store.
func (s Store) DumpDB(t testing.TB) string {
	t.Helper()
	return s.run(t, "nix-store", "--dump-db") + "\n"
}

// Delete removes a store path with nix-store --delete.
func (s Store) Delete(t testing.TB, path string) {
	t.Helper()
	s.run(t, "nix-store", "--delete", path)
}

// Fill makes a small but realistic store: three added trees (with an
// executable, a symlink and a subdirectory) and a built derivation that
// refers to one of them. It returns the store paths it made.
func (s Store) Fill(t testing.TB) []string {
	t.Helper()
	a := s.AddTree(t, "tool-a", map[string]string{"bin/run*": "#!/bin/sh\necho a\n", "share/doc/README": "tool a\n", "lib": "->share/doc"})
	b := s.AddTree(t, "data-b", map[string]string{"data.txt": strings.Repeat("b", 10000)})
	c := s.AddText(t, "note-c", "a lone file\n")
	out := s.Build(t, "uses-a", `mkdir $out; echo $in0/bin/run > $out/ref; echo built > $out/x`, a)
	return []string{a, b, c, out}
}

func mustLook(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("look up %s: %v", name, err)
	}
	return p
}

// Version is `nix-store --version`'s version number ("2.8.0").
func (s Store) Version(t testing.TB) string {
	t.Helper()
	out := s.run(t, "nix-store", "--version")
	f := strings.Fields(out)
	return f[len(f)-1]
}

// GenerateKey makes a signing key pair called name with
// nix-store --generate-binary-cache-key and returns the files.
func GenerateKey(t testing.TB, name string) (secret, public string) {
	t.Helper()
	dir := t.TempDir()
	secret, public = filepath.Join(dir, name+".sk"), filepath.Join(dir, name+".pk")
	cmd := exec.Command("nix-store", "--generate-binary-cache-key", name, secret, public)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("generate key: %v\n%s", err, out)
	}
	return secret, public
}

// Sign signs paths with the secret key file (nix store sign).
func (s Store) Sign(t testing.TB, secret string, paths ...string) {
	t.Helper()
	s.run(t, "nix", append([]string{"store", "sign", "--key-file", secret}, paths...)...)
}

// PathInfo is one entry of `nix path-info --json` (the fields that
// survive every Nix version's output).
type PathInfo struct {
	Path             string   `json:"path"`
	NarHash          string   `json:"narHash"`
	NarSize          uint64   `json:"narSize"`
	References       []string `json:"references"`
	Deriver          string   `json:"deriver"`
	CA               string   `json:"ca"`
	Signatures       []string `json:"signatures"`
	RegistrationTime int64    `json:"registrationTime"`
	Ultimate         bool     `json:"ultimate"`
}

// PathInfos runs `nix path-info --json --all` (or of paths) and returns
// the entries by path. Nix 2.19+ prints an object keyed by path; older
// ones a list: both are read.
func (s Store) PathInfos(t testing.TB, paths ...string) map[string]PathInfo {
	t.Helper()
	args := []string{"path-info", "--json"}
	if len(paths) == 0 {
		args = append(args, "--all")
	}
	out := s.run(t, "nix", append(args, paths...)...)
	res, err := ParsePathInfos(out)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// ParsePathInfos reads `nix path-info --json` output: a list (Nix < 2.19)
// or an object keyed by path (later). Versions differ in empty fields ([]
// or absent, null or absent): they are normalised to nil.
func ParsePathInfos(out string) (map[string]PathInfo, error) {
	res := map[string]PathInfo{}
	norm := func(p PathInfo) PathInfo {
		if len(p.References) == 0 {
			p.References = nil
		}
		if len(p.Signatures) == 0 {
			p.Signatures = nil
		}
		return p
	}
	var list []PathInfo
	if err := json.Unmarshal([]byte(out), &list); err == nil {
		for _, p := range list {
			res[p.Path] = norm(p)
		}
		return res, nil
	}
	var obj map[string]*PathInfo
	if err := json.Unmarshal([]byte(out), &obj); err != nil {
		return nil, fmt.Errorf("nix path-info --json: %w: %s", err, out)
	}
	for p, in := range obj {
		if in == nil {
			return nil, fmt.Errorf("nix path-info: %s is not valid", p)
		}
		in.Path = p
		res[p] = norm(*in)
	}
	return res, nil
}

// TrixieBin returns the directory of Debian trixie's Nix 2.26 wrappers made
// by scripts/nix-trixie.sh (STRATA_NIX_TRIXIE, default
// /var/cache/strata/nix-trixie). Without it the test fails under CI=true
// and skips otherwise.
func TrixieBin(t testing.TB) string {
	t.Helper()
	dir := os.Getenv("STRATA_NIX_TRIXIE")
	if dir == "" {
		dir = "/var/cache/strata/nix-trixie"
	}
	bin := filepath.Join(dir, "bin")
	_, err := os.Stat(filepath.Join(bin, "nix-store"))
	testenv.Require(t, err == nil, "trixie's nix 2.26 in "+dir+" (run scripts/nix-trixie.sh)")
	return bin
}
