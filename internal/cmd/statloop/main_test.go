package main

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

func runLoop(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestUsage(t *testing.T) {
	for _, args := range [][]string{nil, {"/x"}, {"-bogus", "/x"}, {"-duration", "1s"}} {
		if code, _, _ := runLoop(t, args...); code != 2 {
			t.Errorf("statloop %v: exit %d, want 2", args, code)
		}
	}
}

func TestCleanRun(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "f")
	if err := os.WriteFile(f, []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}
	ready := filepath.Join(dir, "ready")
	code, out, errs := runLoop(t, "-duration", "50ms", "-hold", f, "-ready", ready, f, dir)
	if code != 0 {
		t.Fatalf("exit %d: %s %s", code, out, errs)
	}
	m := regexp.MustCompile(`^statloop iterations=(\d+) failures=0 heldfail=0 changes=0\n$`).FindStringSubmatch(out)
	if m == nil || m[1] == "0" {
		t.Errorf("result line %q", out)
	}
	if _, err := os.Stat(ready); err != nil {
		t.Errorf("ready file not created: %v", err)
	}
}

func TestFailuresCounted(t *testing.T) {
	dir := t.TempDir()
	code, out, errs := runLoop(t, "-duration", "20ms", "-report", "1", filepath.Join(dir, "missing"))
	if code != 1 || !strings.Contains(out, "failures=") || strings.Contains(out, "failures=0 ") {
		t.Errorf("missing path: exit %d, out %q", code, out)
	}
	if strings.Count(errs, "\n") != 1 || !strings.Contains(errs, "no such file") {
		t.Errorf("stderr should report exactly one failure: %q", errs)
	}
}

// A held file whose bytes change under the fd is a held failure; a path
// whose content changes between reads is counted as a change.
func TestHeldFileAndChanges(t *testing.T) {
	dir := t.TempDir()
	held := filepath.Join(dir, "held")
	watched := filepath.Join(dir, "watched")
	for _, p := range []string{held, watched} {
		if err := os.WriteFile(p, []byte("gen 0"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	stop := filepath.Join(dir, "stop")
	ready := filepath.Join(dir, "ready")
	done := make(chan struct{})
	var code int
	var out string
	go func() {
		code, out, _ = runLoop(t, "-stop", stop, "-ready", ready, "-hold", held, watched)
		close(done)
	}()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		if _, err := os.Stat(ready); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("not ready")
		}
	}
	// Same size, new bytes: rewrite in place so the held fd sees them.
	if err := os.WriteFile(held, []byte("gen 1"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(watched, []byte("gen 1"), 0o644); err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	if err := os.WriteFile(stop, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	<-done
	if code != 1 || strings.Contains(out, "heldfail=0 ") || strings.Contains(out, "changes=0") {
		t.Errorf("exit %d, out %q: want heldfail>0, changes>0, exit 1", code, out)
	}
}
