// Package server is strata's server daemon: it publishes generations of the
// central store (snapshot, read the snapshot's DB, verify, make live),
// retains the newest ones, serves their metadata over an HTTP API and their
// files over the NFS export.
package server

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/lifecycle"
	"github.com/strata-nix/strata/nixstore"
	"github.com/strata-nix/strata/snapshot"
)

// Exporter makes generations reachable by builders (the NFS export).
type Exporter interface {
	// Add makes generation id's store directory mountable as /gen/<id>.
	Add(id uint64, storeDir string) error
	// Remove makes generation id unreachable; its handles go stale.
	Remove(id uint64)
}

// InUse reports, per generation, the builders that hold it (cluster
// gossip: see package cluster for when a builder holds), and whether the
// holds are known yet. Retention destroys nothing while they are not known
// and no held generation ever. nil: no gossip, nothing is held.
type InUse func() (holders map[uint64][]string, known bool)

// Server publishes, retains and describes generations.
type Server struct {
	cfg     Config
	log     *slog.Logger
	backend snapshot.Backend
	state   state
	export  Exporter
	inUse   InUse
	step    *lifecycle.Step
	id      string // Options.ServerID

	// lastPubErr is the last publish's failure, nil once one succeeds
	// (strata status shows it).
	lastPubErr atomic.Pointer[PublishError]

	// mu serialises every change of the generations and of the state dir:
	// publish, pin, unpin, forget, retention. Reads of the generation list
	// never take it: they read live, the sorted list swapped in after each
	// change (swap), so a long publish never holds up GET /v1/generations,
	// /v1/status or /metrics.
	mu   sync.Mutex
	gens map[uint64]*generation // guarded by mu
	live atomic.Pointer[[]api.Generation]
	// liveStoreID is storeID as readers see it (StoreID), set by swap.
	liveStoreID atomic.Pointer[string]
	// cacheMu serialises making the API's cache files (apicache.go).
	cacheMu sync.Mutex
	// nixdbMu serialises making generations' Nix DBs (nixdb.go).
	nixdbMu sync.Mutex
	// livePaths maps each live generation to its snapshot's path, set
	// by swap with live.
	livePaths atomic.Pointer[map[uint64]string]
	// infoMu guards missing, problems and waits for readers (status) that
	// must not wait for a publish; writers hold mu too.
	infoMu sync.Mutex
	// waits is what the last retention pass kept, and why.
	waits []api.RetentionWait
	// announce is Options.Announce.
	announce func([]api.Generation)
	// published is Options.Published.
	published func(api.Generation)
	// missing are generations whose manifest is kept but whose snapshot
	// is gone (or not where the config says): reported, never served.
	missing map[uint64]*generation
	// storeID is the identity of the central store the generations come
	// from; "" until the first publish records it.
	storeID string
	// storeErr, when set, refuses every publish: store.root is another store.
	storeErr error
	// problems are snapshots kept but not served, for status.
	problems []string
	// leftover is the id of a failed publish whose snapshot could not be
	// destroyed; "publishing" still names it.
	leftover uint64
	// pause is the publish step at which a test makes the process wait to
	// be killed (STRATA_DEBUG_PUBLISH_PAUSE).
	pause string
	// keep is retention.keep: cfg.Keep at start, then what a reload set
	// (SetKeep).
	keep atomic.Int64
	// nfsAllow is nfs.allow as the export's guard applies it now:
	// cfg.NFSAllow at start, then what a reload set (SetNFSAllow). GET
	// /v1/nfs/access answers with it.
	nfsAllow atomic.Pointer[[]netip.Prefix]

	// life bounds work that outlives the request that started it (a
	// publish over the API); Shutdown cancels it and waits for that work.
	life     context.Context
	stopLife context.CancelFunc
	detached sync.WaitGroup

	metrics *metrics

	// rowsMu serialises computing rows deltas (RowsDelta).
	rowsMu sync.Mutex
	// rowsPending are the generations whose path rows are being written
	// after they went live (replica.go: writeRowsLater); each channel is
	// closed when its write ended. Guarded by pendMu.
	pendMu      sync.Mutex
	rowsPending map[uint64]chan struct{}
	// rowsSlots bounds the background rows writes under way at once
	// (maxRowsWrites): each holds a generation's rows in memory. Made
	// on first use, guarded by pendMu.
	rowsSlots chan struct{}
	// staged is the registration PrepareReceived checked and staged for
	// the generation being received (a replica receives one at a time),
	// nil if none. Guarded by stageMu.
	stageMu sync.Mutex
	staged  *stagedReg

	// sending counts the streams in flight per generation (stream.go);
	// retention keeps those generations, and marks the ones it is
	// destroying doomed. Both guarded by sendMu, never by mu: a stream
	// does not wait for a publish.
	sendMu        sync.Mutex
	sending       map[uint64]int
	doomed        map[uint64]bool
	streamMetrics *streamMetrics
	streamFails   streamFailures // failed streams per generation, logged once per problem
	// pre are the precomputed streams (precompute.go), askedAt when this
	// process last recorded a stream request; guarded by preMu.
	preMu   sync.Mutex
	pre     map[streamKey]*precomputed
	askedAt time.Time
	// upstreamPinned are, on a replica, the generations the primary pins
	// and their pin names (replica.go); retention keeps them, and the
	// live generations show them. nil: not known yet. Guarded by mu.
	upstreamPinned map[uint64]string
}

type generation struct {
	api.Generation
	path string // snapshot root on this host
	// adopted: rebuilt from its snapshot by this process's start (the
	// state dir did not know it). Retention leaves it alone until a later
	// start finds it in the state: this process destroys no snapshot it
	// neither created nor found recorded.
	adopted bool
}

// Options are the parts a Server is built from.
type Options struct {
	Config  Config
	Logger  *slog.Logger
	Backend snapshot.Backend
	Export  Exporter // may be nil
	InUse   InUse    // may be nil
	// Announce is called with the live generations (oldest first) after
	// every change, with the server's lock held: it must not block. Gossip
	// uses it to tell builders of a publish at once. May be nil.
	Announce func([]api.Generation)
	// Published is called after every publish that made a generation live,
	// from the API or the interval alike, once Publish has released the
	// lock and given the publish's memory back. The daemon tells systemd's
	// STATUS= with it. May be nil.
	Published func(api.Generation)
	Registry  *prometheus.Registry
	// Progress brackets each publish of Run, for the watchdog; may be nil.
	Progress *lifecycle.Step
	// ServerID is this server's identity (state_dir/server-id), told in
	// GET /v1/generations so that a replica recognises itself.
	ServerID string
}

// New loads the state dir, reconciles it with the backend's snapshots and
// makes every generation found there live again (a restart serves what it
// served before). The state dir may be empty or another one: generations
// are rebuilt from their snapshots' labels (see plan for the rules). New
// destroys at most one snapshot: the state's unfinished publish, when its
// label says it never went live. A manifest without its snapshot is kept
// and reported as missing. New fails, changing nothing, when the state
// records generations and none of them has a snapshot (a mistyped
// snapshot location). When store.root is not the store the generations
// come from, New succeeds but every publish is refused (ErrOtherStore),
// unless Config.AdoptStore.
func New(ctx context.Context, o Options) (*Server, error) {
	s := &Server{cfg: o.Config, log: o.Logger, backend: o.Backend, state: state{dir: o.Config.StateDir},
		export: o.Export, inUse: o.InUse, step: o.Progress, gens: map[uint64]*generation{}, missing: map[uint64]*generation{},
		pause: os.Getenv("STRATA_DEBUG_PUBLISH_PAUSE"), announce: o.Announce, published: o.Published, id: o.ServerID}
	s.life, s.stopLife = context.WithCancel(context.WithoutCancel(ctx))
	s.keep.Store(int64(o.Config.Keep))
	s.SetNFSAllow(o.Config.NFSAllow)
	s.swap()
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if err := s.state.init(); err != nil {
		return nil, err
	}
	s.initStreams()
	p, err := inspect(ctx, s.cfg, s.state, s.backend)
	if err != nil {
		return nil, err
	}
	if err := p.refusal(s.cfg); err != nil {
		return nil, err
	}
	logPlan(s.log, p)
	if err := s.apply(ctx, p); err != nil {
		return nil, err
	}
	s.storeID = p.storeWant
	if err := p.storeMismatch(s.cfg); err != nil {
		if !s.cfg.AdoptStore {
			// Logged by each publish it refuses (the start's first), not
			// here as well.
			s.storeErr = err
		} else if err := s.adoptStore(p); err != nil {
			return nil, err
		}
	}
	s.metrics = newMetrics(o.Registry, s)
	s.streamMetrics = newStreamMetrics(o.Registry)
	s.finishRows()
	if s.export != nil {
		for _, g := range s.sorted() {
			if err := s.export.Add(g.ID, PhysicalStore(g.path)); err != nil {
				return nil, fmt.Errorf("export generation %d: %w", g.ID, err)
			}
		}
	}
	s.swap()
	return s, nil
}

// adoptStore makes store.root's store the one publishes come from
// (--adopt-store), giving it an identity if it has none.
func (s *Server) adoptStore(p *plan) error {
	id := p.storeHave
	if id == "" {
		var err error
		if id, err = createStoreID(s.cfg.StoreRoot); err != nil {
			return err
		}
	}
	if err := s.state.setStoreID(id); err != nil {
		return err
	}
	s.log.Warn("adopted store.root as the central store (--adopt-store)", "store_root", s.cfg.StoreRoot,
		"store", id, "previous_store", p.storeWant)
	s.storeID = id
	return nil
}

// Missing returns the generations whose snapshot is missing, oldest first.
func (s *Server) Missing() []api.Generation {
	s.infoMu.Lock()
	defer s.infoMu.Unlock()
	var out []api.Generation
	for _, id := range slices.Sorted(maps.Keys(s.missing)) {
		out = append(out, s.missing[id].Generation)
	}
	return out
}

// Problems returns what a start found wrong but kept: snapshots not
// served, and why publishing is refused.
func (s *Server) Problems() []string {
	s.infoMu.Lock()
	defer s.infoMu.Unlock()
	out := slices.Clone(s.problems)
	if s.storeErr != nil {
		out = append(out, s.storeErr.Error())
	}
	return out
}

// ErrNotMissing is returned by Forget for a generation whose snapshot exists.
var ErrNotMissing = errors.New("generation has its snapshot")

// Forget drops the manifest, registration and pin of a generation whose
// snapshot is missing, and its labels file beside the snapshots (btrfs). confirm must repeat id: forgetting is explicit.
func (s *Server) Forget(id, confirm uint64) error {
	if confirm != id {
		return fmt.Errorf("forget generation %d: confirm with the same id (got %d)", id, confirm)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.gens[id]; ok {
		return fmt.Errorf("forget generation %d: %w; unpin it and let retention destroy it instead", id, ErrNotMissing)
	}
	if _, ok := s.missing[id]; !ok {
		return fmt.Errorf("generation %d: %w", id, ErrUnknownGeneration)
	}
	pins, err := s.state.pins()
	if err != nil {
		return err
	}
	if hasKey(pins, id) {
		delete(pins, id)
		if err := s.state.setPins(pins); err != nil {
			return err
		}
	}
	if err := s.state.removeGeneration(id); err != nil {
		return err
	}
	s.infoMu.Lock()
	delete(s.missing, id)
	s.infoMu.Unlock()
	if r, ok := s.backend.(labelsRemover); ok {
		// Harmless when left (tied to the gone snapshot's subvolume),
		// so a failure does not undo the forget.
		if err := r.RemoveLabels(context.Background(), id); err != nil {
			s.log.Warn("forget generation: labels file kept", "generation", id, "err", err)
		}
	}
	s.log.Warn("forgot generation whose snapshot is missing", "generation", id)
	return nil
}

// labelsRemover is a backend that keeps label changes beside the snapshots
// (btrfs: strata-N.labels), which a forget removes with the generation.
type labelsRemover interface {
	RemoveLabels(ctx context.Context, id uint64) error
}

func hasKey[K comparable, V any](m map[K]V, k K) bool { _, ok := m[k]; return ok }

func (s *Server) sorted() []*generation {
	out := make([]*generation, 0, len(s.gens))
	for _, g := range s.gens {
		out = append(out, g)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// swap publishes the current generations to readers. Call it with mu held
// (or before the Server is shared) after every change of s.gens.
func (s *Server) swap() {
	gs := s.sorted()
	l := make([]api.Generation, len(gs))
	paths := make(map[uint64]string, len(gs))
	for i, g := range gs {
		l[i] = s.shown(g)
		paths[g.ID] = g.path
	}
	s.livePaths.Store(&paths)
	s.live.Store(&l)
	id := s.storeID
	s.liveStoreID.Store(&id)
}

// shown is g as readers see it: on a replica, a generation its primary
// pins and this server does not shows the primary's pin (PinFrom
// "primary"). Call it with mu held.
func (s *Server) shown(g *generation) api.Generation {
	out := g.Generation
	if name, ok := s.upstreamPinned[g.ID]; ok && !g.Pinned {
		out.Pinned, out.PinName, out.PinFrom = true, name, "primary"
	}
	return out
}

// snapshotPath returns live generation id's snapshot path, "" when it is
// not live. It never waits for a publish.
func (s *Server) snapshotPath(id uint64) string {
	if m := s.livePaths.Load(); m != nil {
		return (*m)[id]
	}
	return ""
}

// Shutdown cancels publishes started over the API that are still running
// and waits for them to end.
func (s *Server) Shutdown() {
	s.stopLife()
	s.detached.Wait()
}

// Generations returns the live generations, oldest first. It never waits
// for a publish.
func (s *Server) Generations() []api.Generation {
	l := *s.live.Load()
	if len(l) == 0 {
		return nil
	}
	return append([]api.Generation(nil), l...)
}

// Generation returns one live generation.
func (s *Server) Generation(id uint64) (api.Generation, bool) {
	for _, g := range *s.live.Load() {
		if g.ID == id {
			return g, true
		}
	}
	return api.Generation{}, false
}

// Latest returns the newest live generation, if any.
func (s *Server) Latest() (api.Generation, bool) {
	l := *s.live.Load()
	if len(l) == 0 {
		return api.Generation{}, false
	}
	return l[len(l)-1], true
}

// ErrUnknownGeneration is returned for ids that are not live.
var ErrUnknownGeneration = errors.New("no such generation")

// Registration returns generation id's registration text.
func (s *Server) Registration(id uint64) ([]byte, error) {
	if _, ok := s.Generation(id); !ok {
		return nil, fmt.Errorf("generation %d: %w", id, ErrUnknownGeneration)
	}
	return s.state.readRegistration(id)
}

// ErrNoRows is returned for a generation published before strata wrote
// path rows: builders fall back to its registration.
var ErrNoRows = errors.New("generation has no path rows (published by an older strata, or their write failed and is retried; use its registration)")

// OpenRows opens generation id's path rows (a nixstore rows file: what
// the snapshot's Nix DB holds per path); the caller closes it.
func (s *Server) OpenRows(id uint64) (*os.File, error) {
	if _, ok := s.Generation(id); !ok {
		return nil, fmt.Errorf("generation %d: %w", id, ErrUnknownGeneration)
	}
	s.waitRows(id)
	return s.state.openRows(id)
}

// RowsDelta writes the path rows of generation id that generation from
// does not have (added or changed paths and realisations) to w, as a rows
// file whose header names both. Both generations are immutable, so the
// delta is computed once (decoding both generations' rows costs seconds at
// a million paths) and kept next to id's rows as paths-from-M.jsonl.gz,
// removed with the generation; concurrent first requests compute it once.
func (s *Server) RowsDelta(w io.Writer, id, from uint64) error {
	if _, ok := s.Generation(id); !ok {
		return fmt.Errorf("generation %d: %w", id, ErrUnknownGeneration)
	}
	if _, ok := s.Generation(from); !ok {
		return fmt.Errorf("generation %d: %w", from, ErrUnknownGeneration)
	}
	b, err := s.rowsDelta(id, from)
	if err != nil {
		return err
	}
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("send rows of generation %d from %d: %w", id, from, err)
	}
	return nil
}

func (s *Server) rowsDelta(id, from uint64) ([]byte, error) {
	s.waitRows(id)
	s.waitRows(from)
	s.rowsMu.Lock()
	defer s.rowsMu.Unlock()
	if b, err := s.state.readRowsDelta(id, from); err == nil {
		return b, nil
	}
	read := func(g uint64) (nixstore.RowsHeader, *nixstore.Rows, error) {
		f, err := s.state.openRows(g)
		if err != nil {
			return nixstore.RowsHeader{}, nil, err
		}
		defer f.Close()
		h, rs, err := nixstore.ReadRows(f)
		if err != nil {
			return h, nil, fmt.Errorf("generation %d: %w", g, err)
		}
		return h, rs, nil
	}
	_, a, err := read(from)
	if err != nil {
		return nil, err
	}
	h, b, err := read(id)
	if err != nil {
		return nil, err
	}
	h.From = from
	var buf bytes.Buffer
	if err := nixstore.WriteRows(&buf, h, nixstore.RowsDelta(a, b)); err != nil {
		return nil, err
	}
	if err := s.state.writeRowsDelta(id, from, buf.Bytes()); err != nil {
		// Serving it matters more than keeping it.
		s.log.Warn("keep rows delta", "generation", id, "from", from, "err", err)
	}
	return buf.Bytes(), nil
}

// Delta returns the paths added and removed from generation from to to.
func (s *Server) Delta(from, to uint64) (api.Delta, error) {
	// The stored registrations are sorted canonical text: compare them
	// record by record without parsing (tens of milliseconds at 100,000
	// paths instead of seconds); parse only what that cannot handle.
	a, err := s.Registration(from)
	if err != nil {
		return api.Delta{}, err
	}
	b, err := s.Registration(to)
	if err != nil {
		return api.Delta{}, err
	}
	if added, removed, err := nixstore.DeltaText(a, b); err == nil {
		if removed == nil {
			removed = []string{}
		}
		return api.Delta{From: from, To: to, Added: string(added), Removed: removed}, nil
	}
	return s.parsedDelta(from, to)
}

// parsedDelta is Delta by parsing both registrations.
func (s *Server) parsedDelta(from, to uint64) (api.Delta, error) {
	parse := func(id uint64) ([]nixstore.PathInfo, error) {
		b, err := s.Registration(id)
		if err != nil {
			return nil, err
		}
		infos, err := nixstore.ParseRegistration(bytes.NewReader(b))
		if err != nil {
			return nil, fmt.Errorf("generation %d: %w", id, err)
		}
		nixstore.Sort(infos)
		return infos, nil
	}
	a, err := parse(from)
	if err != nil {
		return api.Delta{}, err
	}
	b, err := parse(to)
	if err != nil {
		return api.Delta{}, err
	}
	added, removed := nixstore.Delta(a, b)
	var buf bytes.Buffer
	if err := nixstore.WriteRegistration(&buf, added); err != nil {
		return api.Delta{}, err
	}
	if removed == nil {
		removed = []string{}
	}
	return api.Delta{From: from, To: to, Added: buf.String(), Removed: removed}, nil
}

// PublishError is a publish's failure and when it happened.
type PublishError struct {
	Err string
	At  time.Time
}

// LastPublishError returns the last publish's failure, nil when it
// succeeded (or there was none yet): a failing publish shows in strata
// status, not only in the log.
func (s *Server) LastPublishError() *PublishError { return s.lastPubErr.Load() }

// Publish takes a snapshot of the central store and makes it generation N
// when its valid paths differ from the newest generation's. The snapshot's
// own DB gives the registration; it is verified (every registered path
// exists in the snapshot, every reference is registered) before anything
// goes live. On any error the snapshot is destroyed and the previous
// generations stay as they were.
func (s *Server) Publish(ctx context.Context) (res api.PublishResult, err error) {
	if s.cfg.Replica() {
		return api.PublishResult{}, fmt.Errorf("%w: publish on the primary", ErrReplica)
	}
	if s.published != nil {
		defer func() { // after the unlock and FreeOSMemory below
			if err == nil && res.Published && res.Generation != nil {
				s.published(*res.Generation)
			}
		}()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	start := time.Now()
	res, err = s.publishLocked(ctx)
	s.metrics.observePublish(res, err, time.Since(start))
	if err != nil {
		s.lastPubErr.Store(&PublishError{Err: err.Error(), At: time.Now()})
	} else {
		s.lastPubErr.Store(nil)
	}
	if err != nil {
		msg := "publish failed"
		if errors.Is(err, ErrOtherStore) {
			msg = "publish refused" // by the configuration: store.root
		}
		s.log.Error(msg, "err", err)
		return res, err
	}
	// A publish reads the whole registration of a generation into memory;
	// give that back to the system now rather than when the runtime gets to
	// it, so the daemon stays small between publishes.
	defer debug.FreeOSMemory()
	if res.Published {
		s.log.Info("published generation", "generation", res.Generation.ID, "paths", res.Generation.Paths,
			"nar_bytes", res.Generation.NarBytes, "took", time.Since(start).Round(time.Millisecond))
		s.announceLocked()
		s.retainLocked(ctx)
	} else {
		s.log.Debug("nothing to publish", "reason", res.Reason)
	}
	return res, nil
}

// announceLocked hands the live generations to Announce.
func (s *Server) announceLocked() {
	if s.announce == nil {
		return
	}
	var out []api.Generation
	for _, g := range s.sorted() {
		out = append(out, g.Generation)
	}
	s.announce(out)
}

// Holders returns, per live generation, the builders that hold it (nil
// without gossip).
func (s *Server) Holders() map[uint64][]string {
	if s.inUse == nil {
		return nil
	}
	h, _ := s.inUse()
	out := map[uint64][]string{}
	for id, who := range h {
		if _, live := s.Generation(id); live {
			out[id] = who
		}
	}
	return out
}

// RetentionWaits lists the generations the last retention pass would
// have destroyed but kept (held by builders, or holds not known yet).
func (s *Server) RetentionWaits() []api.RetentionWait {
	s.infoMu.Lock()
	defer s.infoMu.Unlock()
	return append([]api.RetentionWait{}, s.waits...)
}

// PublishDetached is Publish for a caller that may go away (an HTTP
// client): the publish runs on, bounded by the server's life (Shutdown), and
// ctx only bounds the wait for its result.
func (s *Server) PublishDetached(ctx context.Context) (api.PublishResult, error) {
	type result struct {
		res api.PublishResult
		err error
	}
	ch := make(chan result, 1)
	s.detached.Add(1)
	go func() {
		defer s.detached.Done()
		res, err := s.Publish(s.life)
		ch <- result{res, err}
	}()
	select {
	case r := <-ch:
		return r.res, r.err
	case <-ctx.Done():
		return api.PublishResult{}, fmt.Errorf("publish continues without its caller: %w", ctx.Err())
	}
}

func (s *Server) publishLocked(ctx context.Context) (api.PublishResult, error) {
	if s.storeErr != nil {
		return api.PublishResult{}, fmt.Errorf("publish: %w", s.storeErr)
	}
	latest, haveLatest := s.Latest()
	// Cheap check first: the live DB's valid paths equal the newest
	// generation's, so a snapshot would publish nothing.
	if haveLatest {
		if live, err := nixstore.ReadDB(ctx, DBDir(s.cfg.StoreRoot)); err == nil {
			if sum, _, err := registrationOf(live); err == nil && sum == latest.RegistrationSHA256 {
				return api.PublishResult{Reason: fmt.Sprintf("store unchanged since generation %d", latest.ID)}, nil
			}
		}
	}
	if err := s.ensureStoreID(); err != nil {
		return api.PublishResult{}, err
	}
	if s.leftover != 0 {
		// A failed publish's snapshot that could not be destroyed: the
		// state still names it, so it is the one to go before another.
		if err := s.backend.Destroy(ctx, s.leftover); err != nil && !errors.Is(err, snapshot.ErrNotFound) {
			return api.PublishResult{}, fmt.Errorf("publish: destroy snapshot %s of a failed publish first: %w", snapshot.Name(s.leftover), err)
		}
		if err := s.state.removeGeneration(s.leftover); err != nil {
			return api.PublishResult{}, err
		}
		if err := s.state.clearPublishing(); err != nil {
			return api.PublishResult{}, err
		}
		s.leftover = 0
	}
	id, err := s.state.nextID(1)
	if err != nil {
		return api.PublishResult{}, err
	}
	// Reserve the id before the snapshot exists: ids are never reused, and
	// "publishing" names the one snapshot a start after a crash may destroy.
	if err := s.state.setPublishing(id); err != nil {
		return api.PublishResult{}, err
	}
	if err := s.state.setNextID(id + 1); err != nil {
		return api.PublishResult{}, err
	}
	stored, left := false, false
	defer func() {
		if stored || left {
			return
		}
		if err := s.state.clearPublishing(); err != nil {
			s.log.Error("clear publishing", "err", err)
		}
	}()
	if err := s.pauseAt(ctx, "reserved"); err != nil {
		return api.PublishResult{}, err
	}
	labels := snapshot.Labels{labelGeneration: strconv.FormatUint(id, 10), labelStore: s.storeID, labelState: pubPublishing.String()}
	if haveLatest {
		labels[labelParent] = strconv.FormatUint(latest.ID, 10)
	}
	snap, err := s.backend.Create(ctx, id, labels)
	if err != nil {
		return api.PublishResult{}, fmt.Errorf("publish: snapshot: %w", err)
	}
	if haveLatest {
		s.startPrecompute(id, latest.ID)
	}
	ok := false
	defer func() {
		if !ok {
			s.dropPrecomputed(id)
			if err := s.backend.Destroy(context.WithoutCancel(ctx), id); err != nil {
				// "publishing" keeps naming it: the next publish or start
				// destroys it.
				s.log.Error("destroy unpublished snapshot; the next publish or start tries again", "snapshot", snap.Name, "err", err)
				s.leftover, left = id, true
				return
			}
			if stored {
				if err := s.state.removeGeneration(id); err != nil {
					s.log.Error("remove unpublished generation", "generation", id, "err", err)
				}
				if err := s.state.clearPublishing(); err != nil {
					s.log.Error("clear publishing", "err", err)
				}
			}
		}
	}()
	if err := s.pauseAt(ctx, "snapshot"); err != nil {
		return api.PublishResult{}, err
	}
	rows, err := nixstore.ReadDBRows(ctx, DBDir(snap.Path))
	if err != nil {
		return api.PublishResult{}, fmt.Errorf("publish: read snapshot db: %w", err)
	}
	infos := rows.Infos()
	sum, text, err := registrationOf(infos)
	if err != nil {
		return api.PublishResult{}, err
	}
	if haveLatest && sum == latest.RegistrationSHA256 {
		return api.PublishResult{Reason: fmt.Sprintf("store unchanged since generation %d", latest.ID)}, nil
	}
	if err := nixstore.Verify(PhysicalStore(snap.Path), s.cfg.StoreDir, infos); err != nil {
		return api.PublishResult{}, fmt.Errorf("publish generation %d: %w", id, err)
	}
	g := api.Generation{ID: id, Snapshot: snap.Name, Created: snap.Created.UTC(), Paths: len(infos),
		RegistrationSHA256: sum, MountPath: fmt.Sprintf("/gen/%d", id)}
	if haveLatest {
		g.Parent = latest.ID
	}
	for _, in := range infos {
		g.NarBytes += in.NarSize
	}
	var rowsFile bytes.Buffer
	if err := nixstore.WriteRows(&rowsFile, nixstore.RowsHeader{StoreDir: s.cfg.StoreDir, Generation: id}, rows); err != nil {
		return api.PublishResult{}, fmt.Errorf("publish generation %d: %w", id, err)
	}
	if err := s.state.writeGeneration(g, text, rowsFile.Bytes()); err != nil {
		return api.PublishResult{}, err
	}
	stored = true
	if err := s.pauseAt(ctx, "registration"); err != nil {
		return api.PublishResult{}, err
	}
	// From here on the generation is live: a crash no longer destroys it.
	if err := s.backend.SetLabels(ctx, id, snapshot.Labels{labelState: pubLive.String(), labelSHA256: sum}); err != nil {
		return api.PublishResult{}, fmt.Errorf("publish generation %d: mark live: %w", id, err)
	}
	if err := s.state.clearPublishing(); err != nil {
		return api.PublishResult{}, err
	}
	if s.export != nil {
		if err := s.export.Add(id, PhysicalStore(snap.Path)); err != nil {
			return api.PublishResult{}, fmt.Errorf("publish generation %d: export: %w", id, err)
		}
	}
	ok = true
	s.gens[id] = &generation{Generation: g, path: snap.Path}
	s.swap()
	return api.PublishResult{Published: true, Generation: &g}, nil
}

// ensureStoreID gives the first publish a store identity: store.root's,
// or a new one written into it, recorded in the state dir.
func (s *Server) ensureStoreID() error {
	if s.storeID != "" {
		return nil
	}
	id, err := readStoreID(s.cfg.StoreRoot)
	if err != nil {
		return err
	}
	if id == "" {
		if id, err = createStoreID(s.cfg.StoreRoot); err != nil {
			return err
		}
		s.log.Info("gave the central store an identity", "store", id, "file", filepath.Join(s.cfg.StoreRoot, storeIDFile))
	}
	if err := s.state.setStoreID(id); err != nil {
		return err
	}
	s.storeID = id
	return nil
}

// pauseAt blocks until ctx ends when STRATA_DEBUG_PUBLISH_PAUSE names
// step, so a test can kill -9 the process in the middle of a publish or of
// retention (steps "retention-marked", "retention-destroyed").
func (s *Server) pauseAt(ctx context.Context, step string) error {
	if s.pause != step {
		return nil
	}
	s.log.Warn("publish paused (STRATA_DEBUG_PUBLISH_PAUSE)", "step", step)
	<-ctx.Done()
	return ctx.Err()
}

// registrationOf renders infos (sorted by path) and returns the text and
// its hex sha256.
func registrationOf(infos []nixstore.PathInfo) (string, []byte, error) {
	var buf bytes.Buffer
	if err := nixstore.WriteRegistration(&buf, infos); err != nil {
		return "", nil, fmt.Errorf("write registration: %w", err)
	}
	sum := sha256.Sum256(buf.Bytes())
	return hex.EncodeToString(sum[:]), buf.Bytes(), nil
}

// Pin protects generation id from retention, with an optional name. A pin
// without a name keeps the name of a pin the generation has (pinning it
// again must not drop it); a pin with a name replaces it.
func (s *Server) Pin(id uint64, name string) (api.Generation, error) {
	return s.setPin(id, name, true)
}

// Unpin lets retention destroy generation id again.
func (s *Server) Unpin(id uint64) (api.Generation, error) {
	return s.setPin(id, "", false)
}

// ErrBadPinName is returned by Pin for a name a snapshot label cannot hold
// (the API answers 400).
var ErrBadPinName = errors.New("bad pin name")

func (s *Server) setPin(id uint64, name string, pinned bool) (api.Generation, error) {
	if err := snapshot.CheckLabels(snapshot.Labels{labelPinName: name}); err != nil {
		return api.Generation{}, fmt.Errorf("pin generation %d: %w %q: want at most %d bytes of UTF-8 without NUL, newline or tab", id, ErrBadPinName, name, snapshot.MaxLabelValue)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	g, ok := s.gens[id]
	if !ok {
		return api.Generation{}, fmt.Errorf("generation %d: %w", id, ErrUnknownGeneration)
	}
	pins, err := s.state.pins()
	if err != nil {
		return api.Generation{}, err
	}
	if pinned {
		if old, ok := pins[id]; ok && name == "" {
			name = old
		}
		pins[id] = name
	} else {
		delete(pins, id)
	}
	if err := s.state.setPins(pins); err != nil {
		return api.Generation{}, err
	}
	l := snapshot.Labels{labelPinned: "", labelPinName: ""}
	if pinned {
		l = snapshot.Labels{labelPinned: "true", labelPinName: name}
	}
	if err := s.backend.SetLabels(context.Background(), id, l); err != nil {
		// pins.json has it; the next start writes the label again.
		s.log.Error("write pin onto snapshot", "generation", id, "err", err)
	}
	g.Pinned, g.PinName = pinned, name
	s.swap()
	if !pinned {
		s.retainLocked(context.Background())
	}
	// On a replica, an unpin leaves the primary's pin, which retention
	// here still keeps: the answer says so (before, it said "pinned":
	// false while the list said pinned(primary)).
	return s.shown(g), nil
}

// SetNFSAllow makes allow the nfs.allow that GET /v1/nfs/access answers
// with (a reload sets it when it gives the export's guard the same list).
func (s *Server) SetNFSAllow(allow []netip.Prefix) {
	a := append([]netip.Prefix(nil), allow...)
	s.nfsAllow.Store(&a)
}

// NFSAllow is nfs.allow as the export applies it now.
func (s *Server) NFSAllow() []netip.Prefix {
	if a := s.nfsAllow.Load(); a != nil {
		return *a
	}
	return s.cfg.NFSAllow
}

// Keep is retention.keep as retention applies it now.
func (s *Server) Keep() int { return int(s.keep.Load()) }

// SetKeep makes n retention.keep from now on (a reload sets it) and, when
// it changed, runs a retention pass at once, in the background: the pass
// waits for a publish that is running (which retains with n itself).
func (s *Server) SetKeep(n int) {
	if n < 1 || int(s.keep.Swap(int64(n))) == n {
		return
	}
	s.detached.Add(1)
	go func() {
		defer s.detached.Done()
		s.Retain(s.life)
	}()
}

// Retain destroys generations that are older than the newest retention.keep,
// not pinned and held by no builder (InUse); while InUse says the holds are
// not known yet it destroys nothing. What it keeps and why is recorded for
// RetentionWaits.
func (s *Server) Retain(ctx context.Context) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.retainLocked(ctx)
}

func (s *Server) retainLocked(ctx context.Context) {
	gs := s.sorted()
	prev := s.waits
	var waits []api.RetentionWait
	defer func() { // readers (RetentionWaits) take infoMu only
		s.infoMu.Lock()
		s.waits = waits
		s.infoMu.Unlock()
	}()
	keep := int(s.keep.Load())
	if len(gs) <= keep {
		return
	}
	holders, known := map[uint64][]string{}, true
	if s.inUse != nil {
		holders, known = s.inUse()
	}
	destroyed := false
	defer func() {
		if destroyed {
			s.announceLocked()
		}
		s.logWaits(prev, waits)
	}()
	// A replica keeps what its primary pins, which it learns from each
	// sync's list: until the first since this start, nothing is destroyed
	// (a pass on a change of the builders' holds ran before it, and
	// destroyed generations the primary pins while the primary was down).
	pinsUnknown := s.cfg.Replica() && s.upstreamPinned == nil
	for _, g := range gs[:len(gs)-keep] {
		if g.Pinned || hasKey(s.upstreamPinned, g.ID) {
			continue
		}
		if pinsUnknown {
			waits = append(waits, api.RetentionWait{Generation: g.ID, Reason: "the primary's pins not known yet (no sync has listed its generations since this start)"})
			s.metrics.retentionDeferred("unknown")
			continue
		}
		if g.adopted {
			waits = append(waits, api.RetentionWait{Generation: g.ID, Reason: "adopted from its snapshot by this start; retention resumes after a restart"})
			continue
		}
		if s.beingSent(g.ID) {
			waits = append(waits, api.RetentionWait{Generation: g.ID, Reason: "being sent to a replica"})
			continue
		}
		if !known {
			waits = append(waits, api.RetentionWait{Generation: g.ID, Reason: "builders' holds not known yet (gossip settling)"})
			s.metrics.retentionDeferred("unknown")
			continue
		}
		if h := holders[g.ID]; len(h) > 0 {
			waits = append(waits, api.RetentionWait{Generation: g.ID, Reason: "held by builders", Holders: h})
			s.metrics.retentionDeferred("held")
			continue
		}
		undoom, ok := s.doom(g.ID) // a stream that started just now wins
		if !ok {
			waits = append(waits, api.RetentionWait{Generation: g.ID, Reason: "being sent to a replica"})
			continue
		}
		destroyed = true
		s.dropPrecomputed(g.ID)
		if s.export != nil {
			s.export.Remove(g.ID)
		}
		keep := func() {
			if s.export != nil {
				_ = s.export.Add(g.ID, PhysicalStore(g.path))
			}
			undoom()
		}
		// The intent first: a stop between the destroy and the removal of
		// the manifest then leaves a state the next start finishes, not a
		// generation reported missing (see markRetiring).
		if err := s.state.markRetiring(g.ID); err != nil {
			s.log.Error("retention: generation kept", "generation", g.ID, "err", err)
			keep()
			continue
		}
		if s.pauseAt(ctx, "retention-marked") != nil {
			return
		}
		if err := s.backend.Destroy(ctx, g.ID); err != nil && !errors.Is(err, snapshot.ErrNotFound) {
			s.log.Error("retention: destroy snapshot", "generation", g.ID, "err", err)
			if err := s.state.clearRetiring(g.ID); err != nil {
				s.log.Error("retention", "generation", g.ID, "err", err)
			}
			keep()
			continue
		}
		if s.pauseAt(ctx, "retention-destroyed") != nil {
			return
		}
		s.waitRows(g.ID) // its rows may still be being written (replica.go)
		if err := s.state.removeGeneration(g.ID); err != nil {
			s.log.Error("retention: remove state", "generation", g.ID, "err", err)
		}
		delete(s.gens, g.ID)
		s.swap()
		undoom()
		s.log.Info("retention destroyed generation", "generation", g.ID)
	}
}

// logWaits logs the retention waits when they differ from prev.
func (s *Server) logWaits(prev, waits []api.RetentionWait) {
	if fmt.Sprint(prev) == fmt.Sprint(waits) {
		return
	}
	for _, w := range waits {
		s.log.Info("retention keeps generation", "generation", w.Generation, "reason", w.Reason, "holders", w.Holders)
	}
}

// Run publishes every publish.interval until ctx ends. It returns nil on
// cancellation.
func (s *Server) Run(ctx context.Context) error {
	if s.cfg.PublishInterval <= 0 {
		<-ctx.Done()
		return nil
	}
	t := time.NewTicker(s.cfg.PublishInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			s.step.Begin()
			_, _ = s.Publish(ctx)
			s.step.End()
		}
	}
}
