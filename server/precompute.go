package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/snapshot"
)

// Precomputed streams: a primary that replicas pull from makes the
// incremental stream of each new generation from its parent while the
// publish goes on (right after the snapshot is taken: the snapshot never
// changes again, so the stream is the one a send at any later time would
// give), into state_dir/streams/N-from-M. GET
// /v1/generations/N/stream?from=M then reads that file instead of running
// the send, so that a replica's sync right after the publish waits for
// the receive only. A request that comes while the file is still being
// written follows it as it grows, so it is never slower than a send of its
// own.
//
// It is a cache and nothing depends on it: the stream endpoint sends live
// whenever there is no finished or growing file for (N, M). A primary
// precomputes only when a replica asked it for a stream in the last
// precomputeFor (the mtime of state_dir/streams/asked, touched by every
// stream request), so a server without replicas never does. A precompute
// stops, and the file goes, when it would exceed precomputeMax or a
// quarter of the state dir's free space, when the publish fails, and when
// retention destroys N or M; a start removes every file (they are not
// synced, and a crash may have cut one short).

const (
	streamsDir     = "streams"
	streamsAsked   = "asked"
	precomputeFor  = 7 * 24 * time.Hour
	precomputeMax  = int64(1 << 30)
	precomputeFree = 4 // at most 1/precomputeFree of the free space
)

// errTooBig stops a precompute that outgrew its cap.
var errTooBig = errors.New("precomputed stream larger than its cap")

type streamKey struct{ id, from uint64 }

// precomputed is one stream being or having been written to path.
type precomputed struct {
	key    streamKey
	path   string
	cancel context.CancelFunc
	ended  chan struct{} // closed when the send and its cleanup ended

	mu      sync.Mutex
	n       int64         // bytes in the file
	done    bool          // the send ended
	err     error         // how it ended
	changed chan struct{} // closed (and replaced) on every write and at the end
	Start   time.Time
	End     time.Time
}

func (s *Server) streamsDir() string { return filepath.Join(s.cfg.StateDir, streamsDir) }

// initStreams removes what an earlier process precomputed (never synced;
// a crash may have cut a file short) and keeps the record of the last
// request.
func (s *Server) initStreams() {
	ents, err := os.ReadDir(s.streamsDir())
	if err != nil {
		return
	}
	for _, e := range ents {
		if e.Name() != streamsAsked {
			os.Remove(filepath.Join(s.streamsDir(), e.Name()))
		}
	}
}

// streamAsked records that a replica asked for a stream (the mtime of
// streams/asked), which makes the following publishes precompute.
func (s *Server) streamAsked() {
	s.preMu.Lock()
	defer s.preMu.Unlock()
	if time.Since(s.askedAt) < time.Minute {
		return // touched just now
	}
	p := filepath.Join(s.streamsDir(), streamsAsked)
	now := time.Now()
	if err := os.Chtimes(p, now, now); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(s.streamsDir(), 0o755); err != nil {
			s.log.Warn("record stream request", "err", err)
			return
		}
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			s.log.Warn("record stream request", "err", err)
			return
		}
	} else if err != nil {
		s.log.Warn("record stream request", "err", err)
		return
	}
	s.askedAt = now
}

// wantPrecompute reports whether a replica asked for a stream lately.
func (s *Server) wantPrecompute() bool {
	fi, err := os.Stat(filepath.Join(s.streamsDir(), streamsAsked))
	return err == nil && time.Since(fi.ModTime()) < precomputeFor
}

// startPrecompute begins writing the stream of generation id from
// generation from (both snapshots exist; id is not live yet) in the
// background, if a replica asked for streams lately and the backend can
// send.
func (s *Server) startPrecompute(id, from uint64) {
	st, ok := s.backend.(snapshot.Streamer)
	if !ok || from == 0 || !s.wantPrecompute() {
		return
	}
	dir := s.streamsDir()
	var sfs unix.Statfs_t
	if err := unix.Statfs(dir, &sfs); err != nil {
		s.log.Warn("precompute stream: state dir", "err", err)
		return
	}
	limit := min(precomputeMax, int64(sfs.Bavail)*int64(sfs.Bsize)/precomputeFree)
	key := streamKey{id, from}
	path := filepath.Join(dir, fmt.Sprintf("%d-from-%d", id, from))
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_RDWR, 0o600)
	if err != nil {
		s.log.Warn("precompute stream", "err", err)
		return
	}
	ctx, cancel := context.WithCancel(s.life)
	p := &precomputed{key: key, path: path, cancel: cancel, ended: make(chan struct{}), changed: make(chan struct{}), Start: time.Now()}
	s.preMu.Lock()
	if s.pre == nil {
		s.pre = map[streamKey]*precomputed{}
	}
	if old := s.pre[key]; old != nil { // a failed publish's, of the same ids
		s.preMu.Unlock()
		cancel()
		f.Close()
		return
	}
	s.pre[key] = p
	s.preMu.Unlock()
	s.detached.Add(1)
	go func() {
		defer s.detached.Done()
		defer close(p.ended)
		err := st.Send(ctx, &preWriter{p: p, f: f, limit: limit}, id, from)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		p.mu.Lock()
		p.done, p.err, p.End = true, err, time.Now()
		close(p.changed)
		p.mu.Unlock()
		if err != nil {
			s.preMu.Lock()
			if s.pre[key] == p {
				delete(s.pre, key)
			}
			s.preMu.Unlock()
			os.Remove(path)
			if ctx.Err() == nil {
				s.log.Warn("precompute stream; replicas get it sent live", "generation", id, "from", from, "err", err)
			}
			return
		}
		s.log.Debug("precomputed stream", "generation", id, "from", from, "bytes", p.n, "took", p.End.Sub(p.Start).Round(time.Millisecond))
	}()
}

// dropPrecomputed stops and removes the precomputed streams of or from
// generation id, and waits for their sends to end (a snapshot being sent
// cannot be destroyed).
func (s *Server) dropPrecomputed(id uint64) {
	s.preMu.Lock()
	var drop []*precomputed
	for k, p := range s.pre {
		if k.id == id || k.from == id {
			drop = append(drop, p)
			delete(s.pre, k)
		}
	}
	s.preMu.Unlock()
	for _, p := range drop {
		p.cancel()
		<-p.ended
		os.Remove(p.path)
	}
}

// Precomputed returns when the precomputed stream of generation id from
// generation from began and ended (zero End: still being written; ok
// false: none).
func (s *Server) Precomputed(id, from uint64) (start, end time.Time, ok bool) {
	s.preMu.Lock()
	p := s.pre[streamKey{id, from}]
	s.preMu.Unlock()
	if p == nil {
		return time.Time{}, time.Time{}, false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.Start, p.End, true
}

// openPrecomputed returns the precomputed stream of id from from, opened,
// or nil when there is none to use (then the stream is sent live).
func (s *Server) openPrecomputed(id, from uint64) (*precomputed, *os.File) {
	s.preMu.Lock()
	p := s.pre[streamKey{id, from}]
	s.preMu.Unlock()
	if p == nil {
		return nil, nil
	}
	f, err := os.Open(p.path)
	if err != nil {
		return nil, nil
	}
	p.mu.Lock()
	failed := p.done && p.err != nil
	p.mu.Unlock()
	if failed {
		f.Close()
		return nil, nil
	}
	return p, f
}

// copyTo writes the stream to w from f (p's file, opened before it could
// be removed), following it while it is being written. It fails if the
// precompute failed or ctx ends.
func (p *precomputed) copyTo(ctx context.Context, w io.Writer, f *os.File) error {
	buf := make([]byte, 256<<10)
	var off int64
	for {
		p.mu.Lock()
		n, done, err, changed := p.n, p.done, p.err, p.changed
		p.mu.Unlock()
		if off < n {
			m, rerr := f.ReadAt(buf[:min(int64(len(buf)), n-off)], off)
			if m > 0 {
				if _, werr := w.Write(buf[:m]); werr != nil {
					return werr
				}
				off += int64(m)
			}
			if rerr != nil && rerr != io.EOF {
				return fmt.Errorf("read precomputed stream: %w", rerr)
			}
			continue
		}
		if done {
			if err != nil {
				return fmt.Errorf("precomputed stream: %w", err)
			}
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// preWriter writes a precompute's stream to its file, up to limit bytes,
// and wakes its followers.
type preWriter struct {
	p     *precomputed
	f     *os.File
	limit int64
	off   int64
}

func (w *preWriter) Write(b []byte) (int, error) {
	if w.off+int64(len(b)) > w.limit {
		return 0, fmt.Errorf("%w (%d bytes: min(%d, a quarter of the state dir's free space))", errTooBig, w.limit, precomputeMax)
	}
	n, err := w.f.Write(b)
	w.off += int64(n)
	w.p.mu.Lock()
	w.p.n = w.off
	close(w.p.changed)
	w.p.changed = make(chan struct{})
	w.p.mu.Unlock()
	return n, err
}
