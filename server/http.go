package server

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/apiserve"
	"github.com/strata-nix/strata/server/nfs/guard"
)

// Handler returns the HTTP API (see package api for the routes). Mutating
// calls need "Authorization: Bearer <token>" unless the request came in on
// the unix socket (see package apiserve); an empty token refuses every
// mutating TCP call.
func (s *Server) Handler(token *apiserve.Token, reg *prometheus.Registry, status func() any) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "ok") })
	if reg != nil {
		mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	}
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, http.StatusOK, status()) })
	mux.HandleFunc("GET /v1/generations", func(w http.ResponseWriter, r *http.Request) {
		gs := s.Generations()
		if gs == nil {
			gs = []api.Generation{}
		}
		l := api.GenerationList{Generations: gs, NFS: s.cfg.NFSListen, Missing: s.Missing(), Holders: s.Holders(),
			Backend: s.backend.Kind(), Store: s.StoreID(), StoreDir: s.cfg.StoreDir, Role: "primary", Server: s.id}
		if s.cfg.Replica() {
			l.Role, l.ReplicaOf = "replica", s.cfg.ReplicaOf
		}
		writeJSON(w, http.StatusOK, l)
	})
	mux.HandleFunc("GET /v1/nfs/access", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.nfsAccess(r.RemoteAddr))
	})
	mux.HandleFunc("GET /v1/generations/{id}", func(w http.ResponseWriter, r *http.Request) {
		id, ok := pathID(w, r)
		if !ok {
			return
		}
		g, found := s.Generation(id)
		if !found {
			writeErr(w, http.StatusNotFound, fmt.Errorf("generation %d: %w", id, ErrUnknownGeneration))
			return
		}
		writeJSON(w, http.StatusOK, g)
	})
	mux.HandleFunc("GET /v1/generations/{id}/registration", func(w http.ResponseWriter, r *http.Request) {
		id, ok := pathID(w, r)
		if !ok {
			return
		}
		s.serveRegistration(w, r, id)
	})
	mux.HandleFunc("GET /v1/generations/{id}/paths", func(w http.ResponseWriter, r *http.Request) {
		id, ok := pathID(w, r)
		if !ok {
			return
		}
		var from uint64
		if f := r.URL.Query().Get("from"); f != "" {
			var err error
			if from, err = strconv.ParseUint(f, 10, 64); err != nil || from == 0 {
				writeErr(w, http.StatusBadRequest, fmt.Errorf("query parameter from=%q: want a generation id", f))
				return
			}
		}
		// Buffer a delta (small) so an error still gets a JSON answer; a
		// full file streams from disk after its checks passed.
		if from != 0 {
			var buf bytes.Buffer
			if err := s.RowsDelta(&buf, id, from); err != nil {
				writeErr(w, statusOf(err), err)
				return
			}
			w.Header().Set("Content-Type", api.RowsContentType)
			w.Header().Set("Content-Length", strconv.Itoa(buf.Len()))
			w.Write(buf.Bytes())
			return
		}
		f, err := s.OpenRows(id)
		if err != nil {
			writeErr(w, statusOf(err), err)
			return
		}
		defer f.Close()
		w.Header().Set("Content-Type", api.RowsContentType)
		if st, err := f.Stat(); err == nil {
			w.Header().Set("Content-Length", strconv.FormatInt(st.Size(), 10))
		}
		if _, err := io.Copy(w, f); err != nil {
			s.log.Debug("send path rows", "generation", id, "err", err)
		}
	})
	mux.HandleFunc("GET /v1/generations/{id}/nixdb", func(w http.ResponseWriter, r *http.Request) {
		id, ok := pathID(w, r)
		if !ok {
			return
		}
		s.serveNixDB(w, r, id)
	})
	mux.HandleFunc("GET /v1/generations/{id}/delta", func(w http.ResponseWriter, r *http.Request) {
		id, ok := pathID(w, r)
		if !ok {
			return
		}
		from, err := strconv.ParseUint(r.URL.Query().Get("from"), 10, 64)
		if err != nil {
			writeErr(w, http.StatusBadRequest, fmt.Errorf("query parameter from=%q: want a generation id", r.URL.Query().Get("from")))
			return
		}
		s.serveDelta(w, r, from, id)
	})
	mux.HandleFunc("GET /v1/generations/{id}/stream", s.streamHandler(token))
	mutating := func(h http.HandlerFunc) http.HandlerFunc { return apiserve.Mutating(token, h) }
	// Whether the caller's token would be accepted, changing nothing: a
	// replica checks replica.token_file with it at every sync, not only
	// when a stream is due.
	mux.HandleFunc("GET /v1/token", mutating(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) }))
	mux.HandleFunc("POST /v1/publish", mutating(func(w http.ResponseWriter, r *http.Request) {
		w = apiserve.LongResponse(w) // a publish may take longer than the API's write timeout
		res, err := s.PublishDetached(r.Context())
		if err != nil {
			code := http.StatusInternalServerError
			if errors.Is(err, ErrReplica) || errors.Is(err, ErrOtherStore) {
				// Refused by this server's configuration, not failed.
				code = http.StatusConflict
			}
			writeErr(w, code, err)
			return
		}
		writeJSON(w, http.StatusOK, res)
	}))
	mux.HandleFunc("POST /v1/generations/{id}/pin", mutating(func(w http.ResponseWriter, r *http.Request) {
		id, ok := pathID(w, r)
		if !ok {
			return
		}
		g, err := s.Pin(id, r.URL.Query().Get("name"))
		if err != nil {
			writeErr(w, statusOf(err), err)
			return
		}
		writeJSON(w, http.StatusOK, g)
	}))
	mux.HandleFunc("DELETE /v1/generations/{id}/pin", mutating(func(w http.ResponseWriter, r *http.Request) {
		id, ok := pathID(w, r)
		if !ok {
			return
		}
		g, err := s.Unpin(id)
		if err != nil {
			writeErr(w, statusOf(err), err)
			return
		}
		writeJSON(w, http.StatusOK, g)
	}))
	mux.HandleFunc("DELETE /v1/generations/{id}", mutating(func(w http.ResponseWriter, r *http.Request) {
		id, ok := pathID(w, r)
		if !ok {
			return
		}
		confirm, err := strconv.ParseUint(r.URL.Query().Get("confirm"), 10, 64)
		if err != nil {
			writeErr(w, http.StatusBadRequest, fmt.Errorf("query parameter confirm=%q: repeat the generation id to forget it", r.URL.Query().Get("confirm")))
			return
		}
		if err := s.Forget(id, confirm); err != nil {
			code := statusOf(err)
			if errors.Is(err, ErrNotMissing) {
				code = http.StatusConflict
			} else if confirm != id {
				code = http.StatusBadRequest
			}
			writeErr(w, code, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}))
	return mux
}

func pathID(w http.ResponseWriter, r *http.Request) (uint64, bool) {
	id, err := strconv.ParseUint(r.PathValue("id"), 10, 64)
	if err != nil || id == 0 {
		writeErr(w, http.StatusBadRequest, fmt.Errorf("generation id %q: want a positive integer", r.PathValue("id")))
		return 0, false
	}
	return id, true
}

func statusOf(err error) int {
	if errors.Is(err, ErrUnknownGeneration) || errors.Is(err, ErrNoRows) {
		return http.StatusNotFound
	}
	if errors.Is(err, ErrBadPinName) {
		return http.StatusBadRequest
	}
	return http.StatusInternalServerError
}

func writeJSON(w http.ResponseWriter, code int, v any) { apiserve.WriteJSON(w, code, v) }

func writeErr(w http.ResponseWriter, code int, err error) { apiserve.WriteError(w, code, err) }

// nfsAccess answers GET /v1/nfs/access for a caller at remote (the
// request's RemoteAddr): the same allowlist check the NFS listener makes.
func (s *Server) nfsAccess(remote string) api.NFSAccess {
	allow := s.NFSAllow() // as reloaded, the guard's list
	a := api.NFSAccess{NFS: s.cfg.NFSListen, Allow: []string{}}
	for _, p := range allow {
		a.Allow = append(a.Allow, p.String())
	}
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		return a // the unix socket
	}
	addr := ap.Addr().Unmap()
	a.Address = addr.String()
	if s.cfg.NFSListen == "" {
		return a
	}
	a.Allowed = guard.Admits(allow, addr) // the guard's own check
	return a
}
