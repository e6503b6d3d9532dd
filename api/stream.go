package api

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"sync/atomic"
	"time"
)

// StreamRequest names a snapshot stream to fetch.
type StreamRequest struct {
	// ID is the generation to receive.
	ID uint64
	// From is the live generation an incremental stream starts from; 0
	// asks for a whole stream.
	From uint64
	// Backend is the receiver's backend kind; the sender refuses a
	// different one before sending anything.
	Backend string
	// Resume is a receive resume token (ZFS): the sender sends only the
	// rest of the interrupted stream.
	Resume string
	// Stall ends the stream with ErrStreamStalled when the sender, still
	// connected, sends no byte for this long while the receiver waits for
	// one (the answer's headers included); 0 means DefaultStreamStall.
	Stall time.Duration
}

// DefaultStreamStall is StreamRequest.Stall's default.
const DefaultStreamStall = 2 * time.Minute

// ErrStreamStalled means the sender sent nothing for StreamRequest.Stall.
var ErrStreamStalled = errors.New("stream stalled")

// Stream is a snapshot stream being received. Read returns io.EOF only
// after the whole stream arrived and matched the sender's byte count and
// sha256 trailers; a stream that ends early or differs gives an error.
type Stream struct {
	// Backend is the sender's backend kind.
	Backend string
	body    io.ReadCloser
	resp    *http.Response
	h       hash.Hash
	n       int64
	stall   *stallTimer
	cancel  context.CancelFunc
}

// stallTimer cancels the request when one wait for the sender lasts
// longer than d.
type stallTimer struct {
	d       time.Duration
	t       *time.Timer
	stalled atomic.Bool
}

func newStallTimer(d time.Duration, cancel context.CancelFunc) *stallTimer {
	st := &stallTimer{d: d}
	st.t = time.AfterFunc(time.Hour, func() { st.stalled.Store(true); cancel() })
	st.t.Stop()
	return st
}

func (st *stallTimer) begin() { st.t.Reset(st.d) }
func (st *stallTimer) end()   { st.t.Stop() }

// err is ErrStreamStalled, wrapped with what arrived, once the timer fired.
func (st *stallTimer) err(n int64, err error) error {
	if !st.stalled.Load() {
		return err
	}
	return fmt.Errorf("%w: the sender sent nothing for %s after %d bytes (the next sync asks again): %w", ErrStreamStalled, st.d, n, err)
}

func (s *Stream) Read(p []byte) (int, error) {
	s.stall.begin()
	n, err := s.body.Read(p)
	s.stall.end()
	if err != nil && err != io.EOF {
		err = s.stall.err(s.n+int64(n), err)
	}
	s.h.Write(p[:n])
	s.n += int64(n)
	if err == io.EOF {
		want := s.resp.Trailer.Get(TrailerStreamSHA256)
		if want == "" {
			return n, fmt.Errorf("stream ended after %d bytes without the sender's trailer: %w", s.n, io.ErrUnexpectedEOF)
		}
		if got := hex.EncodeToString(s.h.Sum(nil)); got != want || s.resp.Trailer.Get(TrailerStreamBytes) != strconv.FormatInt(s.n, 10) {
			return n, fmt.Errorf("stream of %d bytes, sha256 %s: the sender sent %s bytes, sha256 %s", s.n, got, s.resp.Trailer.Get(TrailerStreamBytes), want)
		}
	}
	return n, err
}

// Bytes returns how many bytes were read so far.
func (s *Stream) Bytes() int64 { return s.n }

// Close releases the connection.
func (s *Stream) Close() error {
	s.stall.end()
	err := s.body.Close()
	s.cancel()
	return err
}

// Stream starts receiving a generation's snapshot stream. Unlike the other
// calls it has no overall timeout (a whole stream can take long); ctx bounds
// it, and r.Stall ends it when the sender stops sending while connected.
func (c *Client) Stream(ctx context.Context, r StreamRequest) (*Stream, error) {
	q := url.Values{}
	if r.From != 0 {
		q.Set("from", strconv.FormatUint(r.From, 10))
	}
	if r.Backend != "" {
		q.Set("backend", r.Backend)
	}
	if r.Resume != "" {
		q.Set("resume", r.Resume)
	}
	path := fmt.Sprintf("/v1/generations/%d/stream", r.ID)
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	stall := r.Stall
	if stall <= 0 {
		stall = DefaultStreamStall
	}
	ctx, cancel := context.WithCancel(ctx)
	st := newStallTimer(stall, cancel)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+path, nil)
	if err != nil {
		cancel()
		return nil, err
	}
	c.authorize(req)
	hc := &http.Client{Transport: c.hc.Transport}
	st.begin()
	resp, err := hc.Do(req)
	st.end()
	if err != nil {
		cancel()
		return nil, fmt.Errorf("GET %s: %w", path, st.err(0, err))
	}
	if resp.StatusCode/100 != 2 {
		defer cancel()
		defer resp.Body.Close()
		st.begin() // the error body is bounded like the stream
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		st.end()
		return nil, newStatusError(http.MethodGet, path, resp, b)
	}
	return &Stream{Backend: resp.Header.Get(HeaderBackend), body: resp.Body, resp: resp, h: sha256.New(), stall: st, cancel: cancel}, nil
}
