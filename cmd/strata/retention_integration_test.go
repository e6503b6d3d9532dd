//go:build integration

package main

import (
	"context"
	"slices"
	"strings"
	"syscall"
	"testing"
)

// Review 19 #4: kill -9 between retention's snapshot destroy and its
// manifest removal left the generation reported "MISSING SNAPSHOT" by
// every later start, until forgotten by hand. Retention records its intent
// (a "retiring" mark in the generation's state dir) before it destroys.
// Must show, for a kill after the mark (snapshot still there) and after the
// destroy (snapshot gone, manifest left): --check-config warns of nothing
// missing and says what the start will do; the next start reports nothing
// missing, serves the generations left, finishes removing a destroyed
// one's manifest and destroys nothing itself (a marked one whose snapshot
// is still there is served again, for retention to decide anew); the next
// publish's retention leaves exactly the newest retention.keep.
func TestKillDuringRetention(t *testing.T) {
	for _, step := range []string{"retention-marked", "retention-destroyed"} {
		t.Run(step, func(t *testing.T) {
			s := newSite(t)
			cfg := s.config(t, map[string]string{"keep": "2"})
			srv := start(t, cfg, s.state, nil)
			srv.waitLog(t, "published generation")
			publishOne(t, s, srv, "second")
			srv.stop(t)

			srv = start(t, cfg, s.state, []string{"STRATA_DEBUG_PUBLISH_PAUSE=" + step})
			s.store.AddText(t, "third", "third\n")
			go srv.client().Publish(context.Background()) // retention pauses after the publish
			srv.waitLog(t, "step="+step)
			srv.cmd.Process.Signal(syscall.SIGKILL)
			<-srv.done

			destroyed := step == "retention-destroyed"
			wantSnaps := []string{"strata-1", "strata-2", "strata-3"}
			if destroyed {
				wantSnaps = wantSnaps[1:]
			}
			if got := s.snapshots(t); !slices.Equal(got, wantSnaps) {
				t.Fatalf("after kill -9 at %s: snapshots %v, want %v", step, got, wantSnaps)
			}
			if got := manifests(t, s.state); !slices.Equal(got, []string{"1", "2", "3"}) {
				t.Fatalf("after kill -9 at %s: manifests %v, want [1 2 3] (the test does not test that step)", step, got)
			}

			out, code := runStrata(t, nil, "server", "--config", cfg, "--check-config")
			if code != 0 || strings.Contains(out, "no snapshot") || strings.Contains(out, "WARNING") {
				t.Errorf("--check-config after kill -9 at %s: exit %d, want 0 without warnings:\n%s", step, code, out)
			}
			wantSay := "would serve generations [1 2 3]"
			if destroyed {
				wantSay = "would finish retiring generations [1]"
			}
			if !strings.Contains(out, wantSay) {
				t.Errorf("--check-config after kill -9 at %s does not say %q:\n%s", step, wantSay, out)
			}
			if got := s.snapshots(t); !slices.Equal(got, wantSnaps) {
				t.Fatalf("--check-config changed the snapshots: %v, want %v", got, wantSnaps)
			}

			srv = start(t, cfg, s.state, nil, "--log-level", "debug")
			srv.waitLog(t, "nothing to publish")
			if got := s.snapshots(t); !slices.Equal(got, wantSnaps) {
				t.Errorf("the restart destroyed or made snapshots: %v, want %v", got, wantSnaps)
			}
			l := srv.generations(t)
			wantGens := []uint64{1, 2, 3}
			if destroyed {
				wantGens = wantGens[1:]
			}
			if got := ids(l.Generations); !slices.Equal(got, wantGens) || len(l.Missing) != 0 {
				t.Errorf("after restart: generations %v, missing %v; want %v and none missing", got, ids(l.Missing), wantGens)
			}
			if out, _ := runStrata(t, nil, "generations", "--api", srv.api); strings.Contains(out, "MISSING") {
				t.Errorf("strata generations after restart:\n%s", out)
			}
			wantManifests := []string{"1", "2", "3"}
			if destroyed {
				wantManifests = wantManifests[1:]
			}
			if got := manifests(t, s.state); !slices.Equal(got, wantManifests) {
				t.Errorf("after restart: manifests %v, want %v", got, wantManifests)
			}
			if strings.Contains(srv.logs.String(), "level=ERROR") {
				t.Errorf("the restart logged an error:\n%s", srv.logs)
			}

			publishOne(t, s, srv, "fourth")
			if got := ids(srv.generations(t).Generations); !slices.Equal(got, []uint64{3, 4}) {
				t.Errorf("after the next publish: generations %v, want [3 4]", got)
			}
			if got := s.snapshots(t); !slices.Equal(got, []string{"strata-3", "strata-4"}) {
				t.Errorf("after the next publish: snapshots %v, want [strata-3 strata-4]", got)
			}
			if got := manifests(t, s.state); !slices.Equal(got, []string{"3", "4"}) {
				t.Errorf("after the next publish: manifests %v, want [3 4]", got)
			}
		})
	}
}
