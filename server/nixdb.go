package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/apiserve"
	"github.com/strata-nix/strata/internal/atomicfile"
	"github.com/strata-nix/strata/nixstore"
)

// A generation's Nix DB (GET /v1/generations/N/nixdb) is what an empty
// builder installs instead of importing rows (nixstore.InstallDB): the
// snapshot's own db.sqlite, made self-contained with VACUUM INTO, with
// the generation's GC root registered (nixstore.BuildGenerationDB). It is
// made on the first request for it, from the snapshot (so a replica,
// which receives the same snapshot, makes the same file), only when the
// DB's valid paths give the registration the generation's manifest
// records (on a replica, the one checked against the primary's manifest:
// a received snapshot whose own DB disagrees serves no DB, 409, and
// builders import from the registration), and kept in the
// generation's state directory zstd-compressed (nixdb.sqlite.zst) with
// what it is (nixdb.json), until retention removes the directory. Making
// it is serialised (nixdbMu): many builders starting at once cost one.
const (
	nixDBFile = "nixdb.sqlite.zst"
	nixDBInfo = "nixdb.json"
)

// NixDB returns the path of generation id's compressed Nix DB and what it
// is, making it first if needed.
func (s *Server) NixDB(id uint64) (string, api.NixDB, error) {
	g, ok := s.Generation(id)
	if !ok {
		return "", api.NixDB{}, fmt.Errorf("generation %d: %w", id, ErrUnknownGeneration)
	}
	dir := s.state.genDir(id)
	if d, err := readNixDBInfo(dir); err == nil {
		return filepath.Join(dir, nixDBFile), d, nil
	}
	s.nixdbMu.Lock()
	defer s.nixdbMu.Unlock()
	if d, err := readNixDBInfo(dir); err == nil {
		return filepath.Join(dir, nixDBFile), d, nil // made while we waited
	}
	// The snapshot must stay while it is read: retention waits (or
	// skips it) while a hold lasts.
	release, err := s.hold(id)
	if err != nil {
		return "", api.NixDB{}, err
	}
	defer release()
	snap := s.snapshotPath(id)
	if snap == "" {
		return "", api.NixDB{}, fmt.Errorf("generation %d: %w", id, ErrUnknownGeneration)
	}
	start := time.Now()
	d, err := buildNixDB(s, dir, DBDir(snap), id, g.Created.Unix(), g.RegistrationSHA256)
	if err != nil {
		return "", api.NixDB{}, fmt.Errorf("generation %d: nix db: %w", id, err)
	}
	s.log.Info("generation nix db made", "generation", id, "paths", d.Paths, "bytes", d.Size, "compressed", d.Compressed,
		"took", time.Since(start).Round(time.Millisecond))
	return filepath.Join(dir, nixDBFile), d, nil
}

func readNixDBInfo(dir string) (api.NixDB, error) {
	var d api.NixDB
	b, err := os.ReadFile(filepath.Join(dir, nixDBInfo))
	if err != nil {
		return d, err
	}
	if err := json.Unmarshal(b, &d); err != nil {
		return d, err
	}
	if _, err := os.Stat(filepath.Join(dir, nixDBFile)); err != nil {
		return d, err
	}
	return d, nil
}

// buildNixDB writes dir/nixdb.sqlite.zst, then dir/nixdb.json, each
// through a temporary file renamed into place.
func buildNixDB(s *Server, dir, dbDir string, id uint64, created int64, registration string) (api.NixDB, error) {
	raw := filepath.Join(dir, ".nixdb.sqlite")
	defer os.Remove(raw)
	f, err := nixstore.BuildGenerationDB(s.life, dbDir, raw, nixstore.RootOf(s.cfg.StoreDir, id), created, registration)
	if err != nil {
		return api.NixDB{}, err
	}
	d := api.NixDB{SHA256: f.SHA256, Size: f.Size, Paths: f.Paths, Schema: f.Schema, Root: f.Root}
	in, err := os.Open(raw)
	if err != nil {
		return d, err
	}
	defer in.Close()
	tmp, err := os.CreateTemp(dir, "."+nixDBFile+".tmp-*")
	if err != nil {
		return d, err
	}
	defer os.Remove(tmp.Name())
	zw, err := zstd.NewWriter(tmp, zstd.WithEncoderLevel(zstd.SpeedDefault))
	if err == nil {
		_, err = io.Copy(zw, in)
		if cerr := zw.Close(); err == nil {
			err = cerr
		}
	}
	if err == nil {
		err = tmp.Chmod(0o644)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return d, fmt.Errorf("compress: %w", err)
	}
	st, err := os.Stat(tmp.Name())
	if err != nil {
		return d, err
	}
	d.Compressed = st.Size()
	if err := os.Rename(tmp.Name(), filepath.Join(dir, nixDBFile)); err != nil {
		return d, err
	}
	b, _ := json.MarshalIndent(d, "", "  ")
	if err := atomicfile.WriteFile(filepath.Join(dir, nixDBInfo), append(b, '\n'), 0o644); err != nil {
		return d, err
	}
	return d, nil
}

// serveNixDB answers GET /v1/generations/N/nixdb.
// Making the DB (first request) and sending it (a large file to a builder
// on a slow link) may take longer than the API's write timeout; a builder
// that stops reading is cut off after the per-write stall limit.
func (s *Server) serveNixDB(w http.ResponseWriter, r *http.Request, id uint64) {
	w = apiserve.LongResponse(w)
	p, d, err := s.NixDB(id)
	if err != nil {
		code := statusOf(err)
		if errors.Is(err, nixstore.ErrUnknownSchema) {
			code = http.StatusNotImplemented
		} else if errors.Is(err, nixstore.ErrNotRegistration) {
			code = http.StatusConflict
		}
		writeErr(w, code, err)
		return
	}
	h := w.Header()
	h.Set(api.HeaderNixDBSHA256, d.SHA256)
	h.Set(api.HeaderNixDBSize, strconv.FormatInt(d.Size, 10))
	h.Set(api.HeaderNixDBPaths, strconv.Itoa(d.Paths))
	h.Set(api.HeaderNixDBSchema, strconv.Itoa(d.Schema))
	h.Set(api.HeaderNixDBRoot, d.Root)
	if err := serveFile(w, r, p, api.NixDBContentType, `"nixdb-`+d.SHA256+`"`, false); err != nil {
		writeErr(w, http.StatusInternalServerError, fmt.Errorf("read nix db of generation %d: %w", id, err))
	}
}
