// Package apiserve serves a strata daemon's HTTP API (the server's and the
// builder agent's) the same way for both:
//
//   - on a unix socket, where every call is allowed: the socket's file mode
//     (0660, root's group) is the guard;
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
)

// ReadToken reads the bearer token from file. An empty name or a missing
// file gives the empty token: mutating TCP calls are then refused, and the
// unix socket still works.
func ReadToken(file string) (string, error) {
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
// error that says what is missing. An empty token refuses every TCP request.
func Mutating(token *Token, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Context().Value(viaSocket) == nil && !validToken(r, token.Get()) {
			WriteError(w, http.StatusUnauthorized, errors.New("mutating call needs a bearer token (api.token_file) or the unix socket"))
			return
		}
		h(w, r)
	}
}

func validToken(r *http.Request, token string) bool {
	if token == "" {
		return false
	}
	got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	return ok && subtle.ConstantTimeCompare([]byte(strings.TrimSpace(got)), []byte(token)) == 1
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

// Server is a running API: the unix socket listener and, if asked for, a TCP
// one, both serving the same handler.
type Server struct {
	socket  string
	servers []*http.Server
	errc    chan error
}

// Start listens on socket (replacing a stale socket file, mode 0660) and, if
// tcp is not empty, on tcp, and serves h on both until Shutdown. A listen
// failure closes what was opened and is returned naming the address.
func Start(h http.Handler, tcp, socket string, log *slog.Logger) (*Server, error) {
	s := &Server{socket: socket, errc: make(chan error, 2)}
	var ls []net.Listener
	if tcp != "" {
		l, err := net.Listen("tcp", tcp)
		if err != nil {
			return nil, fmt.Errorf("listen api %s: %w", tcp, err)
		}
		ls = append(ls, l)
		s.servers = append(s.servers, &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second})
		log.Info("api listening", "addr", l.Addr().String())
	}
	os.Remove(socket)
	ul, err := net.Listen("unix", socket)
	if err != nil {
		for _, l := range ls {
			l.Close()
		}
		return nil, fmt.Errorf("listen api socket %s: %w", socket, err)
	}
	os.Chmod(socket, 0o660)
	ls = append(ls, ul)
	s.servers = append(s.servers, &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, ConnContext: SocketConnContext})
	for i, hs := range s.servers {
		go func() {
			if err := hs.Serve(ls[i]); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.errc <- fmt.Errorf("serve api: %w", err)
			}
		}()
	}
	return s, nil
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
