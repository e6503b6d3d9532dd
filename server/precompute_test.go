package server

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// A stream request that comes while the precompute is still writing its
// file gets every byte as it is written and ends when the precompute ends;
// one whose precompute fails midway fails (the replica sees a broken
// stream), and one whose request ends stops waiting.
func TestPrecomputedFollow(t *testing.T) {
	path := filepath.Join(t.TempDir(), "2-from-1")
	w, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	p := &precomputed{path: path, changed: make(chan struct{}), ended: make(chan struct{})}
	pw := &preWriter{p: p, f: w, limit: 1 << 20}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out bytes.Buffer
	copied := make(chan error, 1)
	go func() { copied <- p.copyTo(context.Background(), &out, f) }()
	var want bytes.Buffer
	for i := range 50 {
		chunk := bytes.Repeat([]byte{byte(i)}, 10000+i)
		want.Write(chunk)
		if _, err := pw.Write(chunk); err != nil {
			t.Fatal(err)
		}
		if i%10 == 0 {
			time.Sleep(time.Millisecond)
		}
	}
	select {
	case err := <-copied:
		t.Fatalf("copy ended (%v) before the precompute did", err)
	case <-time.After(20 * time.Millisecond):
	}
	p.mu.Lock()
	p.done = true
	close(p.changed)
	p.mu.Unlock()
	if err := <-copied; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), want.Bytes()) {
		t.Fatalf("followed %d bytes, want %d (same content: %v)", out.Len(), want.Len(), bytes.Equal(out.Bytes(), want.Bytes()[:min(out.Len(), want.Len())]))
	}

	// The cap: a write beyond it fails.
	small := &preWriter{p: &precomputed{changed: make(chan struct{})}, f: w, limit: 10}
	if _, err := small.Write(make([]byte, 11)); !errors.Is(err, errTooBig) {
		t.Errorf("write beyond the cap: %v, want errTooBig", err)
	}

	// A precompute that fails: the follower fails.
	p2 := &precomputed{path: path, changed: make(chan struct{}), n: int64(want.Len())}
	go func() {
		time.Sleep(5 * time.Millisecond)
		p2.mu.Lock()
		p2.done, p2.err = true, errors.New("btrfs send: killed")
		close(p2.changed)
		p2.mu.Unlock()
	}()
	if err := p2.copyTo(context.Background(), &bytes.Buffer{}, f); err == nil {
		t.Error("follower of a failed precompute succeeded")
	}

	// The request ends while the precompute runs: the follower returns.
	p3 := &precomputed{path: path, changed: make(chan struct{})}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if err := p3.copyTo(ctx, &bytes.Buffer{}, f); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("follower after its request ended: %v", err)
	}
}
