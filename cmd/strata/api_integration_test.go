//go:build integration

package main

import (
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
)

// vmRSS returns the resident set of pid in bytes.
func vmRSS(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("server process gone: %v", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// TestAPIUnderLoad runs the real `strata server` on a central store of
// 100,000 registered paths:
//   - while its first publish runs (reading, verifying and writing 100,000
//     paths), GET /v1/generations and GET /metrics answer, 50 times each,
//     and the publish is still running after the last of them: no API
//     request waits for the publish (their latency is logged, not asserted:
//     on a loaded machine any bound is a guess);
//   - 200 concurrent GETs of that generation's registration (half asking
//     for gzip) all get the exact registration, while the server's resident
//     memory stays under 150 MiB; If-None-Match with the ETag gets 304;
//   - a publish started over the API whose client goes away at once still
//     completes.
func TestAPIUnderLoad(t *testing.T) {
	mnt := testenv.LoopBtrfs(t, "2G")
	testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(mnt, "nix"))
	st := nixtest.New(t, mnt)
	began := time.Now()
	st.AddMany(t, "load", 100_000)
	t.Logf("store of 100,000 paths made in %v", time.Since(began).Round(time.Millisecond))

	apiAddr := freePort(t)
	s := &site{mnt: mnt, snaps: filepath.Join(mnt, "snaps"), state: filepath.Join(t.TempDir(), "state"), store: st}
	state := s.state
	srv := start(t, s.config(t, map[string]string{"api.listen": apiAddr}), state, nil)
	began = time.Now()

	base := "http://" + apiAddr
	client := &http.Client{Timeout: 5 * time.Minute, Transport: &http.Transport{DisableCompression: true, MaxIdleConnsPerHost: 256}}
	get := func(path string, hdr ...string) (*http.Response, []byte, time.Duration) {
		t.Helper()
		req, _ := http.NewRequest("GET", base+path, nil)
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		t0 := time.Now()
		res, err := client.Do(req)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer res.Body.Close()
		b, err := io.ReadAll(res.Body)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		return res, b, time.Since(t0)
	}
	generations := func() api.GenerationList {
		res, b, _ := get("/v1/generations")
		var l api.GenerationList
		if res.StatusCode != 200 || json.Unmarshal(b, &l) != nil {
			t.Fatalf("GET /v1/generations: %d %s", res.StatusCode, b)
		}
		return l
	}

	// The first publish started after READY; the API answers meanwhile:
	// had a request waited for the publish, it would have ended by then.
	slowest := map[string]time.Duration{}
	for range 50 {
		for _, p := range []string{"/v1/generations", "/metrics"} {
			res, _, took := get(p)
			if res.StatusCode != 200 {
				t.Fatalf("GET %s during the publish: %d", p, res.StatusCode)
			}
			slowest[p] = max(slowest[p], took)
		}
	}
	if l := generations(); len(l.Generations) != 0 {
		t.Fatalf("the publish of 100,000 paths ended before 50 rounds of GETs did: they were not all answered during it")
	}
	t.Logf("slowest of 50 GETs each answered during the publish: %v", slowest)
	waitFor(t, srv.notify, "STATUS=serving generation 1")
	g := generations().Generations[0]
	if g.Paths != 100_000 {
		t.Fatalf("generation 1 has %d paths, want 100000", g.Paths)
	}
	t.Logf("READY to first generation: %v", time.Since(began).Round(time.Millisecond))

	// 200 concurrent registration GETs.
	rssBefore := vmRSS(t, srv.cmd.Process.Pid)
	var peak atomic.Int64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			peak.Store(max(peak.Load(), vmRSS(t, srv.cmd.Process.Pid)))
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	var wg sync.WaitGroup
	errs := make(chan error, 200)
	for i := range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequest("GET", fmt.Sprintf("%s/v1/generations/%d/registration", base, g.ID), nil)
			if i%2 == 0 {
				req.Header.Set("Accept-Encoding", "gzip")
			}
			res, err := client.Do(req)
			if err != nil {
				errs <- err
				return
			}
			defer res.Body.Close()
			var body io.Reader = res.Body
			if res.Header.Get("Content-Encoding") == "gzip" {
				zr, err := gzip.NewReader(res.Body)
				if err != nil {
					errs <- err
					return
				}
				body = zr
			} else if i%2 == 0 {
				errs <- fmt.Errorf("asked for gzip, got %q", res.Header.Get("Content-Encoding"))
				return
			}
			h := sha256.New()
			if _, err := io.Copy(h, body); err != nil {
				errs <- err
				return
			}
			if sum := hex.EncodeToString(h.Sum(nil)); res.StatusCode != 200 || sum != g.RegistrationSHA256 {
				errs <- fmt.Errorf("status %d, registration sha256 %s, want %s", res.StatusCode, sum, g.RegistrationSHA256)
			}
		}()
	}
	wg.Wait()
	close(stop)
	<-sampled
	close(errs)
	for err := range errs {
		t.Errorf("registration GET: %v", err)
	}
	t.Logf("server RSS %d MiB before, peak %d MiB during 200 concurrent registration GETs", rssBefore>>20, peak.Load()>>20)
	if peak.Load() >= 150<<20 {
		t.Errorf("server RSS peaked at %d MiB during 200 concurrent registration GETs, want < 150 MiB", peak.Load()>>20)
	}
	res, _, _ := get(fmt.Sprintf("/v1/generations/%d/registration", g.ID), "If-None-Match", `"`+g.RegistrationSHA256+`"`)
	if res.StatusCode != http.StatusNotModified {
		t.Errorf("registration with If-None-Match of its ETag: %d, want 304", res.StatusCode)
	}

	// A publish whose client goes away still completes.
	st.AddText(t, "after-load", "one more path\n")
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	c := srv.client()
	if _, err := c.Publish(ctx); err == nil {
		t.Fatal("publish of 100,001 paths answered within 200 ms: the client did not go away first")
	}
	deadline := time.Now().Add(5 * time.Minute)
	for len(generations().Generations) < 2 {
		if time.Now().After(deadline) {
			t.Fatal("the publish whose client went away never completed")
		}
		time.Sleep(200 * time.Millisecond)
	}

	// The delta 1 -> 2 is computed once, kept as a file, and served with
	// an ETag.
	g2 := generations().Generations[1]
	path := fmt.Sprintf("/v1/generations/%d/delta?from=%d", g2.ID, g.ID)
	res, body, _ := get(path)
	var d api.Delta
	if res.StatusCode != 200 || json.Unmarshal(body, &d) != nil || !strings.Contains(d.Added, "after-load") || len(d.Removed) != 0 {
		t.Fatalf("GET %s: %d %.300s", path, res.StatusCode, body)
	}
	if _, err := os.Stat(filepath.Join(state, "generations", strconv.FormatUint(g2.ID, 10), fmt.Sprintf("delta-from-%d.json", g.ID))); err != nil {
		t.Errorf("delta not cached: %v", err)
	}
	res2, body2, _ := get(path)
	if res2.StatusCode != 200 || string(body2) != string(body) {
		t.Errorf("second delta GET: %d, same body %v", res2.StatusCode, string(body2) == string(body))
	}
	if res3, _, _ := get(path, "If-None-Match", res.Header.Get("ETag")); res.Header.Get("ETag") == "" || res3.StatusCode != http.StatusNotModified {
		t.Errorf("delta with If-None-Match %q: %d, want 304", res.Header.Get("ETag"), res3.StatusCode)
	}
}
