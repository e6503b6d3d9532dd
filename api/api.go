// Package api holds the wire types of strata's HTTP API and a client for it.
// The server (server/), the CLI (cmd/strata) and the builder agent (builder/)
// all speak it; the paths and JSON field names are a stable interface.
//
//	GET    /v1/generations                  -> GenerationList
//	GET    /v1/generations/N                -> Generation
//	GET    /v1/generations/N/registration   -> text/plain, nix-store --dump-db format
//	GET    /v1/generations/N/delta?from=M   -> Delta
//	GET    /v1/generations/N/paths[?from=M] -> RowsContentType: the path rows (all, or added since M)
//	GET    /v1/generations/N/nixdb          -> NixDBContentType: the generation's Nix DB (NixDB headers)
//	GET    /v1/generations/N/stream?from=M  -> snapshot send stream (token; see Client.Stream)
//	POST   /v1/publish                      -> PublishResult        (mutating)
//	POST   /v1/generations/N/pin?name=X     -> Generation           (mutating)
//	DELETE /v1/generations/N/pin            -> Generation           (mutating)
//	DELETE /v1/generations/N?confirm=N      -> 204, forgets a missing generation (mutating)
//	GET    /v1/status                       -> any role's status JSON
//	GET    /healthz                         -> "ok"
//	GET    /metrics                         -> Prometheus text
//
// Errors are JSON Error bodies with a non-2xx status. Mutating calls need
// "Authorization: Bearer TOKEN" unless they arrive on the unix socket.
package api

import "time"

// Generation is the manifest of one live generation.
type Generation struct {
	ID       uint64    `json:"id"`
	Snapshot string    `json:"snapshot"`
	Created  time.Time `json:"created"`
	// Parent is the generation published before this one, 0 for the first.
	Parent uint64 `json:"parent"`
	// Paths is the number of valid store paths registered.
	Paths int `json:"paths"`
	// NarBytes is the sum of the registered paths' NAR sizes.
	NarBytes uint64 `json:"nar_bytes"`
	// RegistrationSHA256 is the hex SHA-256 of the registration text.
	RegistrationSHA256 string `json:"registration_sha256"`
	Pinned             bool   `json:"pinned"`
	PinName            string `json:"pin_name,omitempty"`
	// PinFrom is, on a replica, "primary" for a pin of the primary's,
	// which retention here keeps as if it were pinned here (empty:
	// pinned here, which a pin of the primary's on the same generation
	// does not change).
	PinFrom string `json:"pin_from,omitempty"`
	// MountPath is the NFS MOUNT path of the generation ("/gen/N").
	MountPath string `json:"mount_path"`
	// Origin is, on a replica, the primary's API URL the generation was
	// received from (empty: published here).
	Origin string `json:"origin,omitempty"`
	// Arrived is, on a replica, when the generation went live here.
	Arrived *time.Time `json:"arrived,omitempty"`
}

// RetentionWait is a generation retention would destroy but keeps, and why.
type RetentionWait struct {
	Generation uint64   `json:"generation"`
	Reason     string   `json:"reason"`
	Holders    []string `json:"holders,omitempty"`
}

// GenerationList is the answer of GET /v1/generations, oldest first.
type GenerationList struct {
	Generations []Generation `json:"generations"`
	// NFS is the address builders mount from (host:port).
	NFS string `json:"nfs,omitempty"`
	// Backend is the server's snapshot backend (btrfs, zfs): a replica
	// must have the same.
	Backend string `json:"backend,omitempty"`
	// Store is the identity of the central store the generations come
	// from: a replica refuses a primary of another store.
	Store string `json:"store,omitempty"`
	// StoreDir is the store directory the generations' paths are named in
	// (the server's store.dir, e.g. /nix/store): a builder refuses to mount
	// generations of another store dir.
	StoreDir string `json:"store_dir,omitempty"`
	// Missing are generations whose manifest the server keeps but whose
	// snapshot is missing: not served, kept until `strata generations
	// forget N`.
	Missing []Generation `json:"missing,omitempty"`
	// Holders names, per generation id, the builders that hold it (cluster
	// gossip): retention keeps a generation while any does.
	Holders map[uint64][]string `json:"holders,omitempty"`
	// Role is "primary" or "replica"; ReplicaOf, on a replica, its primary.
	// A replica refuses to replicate from a replica (or from itself).
	Role      string `json:"role,omitempty"`
	ReplicaOf string `json:"replica_of,omitempty"`
	// Server is the answering server's identity (state_dir/server-id).
	Server string `json:"server,omitempty"`
}

// NFSAccess is the answer of GET /v1/nfs/access: whether the server's NFS
// export admits the caller, judged by the address the API sees it call
// from (a builder's NFS connections normally come from the same address).
type NFSAccess struct {
	// Address is the caller's IP address as the server sees it; empty on
	// the unix socket.
	Address string `json:"address"`
	// Allowed: the export is on and Address is in nfs.allow.
	Allowed bool `json:"allowed"`
	// Allow is the server's nfs.allow.
	Allow []string `json:"allow"`
	// NFS is the export's listen address; empty when the export is off.
	NFS string `json:"nfs,omitempty"`
}

// Delta is the answer of GET /v1/generations/N/delta?from=M.
type Delta struct {
	From uint64 `json:"from"`
	To   uint64 `json:"to"`
	// Added is the registration (dump-db format) of the paths valid in To
	// and not in From.
	Added string `json:"added"`
	// Removed lists the paths valid in From and not in To.
	Removed []string `json:"removed"`
}

// PublishResult is the answer of POST /v1/publish.
type PublishResult struct {
	Published  bool        `json:"published"`
	Reason     string      `json:"reason,omitempty"`
	Generation *Generation `json:"generation,omitempty"`
}

// Snapshot streams (GET /v1/generations/N/stream): the answer names the
// sender's backend in HeaderBackend and ends with two trailers that let the
// receiver check it got every byte.
const (
	HeaderBackend       = "Strata-Backend"
	TrailerStreamBytes  = "Strata-Stream-Bytes"
	TrailerStreamSHA256 = "Strata-Stream-Sha256"
)

// Error is the body of every non-2xx answer.
type Error struct {
	Error string `json:"error"`
}

// RowsContentType is the media type of GET /v1/generations/N/paths: a
// gzip'd JSON-lines rows file (see nixstore.WriteRows).
const RowsContentType = "application/x-strata-rows+gzip"

// NixDBContentType is the media type of GET /v1/generations/N/nixdb: the
// generation's Nix DB (a SQLite file: the snapshot's own db.sqlite with
// the generation's GC root registered, see nixstore.BuildGenerationDB),
// zstd-compressed. The answer's headers describe the decompressed file
// (NixDB).
const NixDBContentType = "application/x-strata-nixdb+zstd"

// Headers of GET /v1/generations/N/nixdb.
const (
	HeaderNixDBSHA256 = "Strata-Nixdb-Sha256"
	HeaderNixDBSize   = "Strata-Nixdb-Size"
	HeaderNixDBPaths  = "Strata-Nixdb-Paths"
	HeaderNixDBSchema = "Strata-Nixdb-Schema"
	HeaderNixDBRoot   = "Strata-Nixdb-Root"
)

// NixDB describes a generation's Nix DB file as the server sends it in
// the headers of GET /v1/generations/N/nixdb.
type NixDB struct {
	// SHA256 (base 16) and Size are the decompressed file's.
	SHA256 string `json:"sha256"`
	Size   int64  `json:"size"`
	// Paths is how many valid paths it holds, the root included.
	Paths int `json:"paths"`
	// Schema is the Nix schema version of the central store's DB.
	Schema int `json:"schema"`
	// Root is the generation's GC root path registered in it.
	Root string `json:"root"`
	// Compressed is the size of the zstd body.
	Compressed int64 `json:"compressed"`
}
