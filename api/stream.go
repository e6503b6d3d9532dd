package api

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"net/http"
	"net/url"
	"strconv"
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
}

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
}

func (s *Stream) Read(p []byte) (int, error) {
	n, err := s.body.Read(p)
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
func (s *Stream) Close() error { return s.body.Close() }

// Stream starts receiving a generation's snapshot stream. Unlike the other
// calls it has no overall timeout (a whole stream can take long); ctx bounds
// it.
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
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+path, nil)
	if err != nil {
		return nil, err
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	hc := &http.Client{Transport: c.hc.Transport}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", path, err)
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return nil, newStatusError(http.MethodGet, path, resp, b)
	}
	return &Stream{Backend: resp.Header.Get(HeaderBackend), body: resp.Body, resp: resp, h: sha256.New()}, nil
}
