//go:build integration

package builder

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/mountinfo"
)

// A reaped mount (a dead server's, on kernels without the NFS shutdown
// knob) outlives the agent that reaps it: the bind under state_dir/dead
// stays mounted when the agent stops, the next agent adopts and reaps it
// again, and releases it once its file system answers statfs (the server
// is back). A tmpfs stands in for the dead server's NFS mount (this host
// has no NFS client), so it answers at the first ask.
func TestReaperSurvivesRestart(t *testing.T) {
	testenv.RequireRoot(t)
	base := t.TempDir()
	src, dead := filepath.Join(base, "lower-1"), filepath.Join(base, "dead")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	testenv.Run(t, "mount", "-t", "tmpfs", "-o", "size=1m", "strata-reaper-test", src)
	t.Cleanup(func() {
		ms, _ := mountinfo.Read()
		for _, m := range mountinfo.Under(ms, base) {
			unix.Unmount(m.Mountpoint, unix.MNT_DETACH)
		}
		unix.Unmount(src, unix.MNT_DETACH)
	})
	binds := func() []string {
		ms, err := mountinfo.Read()
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, m := range mountinfo.Under(ms, dead) {
			out = append(out, m.Mountpoint)
		}
		return out
	}
	log := testLogger(t)
	ctx1, stop1 := context.WithCancel(context.Background())
	s1 := &System{DeadDir: dead}
	if err := s1.reaper.adopt(ctx1, src, dead, log); err != nil {
		t.Fatal(err)
	}
	kept := binds()
	if len(kept) != 1 {
		t.Fatalf("binds under %s: %v, want one", dead, kept)
	}
	// The agent stops before the first statfs ask.
	stop1()
	s1.reaper.mu.Lock()
	exited := s1.reaper.exited
	s1.reaper.mu.Unlock()
	<-exited
	if got := binds(); len(got) != 1 || got[0] != kept[0] {
		t.Fatalf("after the agent stopped: binds %v, want %v kept for the next agent", got, kept)
	}
	// The next agent adopts it.
	ctx2, stop2 := context.WithCancel(context.Background())
	defer stop2()
	s2 := &System{DeadDir: dead, SwapOptions: s1.SwapOptions}
	s2.SwapOptions.Logger = log
	s2.AdoptDead(ctx2)
	s2.reaper.mu.Lock()
	_, held := s2.reaper.dirs[kept[0]]
	s2.reaper.mu.Unlock()
	if !held {
		t.Fatalf("the restarted agent does not reap %s", kept[0])
	}
	// Its file system answers: released within the 10 s ask interval.
	for start := time.Now(); len(binds()) > 0; time.Sleep(100 * time.Millisecond) {
		if time.Since(start) > 30*time.Second {
			t.Fatalf("bind %v still reaped 30 s after its file system answered", binds())
		}
	}
	if _, err := os.Stat(kept[0]); !os.IsNotExist(err) {
		t.Fatalf("released bind's directory: %v, want it removed", err)
	}
}
