//go:build vm

package vm

import (
	"context"
	"strings"
	"testing"
)

// TestBootSmoke boots each kernel, checks the script's status and output
// come back, and that a failing script's status and kernel log come back too.
func TestBootSmoke(t *testing.T) {
	for _, k := range []Kernel{Kernel61, Kernel612} {
		t.Run(k.String(), func(t *testing.T) {
			res := Boot(context.Background(), t, Guest{
				Kernel: k,
				Script: `echo "kernel=$(uname -r)"; ip addr show eth0 | grep -q 10.0.2.15 && echo net-ok; cat /data.txt; exit 3`,
				Files:  []File{{Guest: "/data.txt", Data: []byte("payload-ok\n")}},
			})
			if res.Status != 3 {
				t.Fatalf("status = %d, want 3", res.Status)
			}
			want := "kernel=6.1."
			if k == Kernel612 {
				want = "kernel=6.12."
			}
			for _, w := range []string{want, "net-ok", "payload-ok", "script failed with status 3"} {
				if !strings.Contains(res.Output, w) {
					t.Errorf("output lacks %q", w)
				}
			}
			t.Logf("checked: %s guest boots, runs the script with its files and network, reports status 3 and its kernel log (%.1fs)", k, res.Elapsed.Seconds())
		})
	}
}
