package server

import (
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/strata-nix/strata/internal/atomicfile"
)

// The registration and delta endpoints serve files from the generation's
// state directory with http.ServeContent, so a large generation never sits
// in memory per request: the body goes from the page cache to the socket,
// If-None-Match is answered 304 from the ETag (a generation never changes),
// and Range works. A client that accepts gzip gets a compressed copy made
// once per generation (registration.gz), and a delta is computed once per
// (from, to) pair and kept as a file (delta-from-M.json) until retention
// removes the generation's directory. Making those files is serialised
// (cacheMu), so many first requests at once cost one computation.

const (
	registrationGz = "registration.gz"
	// immutable: a generation's registration and deltas never change.
	immutable = "public, max-age=31536000, immutable"
)

// acceptsGzip reports whether the request's Accept-Encoding admits gzip.
func acceptsGzip(r *http.Request) bool {
	for _, part := range strings.Split(r.Header.Get("Accept-Encoding"), ",") {
		name, q, _ := strings.Cut(strings.TrimSpace(part), ";")
		if strings.EqualFold(strings.TrimSpace(name), "gzip") && strings.ReplaceAll(strings.TrimSpace(q), " ", "") != "q=0" {
			return true
		}
	}
	return false
}

// serveFile answers with the file at path (opened per request) as
// contentType, with etag; gz marks a gzip-encoded body.
func serveFile(w http.ResponseWriter, r *http.Request, path, contentType, etag string, gz bool) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	h := w.Header()
	h.Set("Content-Type", contentType)
	h.Set("ETag", etag)
	h.Set("Cache-Control", immutable)
	h.Add("Vary", "Accept-Encoding")
	if gz {
		h.Set("Content-Encoding", "gzip")
	}
	http.ServeContent(w, r, "", fi.ModTime(), f)
	return nil
}

// serveRegistration streams generation id's registration.
func (s *Server) serveRegistration(w http.ResponseWriter, r *http.Request, id uint64) {
	g, ok := s.Generation(id)
	if !ok {
		writeErr(w, http.StatusNotFound, fmt.Errorf("generation %d: %w", id, ErrUnknownGeneration))
		return
	}
	path, etag, gz := s.state.registration(id), `"`+g.RegistrationSHA256+`"`, false
	if acceptsGzip(r) {
		p, err := s.cached(filepath.Join(s.state.genDir(id), registrationGz), func(w io.Writer) error {
			return gzipFile(w, s.state.registration(id))
		})
		if err != nil {
			s.log.Warn("compress registration; serving it plain", "generation", id, "err", err)
		} else {
			path, etag, gz = p, `"`+g.RegistrationSHA256+`.gz"`, true
		}
	}
	if err := serveFile(w, r, path, "text/plain; charset=utf-8", etag, gz); err != nil {
		writeErr(w, http.StatusInternalServerError, fmt.Errorf("read registration of generation %d: %w", id, err))
	}
}

// serveDelta answers the delta from generation from to id, computed once.
func (s *Server) serveDelta(w http.ResponseWriter, r *http.Request, from, id uint64) {
	g, ok := s.Generation(id)
	if !ok {
		writeErr(w, http.StatusNotFound, fmt.Errorf("generation %d: %w", id, ErrUnknownGeneration))
		return
	}
	f, ok := s.Generation(from)
	if !ok {
		writeErr(w, http.StatusNotFound, fmt.Errorf("generation %d: %w", from, ErrUnknownGeneration))
		return
	}
	path, err := s.cached(filepath.Join(s.state.genDir(id), fmt.Sprintf("delta-from-%d.json", from)), func(w io.Writer) error {
		d, err := s.Delta(from, id)
		if err != nil {
			return err
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(d)
	})
	if err != nil {
		writeErr(w, statusOf(err), err)
		return
	}
	etag := `"delta-` + f.RegistrationSHA256[:min(16, len(f.RegistrationSHA256))] + "-" + g.RegistrationSHA256[:min(16, len(g.RegistrationSHA256))] + `"`
	if err := serveFile(w, r, path, "application/json", etag, false); err != nil {
		writeErr(w, http.StatusInternalServerError, err)
	}
}

// cached returns path, making it first with make (written to a temporary
// file and renamed) when it does not exist.
func (s *Server) cached(path string, make func(io.Writer) error) (string, error) {
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	s.cacheMu.Lock()
	defer s.cacheMu.Unlock()
	if _, err := os.Stat(path); err == nil {
		return path, nil // made while we waited
	}
	start := time.Now()
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return "", fmt.Errorf("cache %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if err := make(tmp); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return "", fmt.Errorf("cache %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return "", fmt.Errorf("cache %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return "", fmt.Errorf("cache %s: %w", path, err)
	}
	_ = atomicfile.SyncDir(filepath.Dir(path))
	s.log.Debug("api cache file made", "file", path, "took", time.Since(start).Round(time.Millisecond))
	return path, nil
}

// gzipFile writes the gzip of the file at path to w.
func gzipFile(w io.Writer, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	zw := gzip.NewWriter(w)
	if _, err := io.Copy(zw, f); err != nil {
		return err
	}
	return zw.Close()
}
