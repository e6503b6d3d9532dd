//go:build integration

package builder

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/strata-nix/strata/api"
)

const helperEnv = "STRATA_BUILDER_TEST_AGENT"

// helperSpec tells a re-executed test binary to run as the agent and stop
// dead (waiting to be killed) when it reaches PauseAt.
type helperSpec struct {
	Config  Config
	Dirs    map[uint64]string
	PauseAt string
	Marker  string
}

// agentHelper is the agent process of TestKillMidRotation: it starts,
// rotates, and when the state reaches PauseAt writes Marker and blocks, so
// the test can kill -9 it at exactly that point.
func agentHelper() int {
	var spec helperSpec
	if err := json.Unmarshal([]byte(os.Getenv(helperEnv)), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 2
	}
	dirOf := func(g uint64) (string, bool) { d, ok := spec.Dirs[g]; return d, ok }
	a, err := New(Options{
		Config:  spec.Config,
		Server:  api.NewClient(spec.Config.ServerAPI, ""),
		Mounter: NewSystem(bindGenerations(dirOf), spec.Config.SwapMethod, spec.Config.StagingDir, nil),
		Nix:     NewNixStore(spec.Config, nil),
		OnTransition: func(s State) {
			if s.String() == spec.PauseAt {
				os.WriteFile(spec.Marker, []byte(s.String()), 0o644)
				select {}
			}
		},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 1
	}
	ctx := context.Background()
	if err := a.Start(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "helper start:", err)
		return 1
	}
	if err := a.Check(ctx, true); err != nil {
		fmt.Fprintln(os.Stderr, "helper rotate:", err)
		return 1
	}
	fmt.Fprintln(os.Stderr, "helper: never paused at", spec.PauseAt)
	return 3
}

// kill -9 of the agent at each state of a rotation, then a fresh start:
// it converges on the new generation with exactly the mounts the state
// names (none stale, none doubled) and a consistent DB.
func TestKillMidRotation(t *testing.T) {
	e := newEnv(t)
	paths := e.central.Fill(t)
	g := e.publish(t)
	e.startServer(t)
	a := e.agent(t)
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	local := e.builder.Build(t, "local", `mkdir $out; echo $in0 > $out/ref`, paths[0])
	prev := ""
	for i, phase := range []Phase{PhaseMounting, PhaseInvalidating, PhaseSwapping, PhaseImporting, PhaseReleasing} {
		fresh := e.central.AddText(t, fmt.Sprintf("fresh-%d", i), fmt.Sprintf("fresh %d\n", i))
		if prev != "" {
			e.central.Delete(t, prev)
		}
		g = e.publish(t)
		pause := State{Phase: phase, Target: g, Generation: g}.String()
		t.Run(pause, func(t *testing.T) {
			spec := helperSpec{Config: e.cfg, Dirs: map[uint64]string{}, PauseAt: pause,
				Marker: filepath.Join(t.TempDir(), "paused")}
			for id := range uint64(g + 1) {
				if d, ok := e.exp.dir(id); ok {
					spec.Dirs[id] = d
				}
			}
			b, _ := json.Marshal(spec)
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), helperEnv+"="+string(b))
			cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			waited := make(chan error, 1)
			go func() { waited <- cmd.Wait() }()
			deadline := time.After(60 * time.Second)
		wait:
			for {
				if _, err := os.Stat(spec.Marker); err == nil {
					break wait
				}
				select {
				case err := <-waited:
					t.Fatalf("agent helper exited before pausing at %s: %v", pause, err)
				case <-deadline:
					cmd.Process.Kill()
					t.Fatalf("agent helper did not reach %s", pause)
				case <-time.After(20 * time.Millisecond):
				}
			}
			cmd.Process.Signal(syscall.SIGKILL)
			<-waited

			b2 := e.agent(t)
			if err := b2.Start(context.Background()); err != nil {
				t.Fatalf("start after kill at %s: %v", pause, err)
			}
			st := b2.State()
			if st.Phase != PhaseIdle {
				t.Fatalf("after restart: %s, want idle", st)
			}
			e.checkMounts(t, st)
			if err := b2.Check(context.Background(), false); err != nil {
				t.Fatalf("rotate after restart: %v", err)
			}
			st = b2.State()
			if st.Phase != PhaseIdle || st.Generation != g {
				t.Fatalf("after restart and check: %s, want idle(%d)", st, g)
			}
			e.checkMounts(t, st)
			var all []string
			for _, in := range e.registration(t, g) {
				all = append(all, in.Path)
			}
			check := append(all, local)
			if prev != "" {
				check = append(check, prev)
			}
			v := e.valid(t, check...)
			for _, p := range all {
				if !v[p] {
					t.Fatalf("%s of generation %d not valid", p, g)
				}
			}
			if !v[local] {
				t.Fatal("local output no longer valid")
			}
			if prev != "" && v[prev] {
				t.Fatalf("%s left the central store but is still valid", prev)
			}
			if got := readFile(t, e.local(fresh)); got != fmt.Sprintf("fresh %d\n", i) {
				t.Fatalf("new path reads %q", got)
			}
			e.verify(t)
		})
		prev = fresh
	}
}
