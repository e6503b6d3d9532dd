//go:build integration

package zfs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/snapshot"
	"github.com/strata-nix/strata/snapshot/snapshottest"
)

// These tests need a real OpenZFS pool (testenv.RequireZpool); each test
// makes a child dataset of it and destroys it afterwards. The VM tier builds
// this package's test binary (CGO_ENABLED=0 go test -c -tags integration) and
// runs it in a guest with OpenZFS 2.3 and STRATA_TEST_ZPOOL=tank.

var seq atomic.Int64

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

func testLog(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// newDataset makes pool/strata-test-PID-N mounted at a temp dir, holding
// store/ and var/nix/db/, and a mount dir for its snapshots. Cleanup
// unmounts the snapshots and destroys the dataset with them.
func newDataset(t *testing.T, pool string) (dataset, live, mountDir string) {
	t.Helper()
	dir := t.TempDir()
	dataset = fmt.Sprintf("%s/strata-test-%d-%d", pool, os.Getpid(), seq.Add(1))
	live, mountDir = filepath.Join(dir, "live"), filepath.Join(dir, "gens")
	run(t, "zfs", "create", "-o", "mountpoint="+live, dataset)
	t.Cleanup(func() {
		entries, _ := os.ReadDir(mountDir)
		for _, e := range entries {
			_ = exec.Command("umount", filepath.Join(mountDir, e.Name())).Run()
		}
		if out, err := exec.Command("zfs", "destroy", "-r", "-f", dataset).CombinedOutput(); err != nil {
			t.Errorf("zfs destroy -r %s: %v %s", dataset, err, out)
		}
	})
	for _, d := range []string{"store", "var/nix/db"} {
		if err := os.MkdirAll(filepath.Join(live, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dataset, live, mountDir
}

func TestConformance(t *testing.T) {
	pool := testenv.RequireZpool(t)
	snapshottest.Run(t, func(t *testing.T) snapshottest.Env {
		dataset, live, mountDir := newDataset(t, pool)
		b, err := New(dataset, mountDir, testLog(t))
		if err != nil {
			t.Fatal(err)
		}
		return snapshottest.Env{
			Backend: b,
			Root:    live,
			Reopen: func(t *testing.T) snapshot.Backend {
				b, err := New(dataset, mountDir, testLog(t))
				if err != nil {
					t.Fatalf("New after restart: %v", err)
				}
				return b
			},
			Foreign: func(t *testing.T, name string) func() bool {
				run(t, "zfs", "snapshot", dataset+"@"+name)
				return func() bool { return exec.Command("zfs", "list", "-H", "-o", "name", dataset+"@"+name).Run() == nil }
			},
		}
	})
}

// After a reboot (here: the snapshot mounts are gone), List mounts every
// strata snapshot again at its Path, read-only.
func TestRemountAfterReboot(t *testing.T) {
	pool := testenv.RequireZpool(t)
	dataset, live, mountDir := newDataset(t, pool)
	if err := os.WriteFile(filepath.Join(live, "store/f"), []byte("v1"), 0o644); err != nil {
		t.Fatal(err)
	}
	b, err := New(dataset, mountDir, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	s, err := b.Create(ctx, 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	run(t, "umount", s.Path)
	if _, err := os.Stat(filepath.Join(s.Path, "store/f")); err == nil {
		t.Fatal("snapshot still readable after umount: test is broken")
	}
	b2, err := New(dataset, mountDir, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	l, err := b2.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(l) != 1 || l[0].Path != s.Path {
		t.Fatalf("List = %+v, want strata-1 at %s", l, s.Path)
	}
	if got, err := os.ReadFile(filepath.Join(s.Path, "store/f")); err != nil || string(got) != "v1" {
		t.Errorf("after remount: read = %q, %v; want v1", got, err)
	}
	if err := os.WriteFile(filepath.Join(s.Path, "store/g"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("write to remounted snapshot: err = %v, want EROFS", err)
	}
	// Never through the .zfs automount: the mount source is the snapshot.
	mounts, err := b2.mounts()
	if err != nil {
		t.Fatal(err)
	}
	if m := mounts[s.Path]; m.fstype != "zfs" || m.source != dataset+"@strata-1" {
		t.Errorf("mount at %s = %+v, want zfs %s@strata-1", s.Path, m, dataset)
	}
	if err := b2.Destroy(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if _, ok := mustMounts(t, b2)[s.Path]; ok {
		t.Errorf("%s still mounted after Destroy", s.Path)
	}
}

func mustMounts(t *testing.T, b *Backend) map[string]mount {
	t.Helper()
	m, err := b.mounts()
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestNewLayoutErrors(t *testing.T) {
	pool := testenv.RequireZpool(t)
	dataset, live, mountDir := newDataset(t, pool)

	_, err := New(pool+"/strata-test-missing", mountDir, testLog(t))
	if !errors.Is(err, snapshot.ErrUnsupported) || !strings.Contains(err.Error(), "does not exist") {
		t.Errorf("missing dataset: err = %v, want ErrUnsupported and zfs's 'does not exist'", err)
	}
	run(t, "zfs", "create", "-p", "-o", "mountpoint="+filepath.Join(live, "var/nix/db"), dataset+"/db")
	_, err = New(dataset, mountDir, testLog(t))
	if !errors.Is(err, snapshot.ErrUnsupported) || !strings.Contains(err.Error(), dataset+"/db") {
		t.Errorf("db in a child dataset: err = %v, want ErrUnsupported naming %s/db", err, dataset)
	}
}
