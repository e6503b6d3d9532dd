// Package replica is the puller of a replica server: it asks the primary
// for its generations and receives each one it lacks as a snapshot stream
// (GET /v1/generations/N/stream), whole the first time and afterwards
// incremental from the newest generation it holds that is still live on
// the primary (a whole stream when none is), then hands the received
// snapshot to the server, which makes it live only when its registration's
// sha256 equals the primary's manifest.
//
// Nothing half-received ever goes live: the backend's Receive leaves no
// generation on failure, the stream's byte count and sha256 trailers must
// match, and a snapshot the server refuses is destroyed. A replica of
// another backend or of another central store (another cluster) is refused
// before a byte is received, and so is a wrong token (the primary answers
// 401).
package replica

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/atomicfile"
	"github.com/strata-nix/strata/internal/phase"
	"github.com/strata-nix/strata/snapshot"
)

// Target is the replica's own server.
type Target interface {
	// Generations are the live generations here, oldest first.
	Generations() []api.Generation
	// StoreID is the central store the generations here come from.
	StoreID() string
	// PrepareReceived is given, while generation g's stream arrives, the
	// primary's registration delta to g from the stream's base: a cheaper
	// way to g's registration than the received snapshot's own DB, which
	// AddReceived uses only if it matches g's manifest.
	PrepareReceived(ctx context.Context, g api.Generation, d api.Delta)
	// DropPrepared removes what PrepareReceived staged for generation id
	// if AddReceived did not take it: the puller calls it after every
	// receive (a no-op after AddReceived).
	DropPrepared(id uint64)
	// AddReceived makes a received snapshot live as generation g.ID, or
	// refuses it (the puller then destroys it).
	AddReceived(ctx context.Context, g api.Generation, snap snapshot.Snapshot, origin string) (api.Generation, error)
	// Missing are the generations whose manifest is kept here but whose
	// snapshot is missing, oldest first.
	Missing() []api.Generation
	// SetUpstreamPinned names the generations the primary pins, with
	// their pin names.
	SetUpstreamPinned(pins map[uint64]string)
	// Retain applies retention.
	Retain(ctx context.Context)
}

// Backend is the replica's snapshot backend.
type Backend interface {
	Kind() string
	snapshot.Streamer
	List(ctx context.Context) ([]snapshot.Snapshot, error)
	Destroy(ctx context.Context, id uint64) error
}

// Primary is the primary's API.
type Primary interface {
	// Generations lists the primary's live generations.
	Generations(ctx context.Context) (api.GenerationList, error)
	// Stream asks for a snapshot stream.
	Stream(ctx context.Context, r api.StreamRequest) (*api.Stream, error)
	// Delta asks for the registration delta from generation from to to.
	Delta(ctx context.Context, from, to uint64) (api.Delta, error)
	// URL is the primary's API URL ("" while none is known), recorded
	// as each received generation's origin.
	URL() string
}

// Fixed is the primary at url (replica.of) through client.
func Fixed(client *api.Client, url string) Primary { return fixed{client, url} }

type fixed struct {
	*api.Client
	url string
}

func (f fixed) URL() string { return f.url }

// Puller keeps a replica's generations in step with its primary.
type Puller struct {
	primary  Primary
	backend  Backend
	target   Target
	stateDir string
	log      *slog.Logger
	m        *metrics
	pause    string
	stall    time.Duration
	progress func()
	self     string
	storeDir string // Options.StoreDir
	// lostLogged are the primary's pinned generations this replica's
	// backend cannot receive back, logged once each (lostPins).
	lostLogged map[uint64]bool
}

// Options are what a Puller is made of.
type Options struct {
	Primary  Primary
	Backend  Backend
	Target   Target
	StateDir string // holds the interrupted receive's record (ZFS resume)
	Logger   *slog.Logger
	Registry *prometheus.Registry // nil: metrics not registered
	// Pause "received" blocks each receive after its stream arrived in
	// full and before it goes live, until ctx ends, so that a test can
	// kill -9 the process there (STRATA_DEBUG_REPLICA_PAUSE).
	Pause string
	// Stall aborts a stream from which no byte arrived for this long
	// (0: api.DefaultStreamStall); the next sync asks again.
	Stall time.Duration
	// Progress, if set, is called as stream bytes arrive and as each
	// generation goes live, so that a watchdog measures a sync by its
	// progress, not by its length (a first whole stream of a large store).
	Progress func()
	// Self is this server's identity (state_dir/server-id): a primary
	// that answers with it is this server itself, and is refused.
	Self string
	// StoreDir is this server's store.dir: a primary whose generations
	// are of another store dir is refused (they would fail verification
	// after every whole stream).
	StoreDir string
}

// New returns a Puller.
func New(o Options) *Puller {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Puller{primary: o.Primary, backend: o.Backend, target: o.Target,
		stateDir: o.StateDir, log: log.With("component", "replica"), m: newMetrics(o.Registry), pause: o.Pause, stall: o.Stall, progress: o.Progress, self: o.Self, storeDir: o.StoreDir, lostLogged: map[uint64]bool{}}
}

// Primary returns the primary's API URL ("" while none is known).
func (p *Puller) Primary() string { return p.primary.URL() }

// SetToken makes the requests to the primary carry token from now on
// (replica.token_file re-read on SIGHUP): the next sync uses it, one under
// way keeps the token it started with for the requests it has sent.
func (p *Puller) SetToken(token string) {
	if t, ok := p.primary.(interface{ SetToken(string) }); ok {
		t.SetToken(token)
	}
}

// Result says what one Sync did.
type Result struct {
	// Received are the generations made live, in order.
	Received []Received
}

// Received is one generation received.
type Received struct {
	ID, From uint64 // From 0: a whole stream
	Bytes    int64
	// DeltaBytes is the size of the registration delta (the primary's
	// JSON answer) used instead of reading the snapshot's DB; 0 if none.
	DeltaBytes int64
	Took       time.Duration
	// Stream is the part of Took spent receiving the stream into the
	// backend; the rest is the target's check and making it live.
	Stream time.Duration
}

// Sync receives every generation the primary has that is newer than the
// newest one here (all of the primary's, when there is none here), oldest
// first, then each older one the primary pins that is not live here
// (lostPins; not one whose manifest kept here names other content), then
// applies retention. It stops at the first failure, and
// applies retention then too (not when the primary did not answer or was
// refused: nothing arrived, and its pins are not known).
func (p *Puller) Sync(ctx context.Context) (Result, error) {
	var res Result
	endList := phase.Begin(ctx, "replica: list the primary's generations")
	list, err := p.primary.Generations(ctx)
	endList()
	if err != nil {
		p.m.syncs.WithLabelValues("error").Inc()
		return res, fmt.Errorf("ask primary %s for its generations: %w", p.primary.URL(), err)
	}
	if err := p.check(list); err != nil {
		p.m.syncs.WithLabelValues("refused").Inc()
		return res, err
	}
	if err := p.diverged(list); err != nil {
		p.m.syncs.WithLabelValues("refused").Inc()
		p.m.diverged.Set(1)
		return res, err
	}
	p.m.diverged.Set(0)
	pins := map[uint64]string{}
	for _, g := range list.Generations {
		if g.Pinned {
			pins[g.ID] = g.PinName
		}
	}
	p.target.SetUpstreamPinned(pins)
	// Retention runs after every sync that got the primary's list (and so
	// its pins), failed or not: one generation that keeps failing must not
	// stop it for ever while the disk fills. It destroys only live
	// generations here; the one whose receive failed never went live.
	retain := func() {
		endRetain := phase.Begin(ctx, "replica: retention")
		p.target.Retain(ctx)
		endRetain()
	}
	// The token, every sync: a wrong replica.token_file would otherwise
	// show only when the primary next publishes, maybe hours later.
	if err := p.checkToken(ctx); err != nil {
		p.m.syncs.WithLabelValues("refused").Inc()
		retain()
		return res, err
	}
	if err := p.settle(ctx, list, &res); err != nil {
		p.m.syncs.WithLabelValues("error").Inc()
		retain()
		return res, err
	}
	if err := p.resume(ctx, list, &res); err != nil {
		p.m.syncs.WithLabelValues("error").Inc()
		retain()
		return res, err
	}
	for _, g := range list.Generations {
		local := p.target.Generations()
		var newest uint64
		if len(local) > 0 {
			newest = local[len(local)-1].ID
		}
		if g.ID <= newest {
			continue
		}
		r, err := p.pull(ctx, g, bases(local, list.Generations, g.ID))
		if err != nil {
			p.m.syncs.WithLabelValues("error").Inc()
			retain()
			p.observeLag(list)
			return res, err
		}
		res.Received = append(res.Received, r)
	}
	// A lost generation whose manifest kept here names other content
	// would be refused after its whole stream, at every sync: it is not
	// asked for, and the sync fails saying so.
	kept := map[uint64]string{}
	for _, g := range p.target.Missing() {
		kept[g.ID] = g.RegistrationSHA256
	}
	var other error
	for _, g := range p.lostPins(list) {
		if sum, ok := kept[g.ID]; ok && sum != g.RegistrationSHA256 {
			if other == nil {
				other = fmt.Errorf("%w: generation %d, which the primary pins: its registration sha256 is %s on the primary, but the manifest kept here for its missing snapshot says %s: "+
					"not received (strata generations forget %d drops that manifest)", errRefused, g.ID, g.RegistrationSHA256, sum, g.ID)
			}
			continue
		}
		r, err := p.pull(ctx, g, bases(p.target.Generations(), list.Generations, g.ID))
		if err != nil {
			p.m.syncs.WithLabelValues("error").Inc()
			retain()
			p.observeLag(list)
			err = fmt.Errorf("generation %d, which the primary pins: %w", g.ID, err)
			if other != nil {
				err = fmt.Errorf("%w; %w", err, other)
			}
			return res, err
		}
		res.Received = append(res.Received, r)
	}
	retain()
	if other != nil {
		p.m.syncs.WithLabelValues("refused").Inc()
		p.observeLag(list)
		return res, other
	}
	p.m.syncs.WithLabelValues("ok").Inc()
	p.m.lastSync.SetToCurrentTime()
	p.observeLag(list)
	return res, nil
}

// ErrNotPrimary means replica.of names this server itself or another
// replica: nothing would ever arrive.
var ErrNotPrimary = errors.New("not a primary")

// Probe asks the primary for its generations and checks it as Sync does,
// receiving nothing. It fails wrapping ErrNotPrimary when the primary is
// this server or a replica; any other error means it was not reachable.
func (p *Puller) Probe(ctx context.Context) error {
	list, err := p.primary.Generations(ctx)
	if err != nil {
		return fmt.Errorf("ask primary %s for its generations: %w", p.primary.URL(), err)
	}
	return p.check(list)
}

// check refuses a primary that is this server or a replica, or one of
// another backend or another central store.
func (p *Puller) check(list api.GenerationList) error {
	if p.self != "" && list.Server == p.self {
		return fmt.Errorf("%w: replica.of %s is this server itself (it answers with this server's identity %s): set replica.of to the primary's API URL; nothing received", ErrNotPrimary, p.primary.URL(), p.self)
	}
	if list.Role == "replica" {
		of := list.ReplicaOf
		if of == "" {
			of = "the cluster's primary"
		}
		return fmt.Errorf("%w: replica.of %s is itself a replica (of %s), which publishes nothing of its own: set replica.of to the primary's API URL (%s?); nothing received", ErrNotPrimary, p.primary.URL(), of, of)
	}
	if list.Backend != "" && list.Backend != p.backend.Kind() {
		return fmt.Errorf("primary %s keeps %s snapshots and this replica %s: mixed backends cannot replicate; nothing received", p.primary.URL(), list.Backend, p.backend.Kind())
	}
	if p.storeDir != "" && list.StoreDir != "" && list.StoreDir != p.storeDir {
		return fmt.Errorf("primary %s serves generations of store dir %s, but this replica's store.dir is %s: set store.dir to the primary's; nothing received", p.primary.URL(), list.StoreDir, p.storeDir)
	}
	if mine := p.target.StoreID(); mine != "" && list.Store != "" && list.Store != mine {
		return fmt.Errorf("primary %s serves central store %s, but this replica's generations come from store %s (a primary of another cluster?): nothing received", p.primary.URL(), list.Store, mine)
	}
	return nil
}

// ErrDiverged means the primary's generations contradict this replica's:
// one of its generations has another registration under an id this
// replica serves, or its newest is older than this replica's newest (the
// primary's state and snapshots were lost and it publishes from
// generation 1 again, with the same store). Nothing is received (the
// primary's new generations would come under ids that name other content
// here, or be skipped as older than what is here), nothing is destroyed
// (retention does not run: the primary's list says nothing about this
// replica's generations), and every sync fails with it until an operator
// resolves it.
var ErrDiverged = errors.New("the primary's generations contradict this replica's")

// diverged refuses a primary whose generations contradict this replica's
// (ErrDiverged).
func (p *Puller) diverged(list api.GenerationList) error {
	local := p.target.Generations()
	if len(local) == 0 {
		return nil
	}
	here := map[uint64]api.Generation{}
	for _, g := range local {
		here[g.ID] = g
	}
	var newest uint64
	for _, gs := range [][]api.Generation{list.Generations, list.Missing} {
		for _, g := range gs {
			newest = max(newest, g.ID)
			if h, ok := here[g.ID]; ok && g.RegistrationSHA256 != "" && g.RegistrationSHA256 != h.RegistrationSHA256 {
				return fmt.Errorf("%w: primary %s has generation %d with registration sha256 %s, this replica has generation %d with %s "+
					"(the same id for other content: was the primary's state_dir lost, so that it published from generation 1 again?); "+
					"nothing received, nothing destroyed here, and every sync refuses until the ids agree again "+
					"(give the primary a next generation id above this replica's newest, %d, in its state_dir/next-id, or empty this replica)",
					ErrDiverged, p.primary.URL(), g.ID, g.RegistrationSHA256, g.ID, h.RegistrationSHA256, local[len(local)-1].ID)
			}
		}
	}
	if mine := local[len(local)-1].ID; newest < mine {
		what := fmt.Sprintf("its newest generation is %d", newest)
		if newest == 0 {
			what = "it has no generation"
		}
		return fmt.Errorf("%w: primary %s went back: %s, this replica has generations up to %d "+
			"(was the primary's state_dir lost, so that it publishes from generation 1 again?); "+
			"nothing received, nothing destroyed here, and every sync refuses until the primary's newest generation is at least %d "+
			"(give the primary a next generation id above %d in its state_dir/next-id, or empty this replica)",
			ErrDiverged, p.primary.URL(), what, mine, mine, mine)
	}
	return nil
}

// lostPins are the generations the primary pins, live there, that are
// older than the newest here and not live here, oldest first: destroyed
// here before the primary pinned them, or lost (a snapshot removed by
// hand). Each is received as any other, incrementally from the nearest
// older generation both have, else whole. Not on ZFS: its snapshots are
// one line per dataset, and a receive of an older generation would roll
// the newer ones back (zfs receive -F) or be refused; it is logged once.
func (p *Puller) lostPins(list api.GenerationList) []api.Generation {
	local := p.target.Generations()
	if len(local) == 0 {
		return nil
	}
	here := map[uint64]bool{}
	for _, g := range local {
		here[g.ID] = true
	}
	var out []api.Generation
	for _, g := range list.Generations {
		if !g.Pinned || here[g.ID] || g.ID > local[len(local)-1].ID {
			continue
		}
		if p.backend.Kind() != "btrfs" {
			if !p.lostLogged[g.ID] {
				p.log.Warn("the primary pins a generation that is not here; a "+p.backend.Kind()+" replica cannot receive a generation older than its newest, so it stays missing here",
					"generation", g.ID)
				p.lostLogged[g.ID] = true
			}
			continue
		}
		out = append(out, g)
	}
	return out
}

// bases are the generations an incremental stream of id may start from,
// best first: the generations here older than id that the primary still
// has live with the same registration, newest first. None: a whole stream.
func bases(local, primary []api.Generation, id uint64) []uint64 {
	live := map[uint64]string{}
	for _, g := range primary {
		live[g.ID] = g.RegistrationSHA256
	}
	var out []uint64
	for i := len(local) - 1; i >= 0; i-- {
		g := local[i]
		if sum, ok := live[g.ID]; ok && g.ID < id && sum == g.RegistrationSHA256 {
			out = append(out, g.ID)
		}
	}
	return out
}

// maxBases bounds the incremental attempts before a whole stream.
const maxBases = 3

// pull receives generation g and makes it live: incrementally from the
// first base the backend can apply, else whole. A base fails cheaply, at
// the stream's first command (btrfs finds no parent when a label change on
// the primary, such as a pin, gave the base's snapshot a new transaction
// id), so the next older one is tried, up to maxBases.
func (p *Puller) pull(ctx context.Context, g api.Generation, from []uint64) (Received, error) {
	// A snapshot of that id that is here but not live (settle has handled
	// this replica's own unfinished receive) cannot be accounted for: it
	// is kept, and no stream is asked for that could not be received.
	endHere := phase.Begin(ctx, "replica: is the generation here already")
	ok, err := p.here(ctx, g.ID)
	endHere()
	if err != nil {
		return Received{}, err
	} else if ok {
		return Received{}, fmt.Errorf("%w: generation %d: snapshot %s is here but not live, and it is not this replica's own unfinished receive: "+
			"kept (never destroyed without knowing where it came from); remove it by hand to receive generation %d", errRefused, g.ID, snapshot.Name(g.ID), g.ID)
	}
	for i, b := range from {
		if i == maxBases {
			break
		}
		r, err := p.receive(ctx, g, b, "")
		if err == nil || ctx.Err() != nil || errors.Is(err, errRefused) || errors.Is(err, errBroken) || noSpace(err) {
			return r, err
		}
		p.log.Warn("incremental stream failed; trying an older base or a whole stream", "generation", g.ID, "from", b, "err", err)
	}
	return p.receive(ctx, g, 0, "")
}

// noSpace reports whether a receive failed because the replica's
// filesystem is full (btrfs receive: "No space left on device"; zfs
// receive: "out of space"): an older base or a whole stream needs no less
// room, and would only fill the disk again, so pull stops there; the next
// sync, once space is freed, asks for the same incremental stream.
func noSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || strings.Contains(err.Error(), "No space left on device") ||
		strings.Contains(err.Error(), "out of space")
}

// checkToken asks the primary whether it accepts replica.token_file's
// token (GET /v1/token), when the primary's client can ask: a 401 is a
// refusal naming the key; a primary older than the call (404), or one
// that cannot be reached now, leaves it to the stream requests.
func (p *Puller) checkToken(ctx context.Context) error {
	c, ok := p.primary.(interface{ CheckToken(context.Context) error })
	if !ok {
		return nil
	}
	err := c.CheckToken(ctx)
	var se *api.StatusError
	if errors.As(err, &se) && se.Code == http.StatusUnauthorized {
		return fmt.Errorf("%w: primary %s: %w (check replica.token_file: it must hold the primary's api.token_file token)", errRefused, p.primary.URL(), err)
	}
	return nil
}

// errRefused marks refusals that a whole stream would not cure.
var errRefused = errors.New("refused")

// errBroken marks a stream that did not arrive whole (its trailers): the
// next sync asks again, from the same base.
var errBroken = errors.New("stream broken")

func (p *Puller) receive(ctx context.Context, g api.Generation, from uint64, token string) (Received, error) {
	start := time.Now()
	kind := "full"
	if from != 0 {
		kind = "incremental"
	}
	if token != "" {
		kind = "resume"
	}
	// The primary's registration delta from the base, fetched and handed
	// to the target while the stream arrives: with it the target checks
	// the registration without reading the received snapshot's DB.
	deltaBytes := make(chan int64, 1)
	stopDelta := func() {}
	if from != 0 && token == "" {
		// Deferred in this order: once the delta fetch has ended, nothing
		// it staged outlives a receive that failed.
		defer p.target.DropPrepared(g.ID)
		var prep sync.WaitGroup
		defer prep.Wait() // no PrepareReceived outlives its receive
		dctx, cancel := context.WithCancel(ctx)
		defer cancel()
		stopDelta = cancel
		prep.Add(1)
		go func() {
			defer prep.Done()
			end := phase.Begin(ctx, "replica: registration delta from the primary")
			d, err := p.primary.Delta(dctx, from, g.ID)
			end()
			if err != nil {
				p.log.Info("no registration delta from the primary; the received snapshot's db gives the registration", "generation", g.ID, "from", from, "err", err)
				deltaBytes <- 0
				return
			}
			p.target.PrepareReceived(dctx, g, d)
			deltaBytes <- jsonSize(&d)
		}()
	} else {
		deltaBytes <- 0
	}
	endAsk := phase.Begin(ctx, "replica: ask for the stream (until its header)")
	st, err := p.primary.Stream(ctx, api.StreamRequest{ID: g.ID, From: from, Backend: p.backend.Kind(), Resume: token, Stall: p.stall})
	endAsk()
	if err != nil {
		var se *api.StatusError
		if errors.As(err, &se) && (se.Code == http.StatusUnauthorized || se.Code == http.StatusConflict) {
			return Received{}, fmt.Errorf("%w: generation %d: %w (check replica.token_file)", errRefused, g.ID, err)
		}
		return Received{}, fmt.Errorf("generation %d: %w", g.ID, err)
	}
	defer st.Close()
	if token == "" {
		endMark := phase.Begin(ctx, "replica: record the receive in the state dir")
		if err := p.markReceiving(g.ID); err != nil {
			return Received{}, err
		}
		endMark()
	}
	p.progressed()
	var in io.Reader = st
	if p.progress != nil {
		in = progressReader{st, p.progress}
	}
	rd := &readErr{r: in}
	in = rd
	var snap snapshot.Snapshot
	var dBytes int64
	endRecv := phase.Begin(ctx, "replica: receive into the backend")
	if token != "" {
		snap, err = p.backend.(snapshot.Resumer).ResumeReceive(ctx, in, g.ID)
	} else {
		snap, err = p.backend.Receive(ctx, in, g.ID, from)
	}
	endRecv()
	if err != nil {
		p.m.bytes.WithLabelValues(kind).Add(float64(st.Bytes()))
		if rd.failed() {
			// The stream broke (the primary died, a reset, a stall), not
			// the base: the next sync asks for the same stream again
			// rather than this one for a whole stream.
			err = fmt.Errorf("%w: %w", errBroken, err)
		}
		return Received{}, fmt.Errorf("receive generation %d from %d: %w", g.ID, from, err)
	}
	// Whatever the backend left unread must arrive and match the trailers.
	endRest := phase.Begin(ctx, "replica: rest of the stream and its trailers")
	_, err = io.Copy(io.Discard, in)
	endRest()
	streamed := time.Since(start)
	p.m.bytes.WithLabelValues(kind).Add(float64(st.Bytes()))
	if err != nil {
		err = fmt.Errorf("%w: %w", errBroken, err)
	} else if err = p.pauseAt(ctx, "received", g.ID); err == nil {
		dBytes = p.awaitDelta(ctx, g.ID, deltaBytes, stopDelta)
		endAdd := phase.Begin(ctx, "replica: check and make live")
		_, err = p.target.AddReceived(ctx, g, snap, p.primary.URL())
		endAdd()
		if err != nil {
			err = fmt.Errorf("%w: %w", errRefused, err)
		}
	}
	if err != nil {
		if derr := p.backend.Destroy(context.WithoutCancel(ctx), g.ID); derr != nil {
			p.log.Error("destroy refused snapshot", "generation", g.ID, "err", derr)
		}
		p.clearReceiving()
		return Received{}, fmt.Errorf("generation %d: %w", g.ID, err)
	}
	endClear := phase.Begin(ctx, "replica: clear the record")
	p.clearReceiving()
	endClear()
	p.progressed()
	r := Received{ID: g.ID, From: from, Bytes: st.Bytes(), DeltaBytes: dBytes, Took: time.Since(start), Stream: streamed}
	p.log.Info("received generation", "primary", p.primary.URL(), "generation", g.ID, "from", from, "kind", kind, "bytes", r.Bytes, "took", r.Took.Round(time.Millisecond))
	return r, nil
}

// deltaWait bounds how long a receive whose stream has ended waits for the
// primary's registration delta (asked for when the stream was): it only
// saves reading the received snapshot's DB (seconds at a million paths),
// so a primary slow to answer it must not hold the generation back for
// the API client's whole timeout (10 minutes).
var deltaWait = 10 * time.Second

// awaitDelta waits for the delta fetch's result (its size; 0: none) for at
// most deltaWait; then it cancels the fetch (stop) and waits for it to end,
// which it does at once (a PrepareReceived already under way is local work
// of milliseconds), so that nothing is staged after AddReceived looked.
func (p *Puller) awaitDelta(ctx context.Context, id uint64, result <-chan int64, stop func()) int64 {
	t := time.NewTimer(deltaWait)
	defer t.Stop()
	select {
	case n := <-result:
		return n
	case <-t.C:
		p.log.Info("the primary's registration delta did not come in time after the stream ended; the received snapshot's db gives the registration",
			"generation", id, "waited", deltaWait)
	case <-ctx.Done():
	}
	stop()
	return <-result
}

// The receive in progress is recorded in <state_dir>/replica-receiving
// (ReceivingFile) before its stream starts, and removed once it is live or
// gone, so that after a crash the next start knows which generation a
// resume token (ZFS) or a received but never live snapshot belongs to:
// this replica's own, to be finished or destroyed (settle).
func (p *Puller) receivingFile() string { return ReceivingFile(p.stateDir) }

// ReceivingFile is the record of the receive in progress in stateDir.
func ReceivingFile(stateDir string) string { return filepath.Join(stateDir, "replica-receiving") }

// Receiving returns the generation whose receive the record in stateDir
// names, 0 if none.
func Receiving(stateDir string) uint64 {
	b, err := os.ReadFile(ReceivingFile(stateDir))
	if err != nil {
		return 0
	}
	id, _ := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	return id
}

func (p *Puller) markReceiving(id uint64) error {
	if p.stateDir == "" {
		return nil
	}
	return atomicfile.WriteFile(p.receivingFile(), []byte(strconv.FormatUint(id, 10)+"\n"), 0o644)
}

func (p *Puller) clearReceiving() {
	if p.stateDir != "" {
		os.Remove(p.receivingFile())
	}
}

// Haser is a Backend that can tell whether generation id's snapshot is here
// (as List would show it) more cheaply than List.
type Haser interface {
	Has(ctx context.Context, id uint64) (bool, error)
}

// here reports whether the backend has generation id's snapshot.
func (p *Puller) here(ctx context.Context, id uint64) (bool, error) {
	if h, ok := p.backend.(Haser); ok {
		has, err := h.Has(ctx, id)
		if err != nil {
			return false, fmt.Errorf("list snapshots: %w", err)
		}
		return has, nil
	}
	_, ok, err := p.local(ctx, id)
	return ok, err
}

// local returns the backend's snapshot of generation id, ok=false if none.
func (p *Puller) local(ctx context.Context, id uint64) (snapshot.Snapshot, bool, error) {
	snaps, err := p.backend.List(ctx)
	if err != nil {
		return snapshot.Snapshot{}, false, fmt.Errorf("list snapshots: %w", err)
	}
	for _, sn := range snaps {
		if sn.ID == id {
			return sn, true, nil
		}
	}
	return snapshot.Snapshot{}, false, nil
}

// settle finishes the receive the record names when the process ended
// after its stream arrived in full and before it went live: the snapshot
// is made live when the primary still has that generation and its
// registration matches the primary's manifest (AddReceived checks it as
// for any receive), and destroyed otherwise, as this replica's own
// unfinished receive. A snapshot the record does not name is never touched
// here.
func (p *Puller) settle(ctx context.Context, list api.GenerationList, res *Result) error {
	if p.stateDir == "" {
		return nil
	}
	id := Receiving(p.stateDir)
	if id == 0 {
		return nil
	}
	for _, g := range p.target.Generations() {
		if g.ID == id { // it went live; only the record was left
			p.clearReceiving()
			return nil
		}
	}
	snap, ok, err := p.local(ctx, id)
	if err != nil {
		return err
	}
	if !ok {
		if _, resumable := p.backend.(snapshot.Resumer); !resumable {
			p.clearReceiving() // nothing arrived
		}
		return nil // a resume token, if any, belongs to it (resume)
	}
	start := time.Now()
	why := "the primary no longer has that generation"
	for _, g := range list.Generations {
		if g.ID != id {
			continue
		}
		if _, err := p.target.AddReceived(ctx, g, snap, p.primary.URL()); err != nil {
			why = err.Error()
			break
		}
		p.clearReceiving()
		r := Received{ID: id, Took: time.Since(start)}
		res.Received = append(res.Received, r)
		p.log.Info("adopted this replica's own unfinished receive: its registration matches the primary's manifest", "generation", id)
		return nil
	}
	p.log.Warn("destroying this replica's own unfinished receive", "snapshot", snap.Name, "why", why)
	if err := p.backend.Destroy(context.WithoutCancel(ctx), id); err != nil && !errors.Is(err, snapshot.ErrNotFound) {
		return fmt.Errorf("destroy unfinished receive %s: %w", snap.Name, err)
	}
	p.clearReceiving()
	return nil
}

// readErr records whether a read of the stream failed (io.EOF is not a
// failure). The backend's copy may read from another goroutine.
type readErr struct {
	r   io.Reader
	bad atomic.Bool
}

func (r *readErr) Read(b []byte) (int, error) {
	n, err := r.r.Read(b)
	if err != nil && err != io.EOF {
		r.bad.Store(true)
	}
	return n, err
}

func (r *readErr) failed() bool { return r.bad.Load() }

// jsonSize is the size of d as the primary's API sends it.
func jsonSize(d *api.Delta) int64 {
	b, err := json.MarshalIndent(d, "", "  ")
	if err != nil {
		return 0
	}
	return int64(len(b)) + 1
}

// progressReader reports each read that brought bytes.
type progressReader struct {
	r        io.Reader
	progress func()
}

func (r progressReader) Read(b []byte) (int, error) {
	n, err := r.r.Read(b)
	if n > 0 {
		r.progress()
	}
	return n, err
}

func (p *Puller) progressed() {
	if p.progress != nil {
		p.progress()
	}
}

// pauseAt blocks until ctx ends when the Pause option names step.
func (p *Puller) pauseAt(ctx context.Context, step string, id uint64) error {
	if p.pause != step {
		return nil
	}
	p.log.Warn("replica receive paused (STRATA_DEBUG_REPLICA_PAUSE)", "step", step, "generation", id)
	<-ctx.Done()
	return ctx.Err()
}

// resume finishes an interrupted receive (ZFS resume token) when the
// primary still has that generation, and otherwise discards it.
func (p *Puller) resume(ctx context.Context, list api.GenerationList, res *Result) error {
	rs, ok := p.backend.(snapshot.Resumer)
	if !ok {
		return nil
	}
	tok, err := rs.ResumeToken(ctx)
	if err != nil || tok == "" {
		return err
	}
	id := Receiving(p.stateDir)
	for _, g := range list.Generations {
		if g.ID != id {
			continue
		}
		p.log.Info("resuming an interrupted receive", "generation", id)
		r, err := p.receive(ctx, g, 0, tok)
		if err == nil {
			res.Received = append(res.Received, r)
			return nil
		}
		p.log.Warn("resume failed; starting the generation again", "generation", id, "err", err)
		break
	}
	p.clearReceiving()
	return rs.AbortReceive(ctx)
}

func (p *Puller) observeLag(list api.GenerationList) {
	local := p.target.Generations()
	var newest uint64
	if len(local) > 0 {
		newest = local[len(local)-1].ID
	}
	behind := 0
	var oldest time.Time
	for _, g := range list.Generations {
		if g.ID > newest {
			if behind == 0 {
				oldest = g.Created
			}
			behind++
		}
	}
	p.m.lagGens.Set(float64(behind))
	if behind == 0 {
		p.m.lagSecs.Set(0)
	} else {
		p.m.lagSecs.Set(time.Since(oldest).Seconds())
	}
}

type metrics struct {
	bytes    *prometheus.CounterVec
	syncs    *prometheus.CounterVec
	lagGens  prometheus.Gauge
	lagSecs  prometheus.Gauge
	lastSync prometheus.Gauge
	diverged prometheus.Gauge
}

func newMetrics(reg *prometheus.Registry) *metrics {
	m := &metrics{
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strata_replica_stream_bytes_total", Help: "Snapshot stream bytes received from the primary, by kind (full, incremental, resume).",
		}, []string{"kind"}),
		syncs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strata_replica_syncs_total", Help: "Replica syncs by result (ok, error, refused).",
		}, []string{"result"}),
		lagGens: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "strata_replica_lag_generations", Help: "Generations live on the primary and newer than the newest here.",
		}),
		lagSecs: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "strata_replica_lag_seconds", Help: "Age of the oldest generation the primary has and this replica still lacks (0: in step).",
		}),
		lastSync: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "strata_replica_last_sync_timestamp_seconds", Help: "When the last successful sync finished (Unix time).",
		}),
		diverged: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "strata_replica_diverged", Help: "1 while the primary's generations contradict this replica's (same id, other registration; or the primary went back): syncs refuse, nothing is received or destroyed.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.bytes, m.syncs, m.lagGens, m.lagSecs, m.lastSync, m.diverged)
	}
	return m
}
