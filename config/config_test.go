package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

var testKeys = []Key{
	{Name: "nfs.max_conns", Kind: Int, Default: 64, Usage: "max"},
	{Name: "failover.after", Kind: Duration, Default: "30s", Usage: "after"},
	{Name: "overlay.metacopy", Kind: Bool, Default: true, Usage: "metacopy"},
	{Name: "server.api", Kind: String, Default: "http://x:1", Usage: "api"},
}

// Flags name their kind in --help, and are converted like file and env
// values: a bare boolean flag means true, a bad value names the key.
func TestFlagsTypedAndConverted(t *testing.T) {
	l := New(testKeys)
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	l.BindFlags(fs)
	help := fs.FlagUsages()
	for _, want := range []string{"--nfs-max-conns int", "--failover-after duration", "--server-api string"} {
		if !strings.Contains(help, want) {
			t.Errorf("--help lacks %q:\n%s", want, help)
		}
	}
	if err := fs.Parse([]string{"--nfs-max-conns", "7", "--failover-after=5s", "--overlay-metacopy=false"}); err != nil {
		t.Fatal(err)
	}
	v, err := l.Load("", false)
	if err != nil {
		t.Fatal(err)
	}
	if v.Int("nfs.max_conns") != 7 || v.Duration("failover.after") != 5*time.Second || v.Bool("overlay.metacopy") || v.String("server.api") != "http://x:1" {
		t.Fatalf("loaded %v", v.m)
	}
	if v.Source["nfs.max_conns"] != "flag --nfs-max-conns" || v.Source["server.api"] != "default" {
		t.Errorf("sources %v", v.Source)
	}

	l = New(testKeys)
	fs = pflag.NewFlagSet("t", pflag.ContinueOnError)
	l.BindFlags(fs)
	if err := fs.Parse([]string{"--overlay-metacopy", "--nfs-max-conns", "many"}); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Load("", false); err == nil || !strings.Contains(err.Error(), `"nfs.max_conns"`) || !strings.Contains(err.Error(), "an integer") {
		t.Fatalf("Load with --nfs-max-conns many: %v, want an error naming the key and the kind", err)
	}
	fs.Set("nfs-max-conns", "3")
	v, err = l.Load("", false)
	if err != nil || !v.Bool("overlay.metacopy") {
		t.Fatalf("bare --overlay-metacopy: %v %v", v.m, err)
	}
}

func TestCheckEnv(t *testing.T) {
	known := map[string]string{
		"STRATA_API_TOKEN_FILE":      "key api.token_file",
		"STRATA_API_LISTEN":          "key api.listen",
		"STRATA_DEBUG_REPLICA_PAUSE": "debug hook",
	}
	env := []string{"PATH=/bin", "STRATA_API_TOKEN_FILE=/t", "STRATA_DEBUG_REPLICA_PAUSE=1", "STRATA=x", "X" + EnvPrefix + "API_TOKNE_FILE=1"}
	if err := CheckEnv(env, known); err != nil {
		t.Fatalf("only known names (and non-STRATA_ ones): %v", err)
	}
	// Typos are spelt EnvPrefix+"..." so that cmd/strata's scan of the
	// repository for STRATA_ names does not find them.
	err := CheckEnv(append(env, EnvPrefix+"API_TOKNE_FILE=/t", EnvPrefix+"ZZZ="), known)
	for _, w := range []string{"unknown environment variable " + EnvPrefix + "API_TOKNE_FILE", "(and 1 more: " + EnvPrefix + "ZZZ)", "did you mean STRATA_API_TOKEN_FILE (key api.token_file)"} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("typo: %v, want %q", err, w)
		}
	}
	if err := CheckEnv([]string{EnvPrefix + "DEBUG_REPLICA_PASUE="}, known); err == nil || !strings.Contains(err.Error(), "did you mean STRATA_DEBUG_REPLICA_PAUSE (debug hook)") {
		t.Errorf("typo of a non-key name: %v", err)
	}
	for a, want := range map[[2]string]int{{"", "ab"}: 2, {"TOKEN", "TOKNE"}: 1, {"abc", "abc"}: 0, {"kitten", "sitting"}: 3, {"ca", "abc"}: 3} {
		if d := editDistance(a[0], a[1]); d != want {
			t.Errorf("editDistance(%q, %q) = %d, want %d", a[0], a[1], d, want)
		}
	}
}

// A mistyped key in the file is named with the key it most likely means,
// as a mistyped STRATA_* variable is; a name close to no key gets no guess.
func TestUnknownKeySuggests(t *testing.T) {
	for yaml, want := range map[string]string{
		"nfs:\n  max_con: 3\n":        `unknown key "nfs.max_con": did you mean "nfs.max_conns"?`,
		"failover:\n  afer: 3s\n":     `unknown key "failover.afer": did you mean "failover.after"?`,
		"overlay:\n  meta-copy: no\n": `unknown key "overlay.meta-copy": did you mean "overlay.metacopy"?`,
		"api:\n  server: http://x\n":  `unknown key "api.server" (known keys:`,
		"client:\n  api: http://x\n":  `unknown key "client.api": did you mean "server.api"?`,
		"nfs:\n  max: 3\n":            `unknown key "nfs.max": did you mean "nfs.max_conns"?`,
		"zzz: 1\n":                    `unknown key "zzz" (known keys:`,
	} {
		f := filepath.Join(t.TempDir(), "c.yaml")
		if err := os.WriteFile(f, []byte(yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := New(testKeys).Load(f, true)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Load(%q): %v, want %q", yaml, err, want)
		}
	}
}

// An error about a loaded value says where the value came from, so that
// an operator whose file looks right looks at the variable or the flag.
func TestBadNamesTheSource(t *testing.T) {
	f := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(f, []byte("failover:\n  after: 1ms\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("STRATA_SERVER_API", "central")
	l := New(testKeys)
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	l.BindFlags(fs)
	if err := fs.Parse([]string{"--nfs-max-conns=0"}); err != nil {
		t.Fatal(err)
	}
	v, err := l.Load(f, true)
	if err != nil {
		t.Fatal(err)
	}
	for key, want := range map[string]string{
		"failover.after":   `config: key "failover.after" (from file): value "1ms": want more`,
		"server.api":       `config: key "server.api" (from env STRATA_SERVER_API): value "central": want more`,
		"nfs.max_conns":    `config: key "nfs.max_conns" (from flag --nfs-max-conns): value "0": want more`,
		"overlay.metacopy": `config: key "overlay.metacopy": value "true": want more`, // the default
	} {
		val := any(v.String(key))
		switch key {
		case "failover.after":
			val = v.Duration(key)
		case "nfs.max_conns":
			val = v.Int(key)
		case "overlay.metacopy":
			val = v.Bool(key)
		}
		if got := v.Bad(key, val, "more").Error(); got != want {
			t.Errorf("Bad(%s) = %s, want %s", key, got, want)
		}
	}
	if got := v.Invalid("server.api", "central", errors.New("no scheme")).Error(); got != `config: key "server.api" (from env STRATA_SERVER_API): value "central": no scheme` {
		t.Errorf("Invalid = %s", got)
	}
}
