package builder

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/strata-nix/strata/config"
)

// logBuffer collects an agent's log lines for a test.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// count returns how many lines hold every one of words.
func (l *logBuffer) count(words ...string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, line := range strings.Split(l.b.String(), "\n") {
		all := line != ""
		for _, w := range words {
			all = all && strings.Contains(line, w)
		}
		if all {
			n++
		}
	}
	return n
}

func (l *logBuffer) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// With one server that stops answering, nothing to fail over to: the
// outage is logged once (and its end once), however many probes fail,
// and status counts the failed attempts.
func TestMonitorLogsOutageOnce(t *testing.T) {
	u := newUnitEnv(t)
	u.srv.publish(info("a"))
	dir := newFakeDir()
	dir.add("primary", u.srv)
	u.cfg.FailoverAfter = time.Second
	var logs logBuffer
	a := u.agent(t, func(o *Options) {
		o.Server, o.Servers, o.Logger = nil, dir, logs.logger()
		o.ProbeLower = func(string) error { return nil }
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	defer func() { cancel(); <-done }()
	wait := func(what string, d time.Duration, cond func() bool) {
		t.Helper()
		for start := time.Now(); !cond(); time.Sleep(20 * time.Millisecond) {
			if time.Since(start) > d {
				t.Fatalf("timed out after %s waiting for %s (status %+v)", d, what, a.Status().Failover)
			}
		}
	}
	wait("ready", 10*time.Second, a.Ready)
	u.srv.setDown(true)
	// failover.after 1s, a probe every 200 ms: at least 5 attempts.
	wait("five failed failover attempts", 20*time.Second, func() bool { return a.Status().Failover.Attempts >= 5 })
	s := a.Status().Failover
	if s.UnansweredSince == nil || !strings.Contains(s.AttemptError, "no other server known") {
		t.Fatalf("status while down: %+v", s)
	}
	if n := logs.count("level=WARN", "failing over"); n != 1 {
		t.Errorf("%d WARN lines \"failing over\" for one outage, want 1:\n%s", n, logs.b.String())
	}
	if n := logs.count("level=ERROR", "failover failed"); n != 1 {
		t.Errorf("%d ERROR lines \"failover failed\" for one outage, want 1:\n%s", n, logs.b.String())
	}
	if n := logs.count("level=WARN", "server does not answer"); n != 1 {
		t.Errorf("%d WARN lines \"server does not answer\", want 1", n)
	}
	u.srv.setDown(false)
	wait("the outage to end", 10*time.Second, func() bool { return a.Status().Failover.UnansweredSince == nil })
	if s := a.Status().Failover; s.Attempts != 0 || s.AttemptError != "" || s.Reason != "" {
		t.Fatalf("status after the outage: %+v", s)
	}
	if n := logs.count("level=INFO", "server answers again"); n != 1 {
		t.Errorf("%d INFO lines \"server answers again\", want 1", n)
	}
	// A second outage is logged again, once.
	u.srv.setDown(true)
	wait("a failed attempt in the second outage", 20*time.Second, func() bool { return a.Status().Failover.Attempts >= 2 })
	if n := logs.count("level=WARN", "failing over"); n != 2 {
		t.Errorf("%d WARN lines \"failing over\" after two outages, want 2", n)
	}
}

// server.api's default (this host) is no candidate when servers are found
// by gossip or listed as URLs in server.prefer, unless it is set.
func TestServerAPIDefaultWithJoin(t *testing.T) {
	load := func(yaml string) Config {
		t.Helper()
		f := filepath.Join(t.TempDir(), "builder.yaml")
		if err := os.WriteFile(f, []byte(yaml), 0o644); err != nil {
			t.Fatal(err)
		}
		v, err := config.New(Keys).Load(f, true)
		if err != nil {
			t.Fatal(err)
		}
		c, err := ConfigFrom(v)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	for yaml, want := range map[string]string{
		"cluster:\n  insecure: true\n  join: [\"central:7946\"]\n":                                        "",
		"server:\n  prefer: [http://b:7480]\n":                                                            "",
		"cluster:\n  insecure: true\n  join: [\"central:7946\"]\nserver:\n  api: http://a:7480\n":         "http://a:7480",
		"cluster:\n  insecure: true\n  join: [\"central:7946\"]\nserver:\n  api: http://127.0.0.1:7480\n": "http://127.0.0.1:7480",
		"server:\n  nfs: central:2049\n":                                                                  "http://127.0.0.1:7480",
	} {
		c := load(yaml)
		if c.ServerAPI != want {
			t.Errorf("%q: server.api %q, want %q", yaml, c.ServerAPI, want)
		}
		var got []string
		for _, x := range NewServers(c, nil, func(string) Server { return &fakeServer{} }).Candidates() {
			got = append(got, x.API)
		}
		if want == "" && len(got) > 0 && got[0] == "http://127.0.0.1:7480" {
			t.Errorf("%q: candidates %v: the default server.api ranks first", yaml, got)
		}
	}
}
