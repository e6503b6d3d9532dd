package cluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/strata-nix/strata/internal/apiserve"
)

// KeyRequest is the body of POST /v1/cluster/keys/{install,use,remove}.
type KeyRequest struct {
	// Key is a base64 AES-256 key.
	Key string `json:"key"`
}

// KeyList is the answer of the keyring calls.
type KeyList struct {
	Keys []KeyInfo `json:"keys"`
	// Encrypted is false on a member running with cluster.insecure.
	Encrypted bool `json:"encrypted"`
}

// ErrGossipOff is the answer of the member API's paths on a daemon that
// runs without gossip (OffRoutes).
var ErrGossipOff = errors.New("gossip is off on this daemon: it has no members or keyring; set cluster.bind or cluster.join (README, Cluster) to turn it on")

// OffRoutes adds the paths of Routes to mux for a daemon without gossip:
// each answers 404 with ErrGossipOff, so strata members and strata cluster
// keys say why there is nothing (before, "404 page not found").
func OffRoutes(mux *http.ServeMux) {
	off := func(w http.ResponseWriter, r *http.Request) {
		apiserve.WriteError(w, http.StatusNotFound, ErrGossipOff)
	}
	mux.HandleFunc("GET /v1/members", off)
	mux.HandleFunc("GET /v1/cluster/keys", off)
	mux.HandleFunc("POST /v1/cluster/keys/{op}", off)
}

// Routes adds the member's API to mux (both daemons mount it):
//
//	GET  /v1/members                          -> []Member
//	GET  /v1/cluster/keys                     -> KeyList (fingerprints only)
//	POST /v1/cluster/keys/{install,use,remove} KeyRequest -> KeyList (mutating)
//
// Mutating calls need the bearer token or the unix socket (apiserve).
func (n *Node) Routes(mux *http.ServeMux, token *apiserve.Token) {
	mux.HandleFunc("GET /v1/members", func(w http.ResponseWriter, r *http.Request) {
		apiserve.WriteJSON(w, http.StatusOK, n.Members())
	})
	list := func() KeyList {
		if n.cfg.Keyring == nil {
			return KeyList{Keys: []KeyInfo{}}
		}
		return KeyList{Keys: n.cfg.Keyring.List(), Encrypted: true}
	}
	mux.HandleFunc("GET /v1/cluster/keys", func(w http.ResponseWriter, r *http.Request) {
		apiserve.WriteJSON(w, http.StatusOK, list())
	})
	mux.HandleFunc("POST /v1/cluster/keys/{op}", apiserve.Mutating(token, func(w http.ResponseWriter, r *http.Request) {
		kr := n.cfg.Keyring
		if kr == nil {
			apiserve.WriteError(w, http.StatusConflict, fmt.Errorf("gossip is not encrypted (cluster.insecure): no keyring to change"))
			return
		}
		var req KeyRequest
		if err := json.NewDecoder(io.LimitReader(r.Body, 4096)).Decode(&req); err != nil {
			apiserve.WriteError(w, http.StatusBadRequest, fmt.Errorf("key request: %w", err))
			return
		}
		key, err := ParseKey(req.Key)
		if err != nil {
			apiserve.WriteError(w, http.StatusBadRequest, err)
			return
		}
		switch op := r.PathValue("op"); op {
		case "install":
			err = kr.Install(key)
		case "use":
			err = kr.Use(key)
		case "remove":
			err = kr.Remove(key)
		default:
			apiserve.WriteError(w, http.StatusNotFound, fmt.Errorf("keyring operation %q: want install, use or remove", op))
			return
		}
		if errors.Is(err, ErrKeyringReadOnly) {
			apiserve.WriteError(w, http.StatusConflict, err)
			return
		}
		if err != nil {
			apiserve.WriteError(w, http.StatusBadRequest, err)
			return
		}
		n.log.Info("gossip keyring changed", "op", r.PathValue("op"), "key", Fingerprint(key))
		apiserve.WriteJSON(w, http.StatusOK, list())
	}))
}
