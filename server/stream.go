package server

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/apiserve"
	"github.com/strata-nix/strata/snapshot"
)

// Snapshot streams for replicas: GET /v1/generations/N/stream[?from=M]
// [&backend=KIND][&resume=TOKEN] answers with generation N's snapshot as the
// backend's send stream (whole, or incremental against live generation M),
// chunked, with the trailers api.TrailerStreamBytes and
// api.TrailerStreamSHA256 after the last byte. A send that fails midway
// aborts the connection, so a replica sees a broken body, never a short one
// that ends cleanly. It needs the bearer token (or the unix socket) even
// though it is a GET: a stream is the whole store.
//
// While a stream is being sent, retention keeps N and M. An incremental
// stream the publish precomputed (precompute.go) is read from its file.

// streamMetrics counts what the stream endpoint sent.
type streamMetrics struct {
	bytes   *prometheus.CounterVec
	streams *prometheus.CounterVec
}

func newStreamMetrics(reg *prometheus.Registry) *streamMetrics {
	m := &streamMetrics{
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strata_stream_sent_bytes_total", Help: "Snapshot stream bytes sent to replicas, by kind (full, incremental, resume).",
		}, []string{"kind"}),
		streams: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strata_streams_sent_total", Help: "Snapshot streams sent to replicas, by result (ok, error).",
		}, []string{"result"}),
	}
	if reg != nil {
		reg.MustRegister(m.bytes, m.streams)
	}
	return m
}

// hold keeps generations ids from retention until the returned func runs.
// It fails if one of them is not live, or retention is destroying it. It
// never waits for a publish: it reads the live list and takes sendMu only
// (retention marks a generation doomed under sendMu before destroying it,
// see doom).
func (s *Server) hold(ids ...uint64) (release func(), err error) {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	for _, id := range ids {
		if _, ok := s.Generation(id); !ok || s.doomed[id] {
			return nil, fmt.Errorf("generation %d: %w", id, ErrUnknownGeneration)
		}
	}
	if s.sending == nil {
		s.sending = map[uint64]int{}
	}
	for _, id := range ids {
		s.sending[id]++
	}
	return func() {
		s.sendMu.Lock()
		defer s.sendMu.Unlock()
		for _, id := range ids {
			if s.sending[id]--; s.sending[id] <= 0 {
				delete(s.sending, id)
			}
		}
	}, nil
}

// beingSent reports whether a stream holds generation id.
func (s *Server) beingSent(id uint64) bool {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	return s.sending[id] > 0
}

// doom marks generation id as being destroyed by retention, unless a
// stream holds it; from then on hold refuses it. The returned func ends
// the mark (after the generation left the live list, or stayed because
// its destruction failed).
func (s *Server) doom(id uint64) (undoom func(), ok bool) {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	if s.sending[id] > 0 {
		return nil, false
	}
	if s.doomed == nil {
		s.doomed = map[uint64]bool{}
	}
	s.doomed[id] = true
	return func() {
		s.sendMu.Lock()
		defer s.sendMu.Unlock()
		delete(s.doomed, id)
	}, true
}

func (s *Server) streamHandler(token *apiserve.Token) http.HandlerFunc {
	return apiserve.Mutating(token, func(w http.ResponseWriter, r *http.Request) {
		// A whole snapshot may take longer than the API's write timeout; a
		// replica that stops reading must not hold the send (and its
		// generations from retention) for ever.
		w = apiserve.LongResponse(w)
		id, ok := pathID(w, r)
		if !ok {
			return
		}
		q := r.URL.Query()
		st, isStreamer := s.backend.(snapshot.Streamer)
		if !isStreamer {
			writeErr(w, http.StatusNotImplemented, fmt.Errorf("the %s backend cannot send snapshots", s.backend.Kind()))
			return
		}
		if k := q.Get("backend"); k != "" && k != s.backend.Kind() {
			writeErr(w, http.StatusConflict, fmt.Errorf("this server's generations are %s snapshots; a %s replica cannot receive them (mixed backends)", s.backend.Kind(), k))
			return
		}
		var from uint64
		if f := q.Get("from"); f != "" {
			var err error
			if from, err = strconv.ParseUint(f, 10, 64); err != nil || from == 0 || from >= id {
				writeErr(w, http.StatusBadRequest, fmt.Errorf("query parameter from=%q: want a generation id below %d", f, id))
				return
			}
		}
		ids := []uint64{id}
		if from != 0 {
			ids = append(ids, from)
		}
		release, err := s.hold(ids...)
		if err != nil {
			writeErr(w, http.StatusNotFound, fmt.Errorf("%w: it is not live on this server (ask for a whole stream)", err))
			return
		}
		defer release()
		s.streamAsked()
		kind, send := "full", func(out io.Writer) error { return st.Send(r.Context(), out, id, from) }
		source := "sent live"
		if from != 0 {
			kind = "incremental"
			if p, f := s.openPrecomputed(id, from); p != nil {
				defer f.Close()
				source = "precomputed"
				send = func(out io.Writer) error { return p.copyTo(r.Context(), out, f) }
			}
		}
		if tok := q.Get("resume"); tok != "" {
			rs, ok := s.backend.(snapshot.Resumer)
			if !ok {
				writeErr(w, http.StatusBadRequest, fmt.Errorf("the %s backend cannot resume a stream", s.backend.Kind()))
				return
			}
			kind, source, send = "resume", "sent live", func(out io.Writer) error { return rs.SendResume(r.Context(), out, tok) }
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set(api.HeaderBackend, s.backend.Kind())
		w.Header().Set("Trailer", api.TrailerStreamBytes+", "+api.TrailerStreamSHA256)
		w.WriteHeader(http.StatusOK)
		out := &hashWriter{w: w, h: sha256.New()}
		if f, ok := w.(http.Flusher); ok {
			// The header and the stream's first command go at once (the
			// replica's receive starts on them), not when the send has
			// produced enough to fill a buffer.
			out.first = f.Flush
		}
		if err := send(out); err != nil {
			if out.werr != nil || r.Context().Err() != nil {
				err = fmt.Errorf("%w (%v)", errReplicaGone, err)
			}
			s.streamMetrics.bytes.WithLabelValues(kind).Add(float64(out.n))
			s.streamMetrics.streams.WithLabelValues("error").Inc()
			s.streamFails.failed(time.Now(), id, err, s.log, "generation", id, "from", from, "kind", kind, "source", source, "bytes", out.n)
			// Break the connection: the replica must see a broken body.
			panic(http.ErrAbortHandler)
		}
		s.streamMetrics.bytes.WithLabelValues(kind).Add(float64(out.n))
		s.streamMetrics.streams.WithLabelValues("ok").Inc()
		w.Header().Set(api.TrailerStreamBytes, strconv.FormatInt(out.n, 10))
		w.Header().Set(api.TrailerStreamSHA256, hex.EncodeToString(out.h.Sum(nil)))
		s.log.Info("stream sent", "generation", id, "from", from, "kind", kind, "source", source, "bytes", out.n)
		s.streamFails.sent(time.Now(), id, s.log)
	})
}

// errReplicaGone marks a stream that failed because the replica's
// connection did: it broke off its receive (its disk is full) or went
// away. How the send then ends (killed with the request, or by a broken
// pipe) varies from one attempt to the next; it is one problem.
var errReplicaGone = errors.New("the replica broke off the stream")

// hashWriter counts and hashes what it passes on, and calls first (if
// set) after its first write. werr is the first write error.
type hashWriter struct {
	w     io.Writer
	h     hash.Hash
	n     int64
	first func()
	werr  error
}

func (h *hashWriter) Write(p []byte) (int, error) {
	n, err := h.w.Write(p)
	if err != nil && h.werr == nil {
		h.werr = err
	}
	if h.first != nil && err == nil {
		h.first()
		h.first = nil
	}
	h.h.Write(p[:n])
	h.n += int64(n)
	if err != nil {
		return n, err
	}
	if n < len(p) {
		return n, errors.New("short write")
	}
	return n, nil
}
