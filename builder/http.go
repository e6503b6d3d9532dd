package builder

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/strata-nix/strata/internal/apiserve"
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
	Role       string `json:"role"`
	Ready      bool   `json:"ready"`
	Generation uint64 `json:"generation"`
	Latest     uint64 `json:"latest"`
	Server     string `json:"server"`
	// NFS is the address generations are mounted from: server.nfs, or
	// what the server advertises.
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
	// Metacopy says whether the overlay is mounted with metacopy=on.
	Metacopy bool `json:"metacopy"`
	// Upper is what the upper holds (walked at most once a minute).
	Upper UpperUsage `json:"upper"`
}

// Status describes the agent for GET /v1/status and `strata status`.
func (a *Agent) Status() Status {
	upper := a.upperUsage()
	a.mu.Lock()
	defer a.mu.Unlock()
	st := a.st
	s := Status{Role: "builder", Ready: a.ready, Generation: st.Generation, Latest: a.latest, Server: a.cfg.ServerAPI,
		State: st.String(), Policy: a.cfg.Policy.String(), StoreDir: a.cfg.StoreDir,
		PathsImported: st.PathsImported, PathsInvalidated: st.PathsInvalidated, LastError: st.LastError,
		Mounts: []MountStatus{}, Upper: upper, Metacopy: !a.cfg.NoMetacopy && !a.noMetacopy}
	if host, port, err := a.cfg.NFSAddress(a.nfs); err == nil {
		s.NFS = net.JoinHostPort(host, strconv.Itoa(port))
	}
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

// Handler is the agent's HTTP API:
//
//	GET  /v1/status  -> Status
//	POST /v1/rotate  -> Status after checking for a newer generation and
//	                    rotating to it now, whatever the policy (mutating)
//	GET  /healthz    -> "ok" once ready, 503 before
//
// Mutating calls need "Authorization: Bearer <token>" unless they arrive on
// the unix socket (see package apiserve); an empty token refuses them on TCP.
func (a *Agent) Handler(token *apiserve.Token) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		if !a.Ready() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) { apiserve.WriteJSON(w, http.StatusOK, a.Status()) })
	mux.HandleFunc("POST /v1/rotate", apiserve.Mutating(token, func(w http.ResponseWriter, r *http.Request) {
		if !a.Ready() {
			apiserve.WriteError(w, http.StatusServiceUnavailable, errors.New("builder is not ready yet: "+a.State().LastError))
			return
		}
		if err := a.RequestRotation(r.Context()); err != nil {
			apiserve.WriteError(w, http.StatusInternalServerError, err)
			return
		}
		apiserve.WriteJSON(w, http.StatusOK, a.Status())
	}))
	return mux
}
