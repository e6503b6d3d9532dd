package nfs

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	gonfs "github.com/willscott/go-nfs"
)

// go-nfs's own log lines reach the daemon's slog handler, at its level,
// tagged component=go-nfs, at most logBurst a second.
func TestGoNFSLoggerGoesToSlog(t *testing.T) {
	var buf bytes.Buffer
	SetGoNFSLogger(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelWarn})))
	defer SetGoNFSLogger(nil)
	for range 50 {
		gonfs.Log.Errorf("error handling req: %v", "boom")
	}
	gonfs.Log.Debugf("not at warn level")
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) == 0 || len(lines) > logBurst {
		t.Fatalf("%d lines for 50 errors in a burst, want 1..%d:\n%s", len(lines), logBurst, buf.String())
	}
	for _, l := range lines {
		if !strings.Contains(l, "component=go-nfs") || !strings.Contains(l, "error handling req: boom") || !strings.Contains(l, "level=WARN") {
			t.Errorf("line %q", l)
		}
	}
	if strings.Contains(buf.String(), "not at warn level") {
		t.Error("a debug line got through at warn level")
	}
	if gonfs.Log.GetLevel() != gonfs.WarnLevel {
		t.Errorf("go-nfs level %v, want warn", gonfs.Log.GetLevel())
	}
}
