package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/atomicfile"
)

// state is the server's on-disk record of live generations:
//
//	<state_dir>/next-id                      next generation id (ids are never reused)
//	<state_dir>/generations/N/manifest.json  api.Generation without pin fields
//	<state_dir>/generations/N/registration   dump-db text of generation N
//	<state_dir>/generations/N/paths.jsonl.gz path rows of generation N (nixstore rows file)
//	<state_dir>/generations/N/paths-from-M.jsonl.gz  its rows not in generation M (kept once asked for)
//	<state_dir>/generations/N/retiring       retention is destroying generation N (see markRetiring)
//	<state_dir>/pins.json                    {"N": "name"}
//	<state_dir>/store-id                     identity of the central store the generations come from
//	<state_dir>/publishing                   id reserved by the publish running now (absent otherwise)
//	<state_dir>/streams/N-from-M             precomputed incremental stream (precompute.go; a cache)
//	<state_dir>/streams/asked                its mtime: when a replica last asked for a stream
//
// A generation directory is built as generations/.N.tmp and renamed into
// place, so a crash never leaves a half-written generation.
//
// The state is a cache of what the snapshots' own labels say (see
// labels.go): a server started with an empty state dir rebuilds it from
// them. Only "publishing" cannot be rebuilt, and need not be: it names the
// one snapshot a start may destroy as a crash leftover.
type state struct {
	dir string
}

// exists reports whether the state dir exists (--check-config changes
// nothing, so it reads a state dir only when there is one).
func (s state) exists() bool {
	st, err := os.Stat(s.dir)
	return err == nil && st.IsDir()
}

// readID reads a file holding one generation id; a missing file is 0.
func (s state) readID(name string) (uint64, error) {
	b, err := os.ReadFile(filepath.Join(s.dir, name))
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", name, err)
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("read %s: %q is not a generation id", filepath.Join(s.dir, name), b)
	}
	return n, nil
}

// publishing returns the id reserved by an unfinished publish, 0 if none.
func (s state) publishing() (uint64, error) { return s.readID("publishing") }

func (s state) setPublishing(id uint64) error {
	return atomicfile.WriteFile(filepath.Join(s.dir, "publishing"), []byte(strconv.FormatUint(id, 10)+"\n"), 0o644)
}

func (s state) clearPublishing() error {
	if err := os.Remove(filepath.Join(s.dir, "publishing")); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("clear publishing: %w", err)
	}
	return atomicfile.SyncDir(s.dir)
}

// storeID returns the recorded central-store identity, "" if none yet.
func (s state) storeID() (string, error) {
	b, err := os.ReadFile(filepath.Join(s.dir, "store-id"))
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read store-id: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

func (s state) setStoreID(id string) error {
	return atomicfile.WriteFile(filepath.Join(s.dir, "store-id"), []byte(id+"\n"), 0o644)
}

func (s state) gensDir() string { return filepath.Join(s.dir, "generations") }
func (s state) genDir(id uint64) string {
	return filepath.Join(s.gensDir(), strconv.FormatUint(id, 10))
}
func (s state) registration(id uint64) string { return filepath.Join(s.genDir(id), "registration") }

func (s state) init() error {
	if err := os.MkdirAll(s.gensDir(), 0o755); err != nil {
		return fmt.Errorf("create state dir: %w", err)
	}
	// Leftovers of a crash while writing a generation or receiving one.
	tmps, _ := filepath.Glob(filepath.Join(s.gensDir(), ".*.tmp"))
	for _, t := range tmps {
		os.RemoveAll(t)
	}
	os.Remove(s.stagedFile())
	return nil
}

// nextID returns the id the next generation gets, at least floor.
func (s state) nextID(floor uint64) (uint64, error) {
	b, err := os.ReadFile(filepath.Join(s.dir, "next-id"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return 0, fmt.Errorf("read next-id: %w", err)
	}
	n := uint64(1)
	if len(b) > 0 {
		n, err = strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("read next-id: %q is not a number", b)
		}
	}
	return max(n, floor, 1), nil
}

func (s state) setNextID(n uint64) error {
	return atomicfile.WriteFile(filepath.Join(s.dir, "next-id"), []byte(strconv.FormatUint(n, 10)+"\n"), 0o644)
}

// rowsFile is the name of a generation's path rows (nixstore.WriteRows).
const rowsFile = "paths.jsonl.gz"

// stageDir is where a generation's files are written before they are
// renamed into place (leftovers are removed at start).
func (s state) stageDir(id uint64) string {
	return filepath.Join(s.gensDir(), fmt.Sprintf(".%d.tmp", id))
}

// stagedFile holds the registration of the generation a replica is
// receiving, written ahead of its manifest (stageRegistration); removed at
// start.
func (s state) stagedFile() string { return filepath.Join(s.dir, "replica-staged-registration") }

// stageRegistration writes the registration of the generation being
// received (a replica does while its stream arrives) to stagedFile, synced,
// for writeStagedGeneration to move into place. It replaces whatever an
// earlier receive staged.
func (s state) stageRegistration(registration []byte) error {
	if err := atomicfile.WriteFile(s.stagedFile(), registration, 0o644); err != nil {
		return fmt.Errorf("stage registration: %w", err)
	}
	return nil
}

// dropStaged removes what stageRegistration wrote.
func (s state) dropStaged() { os.Remove(s.stagedFile()) }

// writeGeneration stores a generation's manifest, registration and path
// rows (none when rows is nil: writeRows adds them later).
func (s state) writeGeneration(g api.Generation, registration, rows []byte) error {
	return s.writeGen(g, registration, rows, false, false)
}

// writeStagedGeneration stores a generation's manifest with the
// registration stageRegistration wrote, without path rows.
func (s state) writeStagedGeneration(g api.Generation) error {
	return s.writeGen(g, nil, nil, true, false)
}

// replaceGeneration stores g (its registration, or the staged one) in
// place of what is stored under its id (a missing generation's kept
// manifest), in one step: the two directories are exchanged, so a stop at
// any point leaves one of them whole in place (the other, as a stage
// directory, is removed by the next start). restore puts the replaced one
// back, done drops it; one of them must be called.
func (s state) replaceGeneration(g api.Generation, registration []byte, staged bool) (restore func() error, done func(), err error) {
	if err := s.writeGen(g, registration, nil, staged, true); err != nil {
		return nil, nil, err
	}
	old := s.stageDir(g.ID)
	if _, err := os.Lstat(old); errors.Is(err, os.ErrNotExist) { // nothing was stored
		return func() error { return s.removeGeneration(g.ID) }, func() {}, nil
	}
	restore = func() error {
		if err := unix.Renameat2(unix.AT_FDCWD, old, unix.AT_FDCWD, s.genDir(g.ID), unix.RENAME_EXCHANGE); err != nil {
			return fmt.Errorf("put back generation %d state: %w", g.ID, err)
		}
		os.RemoveAll(old)
		return atomicfile.SyncDir(s.gensDir())
	}
	return restore, func() { os.RemoveAll(old) }, nil
}

func (s state) writeGen(g api.Generation, registration, rows []byte, staged, replace bool) error {
	tmp := s.stageDir(g.ID)
	os.RemoveAll(tmp)
	if err := os.Mkdir(tmp, 0o755); err != nil {
		return fmt.Errorf("write generation %d: %w", g.ID, err)
	}
	if staged {
		if err := os.Rename(s.stagedFile(), filepath.Join(tmp, "registration")); err != nil {
			os.RemoveAll(tmp)
			return fmt.Errorf("write generation %d: staged registration: %w", g.ID, err)
		}
	}
	g.Pinned, g.PinName = false, ""
	m, err := json.MarshalIndent(g, "", "  ")
	if err != nil {
		return err
	}
	for name, data := range map[string][]byte{"manifest.json": append(m, '\n'), "registration": registration, rowsFile: rows} {
		if data == nil && (name == rowsFile || name == "registration" && staged) {
			continue
		}
		if err := atomicfile.WriteFile(filepath.Join(tmp, name), data, 0o644); err != nil {
			os.RemoveAll(tmp)
			return fmt.Errorf("write generation %d: %w", g.ID, err)
		}
	}
	if replace {
		// tmp then holds what was in place.
		err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, s.genDir(g.ID), unix.RENAME_EXCHANGE)
		if errors.Is(err, unix.ENOENT) {
			err = os.Rename(tmp, s.genDir(g.ID)) // nothing stored (removed by hand)
		}
		if err != nil {
			os.RemoveAll(tmp)
			return fmt.Errorf("write generation %d: in place of the stored one: %w", g.ID, err)
		}
		if err := atomicfile.SyncDir(s.gensDir()); err != nil {
			unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, s.genDir(g.ID), unix.RENAME_EXCHANGE)
			os.RemoveAll(tmp)
			return fmt.Errorf("write generation %d: %w", g.ID, err)
		}
		return nil
	}
	if err := os.Rename(tmp, s.genDir(g.ID)); err != nil {
		os.RemoveAll(tmp)
		return fmt.Errorf("write generation %d: %w", g.ID, err)
	}
	return atomicfile.SyncDir(s.gensDir())
}

// retiringFile marks a generation retention is destroying.
const retiringFile = "retiring"

// markRetiring records, synced, that retention is about to destroy
// generation id's snapshot. A start that finds the mark and no snapshot
// finishes the removal (the manifest goes, nothing is reported missing); with
// the snapshot still there it serves the generation again and drops the
// mark. removeGeneration removes the mark with the rest.
func (s state) markRetiring(id uint64) error {
	if err := atomicfile.WriteFile(filepath.Join(s.genDir(id), retiringFile), []byte("retention destroys this generation's snapshot\n"), 0o644); err != nil {
		return fmt.Errorf("mark generation %d retiring: %w", id, err)
	}
	return nil
}

// isRetiring reports whether markRetiring marked generation id.
func (s state) isRetiring(id uint64) bool {
	_, err := os.Lstat(filepath.Join(s.genDir(id), retiringFile))
	return err == nil
}

// clearRetiring drops generation id's retiring mark.
func (s state) clearRetiring(id uint64) error {
	if err := os.Remove(filepath.Join(s.genDir(id), retiringFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("clear retiring mark of generation %d: %w", id, err)
	}
	return atomicfile.SyncDir(s.genDir(id))
}

func (s state) removeGeneration(id uint64) error {
	if err := os.RemoveAll(s.genDir(id)); err != nil {
		return fmt.Errorf("remove generation %d state: %w", id, err)
	}
	return atomicfile.SyncDir(s.gensDir())
}

// generations reads every stored manifest, oldest first.
func (s state) generations() ([]api.Generation, error) {
	ents, err := os.ReadDir(s.gensDir())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read generations: %w", err)
	}
	var out []api.Generation
	for _, e := range ents {
		id, err := strconv.ParseUint(e.Name(), 10, 64)
		if err != nil || id == 0 {
			continue
		}
		b, err := os.ReadFile(filepath.Join(s.genDir(id), "manifest.json"))
		if err != nil {
			return nil, fmt.Errorf("read generation %d: %w", id, err)
		}
		var g api.Generation
		if err := json.Unmarshal(b, &g); err != nil || g.ID != id {
			return nil, fmt.Errorf("read generation %d: bad manifest.json", id)
		}
		out = append(out, g)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

func (s state) pins() (map[uint64]string, error) {
	b, err := os.ReadFile(filepath.Join(s.dir, "pins.json"))
	if errors.Is(err, os.ErrNotExist) {
		return map[uint64]string{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read pins: %w", err)
	}
	var raw map[string]string
	if err := json.Unmarshal(b, &raw); err != nil {
		return nil, fmt.Errorf("read pins: %w", err)
	}
	out := map[uint64]string{}
	for k, v := range raw {
		id, err := strconv.ParseUint(k, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("read pins: bad generation %q", k)
		}
		out[id] = v
	}
	return out, nil
}

func (s state) setPins(p map[uint64]string) error {
	raw := map[string]string{}
	for k, v := range p {
		raw[strconv.FormatUint(k, 10)] = v
	}
	b, err := json.MarshalIndent(raw, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(filepath.Join(s.dir, "pins.json"), append(b, '\n'), 0o644)
}

func (s state) readRegistration(id uint64) ([]byte, error) {
	b, err := os.ReadFile(s.registration(id))
	if err != nil {
		return nil, fmt.Errorf("read registration of generation %d: %w", id, err)
	}
	return b, nil
}

// openRows opens generation id's path rows; ErrNoRows when it has none.
func (s state) openRows(id uint64) (*os.File, error) {
	f, err := os.Open(filepath.Join(s.genDir(id), rowsFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("generation %d: %w", id, ErrNoRows)
	}
	if err != nil {
		return nil, fmt.Errorf("read rows of generation %d: %w", id, err)
	}
	return f, nil
}

// writeRows stores the path rows of generation id, which is already stored.
func (s state) writeRows(id uint64, rows []byte) error {
	if err := atomicfile.WriteFile(filepath.Join(s.genDir(id), rowsFile), rows, 0o644); err != nil {
		return fmt.Errorf("write rows of generation %d: %w", id, err)
	}
	return nil
}

// hasRows reports whether generation id's path rows are stored.
func (s state) hasRows(id uint64) bool {
	_, err := os.Stat(filepath.Join(s.genDir(id), rowsFile))
	return err == nil
}

func (s state) rowsDeltaFile(id, from uint64) string {
	return filepath.Join(s.genDir(id), fmt.Sprintf("paths-from-%d.jsonl.gz", from))
}

func (s state) readRowsDelta(id, from uint64) ([]byte, error) {
	return os.ReadFile(s.rowsDeltaFile(id, from))
}

func (s state) writeRowsDelta(id, from uint64, b []byte) error {
	return atomicfile.WriteFile(s.rowsDeltaFile(id, from), b, 0o644)
}
