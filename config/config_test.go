package config

import (
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
