package builder

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

// MountStatus is one lower of the builder's overlay as status reports it.
type MountStatus struct {
	Generation uint64 `json:"generation"`
	Dir        string `json:"dir"`
	// Kept is set on a lower kept below the newest generation, with the
	// number of paths it is kept for.
	Kept int `json:"kept_paths,omitempty"`
}

// Status is the builder's answer to GET /v1/status.
type Status struct {
	Role                 string        `json:"role"`
	Ready                bool          `json:"ready"`
	Generation           uint64        `json:"generation"`
	Latest               uint64        `json:"latest"`
	Server               string        `json:"server"`
	NFS                  string        `json:"nfs,omitempty"`
	State                string        `json:"state"`
	Policy               string        `json:"policy"`
	StoreDir             string        `json:"store_dir"`
	Mounts               []MountStatus `json:"mounts"`
	SwapMethod           string        `json:"swap_method,omitempty"`
	LastRotation         *time.Time    `json:"last_rotation,omitempty"`
	LastRotationDuration string        `json:"last_rotation_duration,omitempty"`
	LastRotationSeconds  float64       `json:"last_rotation_seconds"`
	PathsImported        int           `json:"paths_imported"`
	PathsInvalidated     int           `json:"paths_invalidated"`
	LastError            string        `json:"last_error,omitempty"`
}

// Status describes the agent for GET /v1/status and `strata status`.
func (a *Agent) Status() Status {
	a.mu.Lock()
	defer a.mu.Unlock()
	st := a.st
	s := Status{Role: "builder", Ready: a.ready, Generation: st.Generation, Latest: a.latest, Server: a.cfg.ServerAPI,
		NFS: a.nfs, State: st.String(), Policy: a.cfg.Policy.String(), StoreDir: a.cfg.StoreDir,
		PathsImported: st.PathsImported, PathsInvalidated: st.PathsInvalidated, LastError: st.LastError,
		Mounts: []MountStatus{}}
	if a.method != 0 {
		s.SwapMethod = a.method.String()
	}
	for _, l := range st.Lowers {
		s.Mounts = append(s.Mounts, MountStatus{Generation: l.Gen, Dir: a.cfg.lowerDir(l.Gen), Kept: len(l.Kept)})
	}
	if !st.LastRotation.IsZero() {
		t := st.LastRotation
		s.LastRotation = &t
		s.LastRotationDuration = st.LastRotationDuration.String()
		s.LastRotationSeconds = st.LastRotationDuration.Seconds()
	}
	return s
}

type ctxKey int

const viaSocket ctxKey = 1

// SocketConnContext marks requests that arrived on the unix socket, which
// need no token.
func SocketConnContext(ctx context.Context, _ net.Conn) context.Context {
	return context.WithValue(ctx, viaSocket, true)
}

// Handler is the agent's HTTP API:
//
//	GET  /v1/status  -> Status
//	POST /v1/rotate  -> Status after checking for a newer generation and
//	                    rotating to it now, whatever the policy (mutating)
//	GET  /healthz    -> "ok" once ready, 503 before
//
// Mutating calls need "Authorization: Bearer <token>" unless they arrive on
// the unix socket (SocketConnContext); an empty token refuses them on TCP.
func (a *Agent) Handler(token string) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		if !a.Ready() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, http.StatusOK, a.Status()) })
	mux.HandleFunc("POST /v1/rotate", func(w http.ResponseWriter, r *http.Request) {
		if r.Context().Value(viaSocket) == nil && !validToken(r, token) {
			writeJSON(w, http.StatusUnauthorized, map[string]string{"error": "rotate needs a bearer token or the unix socket"})
			return
		}
		if !a.Ready() {
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": "builder is not ready yet: " + a.State().LastError})
			return
		}
		if err := a.RequestRotation(r.Context()); err != nil {
			writeJSON(w, http.StatusInternalServerError, map[string]string{"error": err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, a.Status())
	})
	return mux
}

func validToken(r *http.Request, token string) bool {
	got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	return ok && token != "" && subtle.ConstantTimeCompare([]byte(got), []byte(token)) == 1
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// readToken reads the API bearer token; a missing file means mutating TCP
// calls are refused (the unix socket still works).
func readToken(file string) (string, error) {
	if file == "" {
		return "", nil
	}
	b, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read api.token_file: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}
