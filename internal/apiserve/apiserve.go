// Package apiserve serves a strata daemon's HTTP API (the server's and the
// builder agent's) the same way for both:
//
//   - on a unix socket, where every call is allowed: the socket's file mode
//     (0660, root's group, set before the socket appears at its path) is the
//     guard; a live daemon's socket is never taken over;
//   - optionally on TCP, where mutating calls (wrapped with Mutating) need
//     "Authorization: Bearer <token>" and are refused when no token is set;
//   - errors as JSON api.Error bodies, indented JSON answers.
package apiserve

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/secretfile"
)

// ReadToken reads the bearer token from file, named in errors by key, the
// configuration key it comes from (api.token_file). An empty name or a missing
// file gives the empty token: mutating TCP calls are then refused, and the
// unix socket still works. A token file that group or other users can read,
// or that another user owns, is refused (secretfile.Read).
func ReadToken(file, key string) (string, error) {
	if file == "" {
		return "", nil
	}
	b, err := secretfile.Read(file, key)
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

type ctxKey int

const viaSocket ctxKey = 1

// SocketConnContext is the http.Server ConnContext of the unix socket
// listener: it marks the requests that need no token.
func SocketConnContext(ctx context.Context, _ net.Conn) context.Context {
	return context.WithValue(ctx, viaSocket, true)
}

// Token is the bearer token mutating TCP calls need. It can be replaced
// while the API serves (SIGHUP reload); calls in flight see the old or the
// new token, never a mix.
type Token struct{ v atomic.Pointer[string] }

// NewToken returns a Token holding s.
func NewToken(s string) *Token {
	t := &Token{}
	t.Set(s)
	return t
}

// Set replaces the token; the empty token refuses every mutating TCP call.
func (t *Token) Set(s string) { t.v.Store(&s) }

// Get returns the current token.
func (t *Token) Get() string { return *t.v.Load() }

// Mutating wraps h so that it runs only for requests that came in on the unix
// socket or carry the current token as a bearer token; others get 401 and an
// error that says which of these it was: the daemon has no token, no bearer
// token was sent, or the one sent is not the daemon's. The answer names no
// configuration key of the caller (a replica's, the CLI's): the caller
// knows where its token comes from. An empty token refuses every TCP
// request.
func Mutating(token *Token, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Context().Value(viaSocket) == nil {
			if err := checkToken(r, token.Get()); err != nil {
				WriteError(w, http.StatusUnauthorized, err)
				return
			}
		}
		h(w, r)
	}
}

// checkToken says why r may not mutate over TCP, nil if it may.
func checkToken(r *http.Request, token string) error {
	if token == "" {
		return errors.New("mutating call refused: this daemon has no API token (its api.token_file is missing or empty), so it refuses every mutating call over TCP; use its unix socket, or give it a token")
	}
	h := r.Header.Get("Authorization")
	got, ok := strings.CutPrefix(h, "Bearer ")
	if h == "" || !ok || strings.TrimSpace(got) == "" {
		return errors.New("mutating call refused: no bearer token sent (Authorization: Bearer <token>): a mutating call over TCP needs this daemon's API token, or its unix socket")
	}
	if subtle.ConstantTimeCompare([]byte(strings.TrimSpace(got)), []byte(token)) != 1 {
		return errors.New("mutating call refused: the bearer token sent is not this daemon's API token")
	}
	return nil
}

// TokenWarning is the warning for a daemon whose API listens on TCP beyond
// loopback (listen) without a token (token empty: file, named by key, is
// missing or empty): every mutating TCP call will get 401. "" when there
// is nothing to warn about.
func TokenWarning(token, file, key, listen string) string {
	if token != "" || listen == "" {
		return ""
	}
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return ""
	}
	if ip := net.ParseIP(host); host == "localhost" || (ip != nil && ip.IsLoopback()) {
		return ""
	}
	what := "is not set"
	if file != "" {
		what = file + " is missing or empty"
	}
	return fmt.Sprintf("%s %s, but api.listen %s is reachable from other hosts: every mutating call over TCP (publish, pin, replica streams, rotate) gets 401 until a token is there (then SIGHUP or restart)", key, what, listen)
}

// WriteJSON answers code with v as indented JSON.
func WriteJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// WriteError answers code with err as an api.Error body.
func WriteError(w http.ResponseWriter, code int, err error) {
	WriteJSON(w, code, api.Error{Error: err.Error()})
}

// Limits of every API server: a slow or stuck client cannot hold a
// connection or a request slot for ever. Handlers that legitimately take
// longer (a publish, a snapshot stream, a generation's Nix DB) trade the
// whole answer's writeTimeout for writeStall per write (LongResponse).
var (
	writeTimeout = 5 * time.Minute
	writeStall   = 2 * time.Minute
)

const (
	readHeaderTimeout = 10 * time.Second
	readTimeout       = 30 * time.Second
	idleTimeout       = 2 * time.Minute
	// MaxInFlight bounds the requests served at once over both listeners;
	// more wait up to queueWait for a slot, then get 503. Large answers
	// (registrations) are streamed from files, so a request in flight
	// costs little memory.
	MaxInFlight = 256
	queueWait   = 30 * time.Second
)

// LongResponse lifts the API's write timeout (writeTimeout, for the whole
// answer) for a handler whose answer may take longer: a publish, a
// snapshot stream, a generation's Nix DB (made first, then a large file).
// It returns w wrapped so that each write and flush through it must end
// within writeStall instead: a client that stops reading is cut off then
// (its request slot and what the handler holds for it freed), and one that
// keeps reading is not, however long the whole answer takes. Call it
// before writing, and write through what it returns only; the handler
// should return soon after its last write (the response's end is written
// under that write's deadline).
func LongResponse(w http.ResponseWriter) http.ResponseWriter {
	rc := http.NewResponseController(w)
	rc.SetWriteDeadline(time.Time{})
	return &stallWriter{ResponseWriter: w, rc: rc}
}

// stallWriter sets the connection's write deadline writeStall ahead before
// each write and flush.
type stallWriter struct {
	http.ResponseWriter
	rc *http.ResponseController
}

func (s *stallWriter) touch() { s.rc.SetWriteDeadline(time.Now().Add(writeStall)) }

func (s *stallWriter) WriteHeader(code int) {
	s.touch()
	s.ResponseWriter.WriteHeader(code)
}

func (s *stallWriter) Write(p []byte) (int, error) {
	s.touch()
	return s.ResponseWriter.Write(p)
}

// Flush implements http.Flusher.
func (s *stallWriter) Flush() {
	s.touch()
	s.rc.Flush()
}

// Unwrap lets http.ResponseController reach the connection's writer.
func (s *stallWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// Server is a running API: the unix socket listener and, if asked for, a TCP
// one, both serving the same handler.
type Server struct {
	socket  string
	servers []*http.Server
	errc    chan error
}

// Limit bounds the requests h serves at once to n; a request that finds no
// slot within queueWait gets 503 with Retry-After.
func Limit(n int, h http.Handler) http.Handler {
	slots := make(chan struct{}, n)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t := time.NewTimer(queueWait)
		defer t.Stop()
		select {
		case slots <- struct{}{}:
		case <-r.Context().Done():
			return
		case <-t.C:
			w.Header().Set("Retry-After", "1")
			WriteError(w, http.StatusServiceUnavailable, fmt.Errorf("server busy: %d requests in flight", n))
			return
		}
		defer func() { <-slots }()
		h.ServeHTTP(w, r)
	})
}

// ErrSocketInUse is Start's error when a live daemon answers on the socket.
var ErrSocketInUse = errors.New("a running daemon is listening on it (another daemon with the same state dir or api.socket?)")

// CheckSocket returns ErrSocketInUse (naming the socket) when a daemon
// accepts connections on socket, and nil when nothing does (no file, or a
// stale one). A path that exists and is not a socket is an error too.
func CheckSocket(socket string) error {
	fi, err := os.Lstat(socket)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("api socket %s: %w", socket, err)
	}
	if fi.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("api socket %s exists and is not a socket; remove it or set api.socket", socket)
	}
	c, err := net.DialTimeout("unix", socket, 2*time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("api socket %s: %w", socket, ErrSocketInUse)
	}
	return nil
}

// Start listens on socket and, if tcp is not empty, on tcp, and serves h on
// both until Shutdown, with the timeouts above and at most MaxInFlight
// requests at once. The socket appears at its path with its final mode
// (0660): it is bound under a temporary name, chmodded, then renamed into
// place. A live daemon's socket is never replaced (CheckSocket): that is an
// error; a stale socket file is. A listen failure closes what was opened and
// is returned naming the address.
func Start(h http.Handler, tcp, socket string, log *slog.Logger) (*Server, error) {
	if err := CheckSocket(socket); err != nil {
		return nil, err
	}
	h = Limit(MaxInFlight, h)
	s := &Server{socket: socket, errc: make(chan error, 2)}
	newServer := func() *http.Server {
		return &http.Server{Handler: h, ReadHeaderTimeout: readHeaderTimeout, ReadTimeout: readTimeout,
			WriteTimeout: writeTimeout, IdleTimeout: idleTimeout,
			ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug)}
	}
	var ls []net.Listener
	if tcp != "" {
		l, err := net.Listen("tcp", tcp)
		if err != nil {
			return nil, fmt.Errorf("bind api.listen %s: %w", tcp, err)
		}
		ls = append(ls, l)
		s.servers = append(s.servers, newServer())
		log.Info("api listening", "addr", l.Addr().String())
	}
	ul, err := listenSocket(socket)
	if err != nil {
		for _, l := range ls {
			l.Close()
		}
		return nil, err
	}
	ls = append(ls, ul)
	us := newServer()
	us.ConnContext = SocketConnContext
	s.servers = append(s.servers, us)
	for i, hs := range s.servers {
		go func() {
			if err := hs.Serve(ls[i]); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.errc <- fmt.Errorf("serve api: %w", err)
			}
		}()
	}
	return s, nil
}

// listenSocket binds socket with mode 0660 from the start: under a
// temporary name in the same directory, chmodded, then renamed over a stale
// file.
func listenSocket(socket string) (net.Listener, error) {
	tmp := fmt.Sprintf("%s.%d.tmp", socket, os.Getpid())
	os.Remove(tmp)
	ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen api socket %s: %w", socket, err)
	}
	ul.SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, 0o660); err != nil {
		ul.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("listen api socket %s: chmod: %w", socket, err)
	}
	if err := os.Rename(tmp, socket); err != nil {
		ul.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("listen api socket %s: %w", socket, err)
	}
	return ul, nil
}

// Err delivers the error of a listener that stopped serving on its own.
func (s *Server) Err() <-chan error { return s.errc }

// Shutdown stops both listeners, waiting at most 5 s for calls in flight,
// and removes the socket file.
func (s *Server) Shutdown(ctx context.Context) {
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	for _, hs := range s.servers {
		hs.Shutdown(sctx)
	}
	os.Remove(s.socket)
}
