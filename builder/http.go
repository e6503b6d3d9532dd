package builder

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/strata-nix/strata/internal/apiserve"
)

// MountStatus is one lower of the builder's overlay as status reports it.
type MountStatus struct {
	Generation uint64 `json:"generation"`
	Dir        string `json:"dir"`
	// Server is the API URL of the server it is mounted from.
	Server string `json:"server,omitempty"`
	// Kept is set on a lower kept below the newest generation, with the
	// number of paths it is kept for.
	Kept int `json:"kept_paths,omitempty"`
}

// RetiredStatus is one detached overlay still in use as status reports it.
type RetiredStatus struct {
	Generations []uint64  `json:"generations"`
	Dev         string    `json:"dev"`
	Workdir     string    `json:"workdir"`
	Since       time.Time `json:"since"`
}

// Status is the builder's answer to GET /v1/status.
type Status struct {
	Role       string `json:"role"`
	Ready      bool   `json:"ready"`
	Generation uint64 `json:"generation"`
	Latest     uint64 `json:"latest"`
	// Server is the API URL of the server in use, ServerName its gossip
	// member name (or the URL).
	Server     string `json:"server"`
	ServerName string `json:"server_name,omitempty"`
	// NFS is the address generations are mounted from: server.nfs, or
	// what the server advertises.
	NFS      string        `json:"nfs,omitempty"`
	State    string        `json:"state"`
	Policy   string        `json:"policy"`
	StoreDir string        `json:"store_dir"`
	Mounts   []MountStatus `json:"mounts"`
	// Holding are the generations this builder holds (what gossip
	// reports to the servers' retention): Mounts', a rotation's, and
	// Retired's.
	Holding []uint64 `json:"holding"`
	// Retired are overlays a swap detached that processes still use (a
	// sandboxed build, a cwd or open file in them): their generations stay
	// held until nothing does.
	Retired              []RetiredStatus `json:"retired,omitempty"`
	SwapMethod           string          `json:"swap_method,omitempty"`
	LastRotation         *time.Time      `json:"last_rotation,omitempty"`
	LastRotationDuration string          `json:"last_rotation_duration,omitempty"`
	LastRotationSeconds  float64         `json:"last_rotation_seconds"`
	PathsImported        int             `json:"paths_imported"`
	PathsInvalidated     int             `json:"paths_invalidated"`
	LastError            string          `json:"last_error,omitempty"`
	// Metacopy says whether the overlay is mounted with metacopy=on.
	Metacopy bool `json:"metacopy"`
	// Upper is what the upper holds (walked at most once a minute).
	Upper UpperUsage `json:"upper"`
	// Failover is the failover monitor's view and history.
	Failover FailoverStatus `json:"failover"`
}

// FailoverStatus is the failover part of the builder's status.
type FailoverStatus struct {
	// After is failover.after ("0s": no automatic failover).
	After string `json:"after"`
	// Count is the number of automatic failovers (kept across restarts).
	Count int `json:"count"`
	// Last is the newest server change, automatic or requested.
	Last *FailoverEvent `json:"last,omitempty"`
	// UnansweredSince is when the server in use stopped answering the
	// monitor's probes (absent while it answers), Reason what failed.
	UnansweredSince *time.Time `json:"unanswered_since,omitempty"`
	Reason          string     `json:"reason,omitempty"`
	// Attempts counts the failovers tried since then that failed, and
	// AttemptError is the last one's error.
	Attempts     int    `json:"attempts,omitempty"`
	AttemptError string `json:"attempt_error,omitempty"`
	// Candidates are the servers the agent may use, best first.
	Candidates []string `json:"candidates"`
}

// FailoverEvent is one server change as status shows it.
type FailoverEvent struct {
	At         time.Time `json:"at"`
	From       string    `json:"from"`
	To         string    `json:"to"`
	Reason     string    `json:"reason"`
	Generation uint64    `json:"generation"`
	Rotated    bool      `json:"rotated,omitempty"`
	Took       string    `json:"took"`
}

// Status describes the agent for GET /v1/status and `strata status`.
func (a *Agent) Status() Status {
	upper := a.upperUsage()
	var cands []string
	for _, c := range a.dir.Candidates() {
		x := c.String()
		if c.RTT > 0 {
			x += fmt.Sprintf(" rtt %s", c.RTT.Round(10*time.Microsecond))
		}
		cands = append(cands, x)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	st := a.st
	s := Status{Role: "builder", Ready: a.ready, Generation: st.Generation, Latest: a.latest, Server: a.cur.API, ServerName: a.cur.Name,
		State: st.String(), Policy: a.cfg.Policy.String(), StoreDir: a.cfg.StoreDir,
		PathsImported: st.PathsImported, PathsInvalidated: st.PathsInvalidated, LastError: st.LastError,
		Mounts: []MountStatus{}, Upper: upper, Metacopy: !a.cfg.NoMetacopy && !a.noMetacopy}
	if !a.cur.IsZero() {
		addr := a.cur.NFS
		if addr == "" {
			addr = a.nfs[normAPI(a.cur.API)]
		}
		if host, port, err := (Config{ServerNFS: addr, ServerAPI: a.cur.API}).NFSAddress(""); err == nil {
			s.NFS = net.JoinHostPort(host, strconv.Itoa(port))
		}
	}
	s.Failover = FailoverStatus{After: a.cfg.FailoverAfter.String(), Count: st.Failovers, Candidates: cands, Reason: a.health.Reason,
		Attempts: a.health.Attempts, AttemptError: a.health.AttemptError}
	if s.Failover.Candidates == nil {
		s.Failover.Candidates = []string{}
	}
	if !a.health.Since.IsZero() {
		t := a.health.Since
		s.Failover.UnansweredSince = &t
	}
	if f := st.LastFailover; f != nil {
		s.Failover.Last = &FailoverEvent{At: f.At, From: f.From, To: f.To, Reason: f.Reason, Generation: f.Generation,
			Rotated: f.Rotated, Took: f.Took.Round(time.Millisecond).String()}
	}
	if a.method != 0 {
		s.SwapMethod = a.method.String()
	}
	s.Holding = Holding(st)
	if s.Holding == nil {
		s.Holding = []uint64{}
	}
	for _, r := range st.Retired {
		s.Retired = append(s.Retired, RetiredStatus{Generations: r.Generations, Dev: r.Overlay.Dev.String(), Workdir: r.Overlay.Work, Since: r.Since})
	}
	for _, l := range st.Lowers {
		s.Mounts = append(s.Mounts, MountStatus{Generation: l.Gen, Dir: filepath.Join(a.cfg.lowerRoot(), l.name()), Server: l.Server, Kept: len(l.Kept)})
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
//	                    rotating to it now, whatever the policy (mutating);
//	                    ?server=X moves to server X (a gossip member name
//	                    or API URL) instead: see Agent.SwitchServer
//	GET  /healthz    -> "ok" once ready, 503 before
//	GET  /metrics    -> Prometheus metrics (see metrics.go)
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
	mux.Handle("GET /metrics", promhttp.HandlerFor(a.met.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("POST /v1/rotate", apiserve.Mutating(token, func(w http.ResponseWriter, r *http.Request) {
		if !a.Ready() {
			apiserve.WriteError(w, http.StatusServiceUnavailable, errors.New("builder is not ready yet: "+a.State().LastError))
			return
		}
		if err := a.RequestRotation(r.Context(), r.URL.Query().Get("server")); err != nil {
			apiserve.WriteError(w, http.StatusInternalServerError, err)
			return
		}
		apiserve.WriteJSON(w, http.StatusOK, a.Status())
	}))
	return mux
}
