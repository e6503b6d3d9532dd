//go:build integration

package zfs

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/testenv"
	"github.com/strata-nix/strata/snapshot"
	"github.com/strata-nix/strata/snapshot/snapshottest"
)

// receiveChildEnv makes TestMain receive a stream from stdin instead of
// running the tests: "DATASET|MOUNTDIR|ID|FROM". The test kills it with
// SIGKILL mid-stream, as a replica daemon could be killed.
const receiveChildEnv = "STRATA_ZFSTEST_RECEIVE"

func TestMain(m *testing.M) {
	if spec := os.Getenv(receiveChildEnv); spec != "" {
		p := strings.Split(spec, "|")
		id, _ := strconv.ParseUint(p[2], 10, 64)
		from, _ := strconv.ParseUint(p[3], 10, 64)
		b, err := NewReplica(p[0], p[1], nil)
		if err == nil {
			_, err = b.Receive(context.Background(), os.Stdin, id, from)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "child receive:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

type counter struct{ n int64 }

func (c *counter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

func transfer(t *testing.T, src, dst *Backend, id, from uint64) (snapshot.Snapshot, int64, error) {
	t.Helper()
	pr, pw := io.Pipe()
	var n counter
	go func() { pw.CloseWithError(src.Send(context.Background(), io.MultiWriter(pw, &n), id, from)) }()
	s, err := dst.Receive(context.Background(), pr, id, from)
	pr.Close()
	return s, n.n, err
}

// replicaDataset names a dataset that does not exist yet and destroys it
// (and unmounts its snapshots) after the test.
func replicaDataset(t *testing.T, pool string) (dataset, mountDir string) {
	dataset = fmt.Sprintf("%s/strata-repl-%d-%d", pool, os.Getpid(), seq.Add(1))
	mountDir = filepath.Join(t.TempDir(), "repl")
	t.Cleanup(func() {
		entries, _ := os.ReadDir(mountDir)
		for _, e := range entries {
			_ = exec.Command("umount", filepath.Join(mountDir, e.Name())).Run()
		}
		_ = exec.Command("zfs", "receive", "-A", dataset).Run()
		_ = exec.Command("zfs", "destroy", "-r", "-f", dataset).Run()
	})
	return dataset, mountDir
}

// A replica dataset receives generation 1 whole and 2, 3 incrementally;
// each equals the primary's, read-only; incrementals are the size of the
// change; refusals leave nothing; a receive killed with SIGKILL halfway
// resumes from its token and gives the same generation.
func TestSendReceive(t *testing.T) {
	pool := testenv.RequireZpool(t)
	ctx := context.Background()
	dataset, live, mountDir := newDataset(t, pool)
	prim, err := New(dataset, mountDir, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	big := make([]byte, 16<<20)
	rand.Read(big)
	if err := os.WriteFile(filepath.Join(live, "store/big"), big, 0o644); err != nil {
		t.Fatal(err)
	}
	for id := uint64(1); id <= 4; id++ {
		if err := os.WriteFile(filepath.Join(live, fmt.Sprintf("store/p%d", id)), []byte(fmt.Sprint(id)), 0o644); err != nil {
			t.Fatal(err)
		}
		if id == 4 {
			more := make([]byte, 24<<20)
			rand.Read(more)
			os.WriteFile(filepath.Join(live, "store/more"), more, 0o644)
		}
		if _, err := prim.Create(ctx, id, snapshot.Labels{"generation": fmt.Sprint(id)}); err != nil {
			t.Fatal(err)
		}
	}
	rds, rmnt := replicaDataset(t, pool)
	repl, err := NewReplica(rds, rmnt, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	if l, err := repl.List(ctx); err != nil || len(l) != 0 {
		t.Fatalf("List of a replica without its dataset = %v, %v", l, err)
	}
	if _, err := repl.Create(ctx, 1, nil); err == nil {
		t.Error("a replica backend took a snapshot")
	}
	// An incremental with no base here.
	if _, _, err := transfer(t, prim, repl, 2, 1); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("incremental without base: %v, want ErrNotFound", err)
	}
	sizes := map[uint64]int64{}
	for id := uint64(1); id <= 3; id++ {
		s, n, err := transfer(t, prim, repl, id, id-1)
		if err != nil {
			t.Fatalf("transfer %d: %v", id, err)
		}
		sizes[id] = n
		if g, w := snapshottest.Digest(t, s.Path), snapshottest.Digest(t, filepath.Join(mountDir, snapshot.Name(id))); g != w {
			t.Errorf("generation %d differs on the replica:\n%s\n---\n%s", id, g, w)
		}
		if err := os.WriteFile(filepath.Join(s.Path, "store/x"), nil, 0o644); err == nil {
			t.Errorf("wrote into received generation %d", id)
		}
	}
	t.Logf("stream bytes: full %d, incremental %d and %d", sizes[1], sizes[2], sizes[3])
	if sizes[1] < 16<<20 || sizes[2] > 256<<10 || sizes[3] > 256<<10 {
		t.Errorf("stream bytes full %d, incrementals %d %d: want full >= 16 MiB, incrementals < 256 KiB", sizes[1], sizes[2], sizes[3])
	}
	// A whole stream over a dataset with generations is refused.
	if _, _, err := transfer(t, prim, repl, 4, 0); err == nil || !strings.Contains(err.Error(), "does not exist yet") {
		t.Errorf("whole stream over existing dataset: %v", err)
	}
	// A stream of generation 4 received as 9: refused, nothing made.
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(prim.Send(ctx, pw, 4, 3)) }()
	if _, err := repl.Receive(ctx, pr, 9, 3); err == nil || !strings.Contains(err.Error(), "strata-9") {
		t.Errorf("stream of strata-4 as 9: %v", err)
	}
	pr.Close()

	// Kill -9 a receiving process halfway through generation 4.
	var stream counter
	if err := prim.Send(ctx, &stream, 4, 3); err != nil {
		t.Fatal(err)
	}
	self, _ := os.Executable()
	child := exec.Command(self)
	child.Env = append(os.Environ(), fmt.Sprintf("%s=%s|%s|4|3", receiveChildEnv, rds, rmnt))
	stdin, err := child.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	child.Stderr = os.Stderr
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	pr, pw = io.Pipe()
	go func() { pw.CloseWithError(prim.Send(ctx, pw, 4, 3)) }()
	if _, err := io.CopyN(stdin, pr, stream.n/2); err != nil {
		t.Fatal(err)
	}
	child.Process.Kill()
	child.Wait()
	stdin.Close()
	pr.Close()
	var tok string
	for i := 0; i < 50 && tok == ""; i++ { // zfs receive notices EOF and saves its state
		if tok, err = repl.ResumeToken(ctx); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if tok == "" {
		t.Fatal("no resume token after a receive killed halfway")
	}
	if l, _ := repl.List(ctx); len(l) != 3 {
		t.Errorf("after the killed receive, List = %+v, want generations 1-3 only", l)
	}
	if err := prim.SendResume(ctx, io.Discard, "1-deadbeef-0-0;rm"); err == nil {
		t.Error("malformed resume token accepted")
	}
	var rest counter
	pr, pw = io.Pipe()
	go func() { pw.CloseWithError(prim.SendResume(ctx, io.MultiWriter(pw, &rest), tok)) }()
	s, err := repl.ResumeReceive(ctx, pr, 4)
	pr.Close()
	if err != nil {
		t.Fatalf("resume: %v", err)
	}
	t.Logf("resumed: whole incremental %d bytes, rest sent after the resume %d bytes", stream.n, rest.n)
	if rest.n >= stream.n {
		t.Errorf("resume sent %d bytes, the whole stream is %d: not resumed", rest.n, stream.n)
	}
	if g, w := snapshottest.Digest(t, s.Path), snapshottest.Digest(t, filepath.Join(mountDir, "strata-4")); g != w {
		t.Errorf("resumed generation 4 differs")
	}
	if tok, _ := repl.ResumeToken(ctx); tok != "" {
		t.Errorf("resume token %q left after the resumed receive", tok)
	}
	// A restarted replica backend lists all four.
	repl2, err := NewReplica(rds, rmnt, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	if l, err := repl2.List(ctx); err != nil || len(l) != 4 {
		t.Errorf("restarted replica lists %+v, %v; want 4", l, err)
	}
	if err := repl2.Destroy(ctx, 1); err != nil {
		t.Fatal(err)
	}
}
