package apiserve

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A mutating call over TCP needs the exact bearer token; on the unix socket
// it needs none; with no token configured TCP is always refused.
func TestMutatingOverSocketAndTCP(t *testing.T) {
	for _, tc := range []struct {
		name, token, header string
		want                int
		why                 string // in the 401's error
	}{
		{"no header", "secret", "", http.StatusUnauthorized, "no bearer token sent"},
		{"wrong token", "secret", "Bearer nope", http.StatusUnauthorized, "the bearer token sent is not this daemon's API token"},
		{"not bearer", "secret", "Basic secret", http.StatusUnauthorized, "no bearer token sent"},
		{"right token", "secret", "Bearer secret", http.StatusOK, ""},
		{"no token configured", "", "Bearer x", http.StatusUnauthorized, "this daemon has no API token"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tcp, sock := start(t, tc.token)
			req, _ := http.NewRequest("POST", "http://"+tcp+"/do", nil)
			if tc.header != "" {
				req.Header.Set("Authorization", tc.header)
			}
			res, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if res.StatusCode != tc.want {
				t.Fatalf("TCP: status %d, want %d: %s", res.StatusCode, tc.want, body)
			}
			// Review 18 #12: a wrong token is not "no token", and the
			// answer names no key of the caller's side.
			if tc.want == http.StatusUnauthorized && (!strings.Contains(string(body), `"error": "mutating call refused: `+tc.why) ||
				strings.Contains(string(body), "replica.token_file") || (tc.token != "" && strings.Contains(string(body), "api.token_file"))) {
				t.Errorf("TCP refusal does not say %q: %s", tc.why, body)
			}
			c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, "unix", sock)
			}}}
			res, err = c.Post("http://unix/do", "", nil)
			if err != nil {
				t.Fatal(err)
			}
			res.Body.Close()
			if res.StatusCode != http.StatusOK {
				t.Fatalf("socket: status %d, want 200", res.StatusCode)
			}
		})
	}
}

// Start replaces a stale socket (no daemon behind it); Shutdown removes
// the socket.
func TestStartReplacesStaleSocketAndShutdownRemovesIt(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "api.sock")
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	s, err := Start(http.NotFoundHandler(), "", sock, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(sock); err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket %s: %v %v, want a 0660 socket", sock, fi, err)
	}
	s.Shutdown(context.Background())
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket still there after Shutdown: %v", err)
	}
}

// A second Start on a live daemon's socket fails naming it, and the first
// daemon keeps answering on it; a path that is not a socket is left alone.
func TestStartRefusesLiveSocket(t *testing.T) {
	_, sock := start(t, "")
	_, err := Start(http.NotFoundHandler(), "", sock, slog.New(slog.DiscardHandler))
	if !errors.Is(err, ErrSocketInUse) || !strings.Contains(err.Error(), sock) {
		t.Fatalf("second Start: %v, want ErrSocketInUse naming %s", err, sock)
	}
	c := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	res, err := c.Post("http://x/do", "", nil)
	if err != nil || res.StatusCode != http.StatusOK {
		t.Fatalf("first daemon after the second start: %v %v", res, err)
	}
	res.Body.Close()

	file := filepath.Join(t.TempDir(), "api.sock")
	os.WriteFile(file, []byte("data"), 0o600)
	if _, err := Start(http.NotFoundHandler(), "", file, slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("Start over a regular file: %v", err)
	}
	if b, _ := os.ReadFile(file); string(b) != "data" {
		t.Fatal("Start replaced a regular file")
	}
}

// A TCP address that cannot be bound is an error naming the key that set
// it, api.listen, and the address (a new-user test found "listen api ADDR").
func TestStartNamesBadAddress(t *testing.T) {
	_, err := Start(http.NotFoundHandler(), "256.0.0.1:1", filepath.Join(t.TempDir(), "s"), slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), "bind api.listen 256.0.0.1:1: ") {
		t.Fatalf("err = %v, want one naming api.listen and the address", err)
	}
	// An address in use.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	addr := l.Addr().String()
	_, err = Start(http.NotFoundHandler(), addr, filepath.Join(t.TempDir(), "s"), slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), "bind api.listen "+addr+": ") || !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("err = %v, want one naming api.listen, the address and the cause", err)
	}
}

// ReadToken trims the file and treats a missing file as no token.
func TestReadToken(t *testing.T) {
	f := filepath.Join(t.TempDir(), "tok")
	if tok, err := ReadToken(f, "api.token_file"); err != nil || tok != "" {
		t.Fatalf("missing file: %q %v", tok, err)
	}
	os.WriteFile(f, []byte("  abc\n"), 0o600)
	if tok, err := ReadToken(f, "api.token_file"); err != nil || tok != "abc" {
		t.Fatalf("ReadToken = %q %v, want abc", tok, err)
	}
	// Readable by others: refused, naming the file and the fix.
	os.Chmod(f, 0o644)
	if _, err := ReadToken(f, "replica.token_file"); err == nil || !strings.Contains(err.Error(), f) || !strings.Contains(err.Error(), "chmod 600") || !strings.HasPrefix(err.Error(), "replica.token_file ") {
		t.Fatalf("mode 0644 token: %v, want a refusal naming the file and chmod 600", err)
	}
	os.Chmod(f, 0o600)
	if os.Geteuid() == 0 {
		os.Chown(f, 4242, 4242)
		if _, err := ReadToken(f, "api.token_file"); err == nil || !strings.Contains(err.Error(), "owned by uid 4242") || !strings.Contains(err.Error(), "chown") {
			t.Fatalf("token of another user: %v, want a refusal", err)
		}
	}
}

func start(t *testing.T, token string) (tcp, sock string) {
	t.Helper()
	sock = filepath.Join(t.TempDir(), "api.sock")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	mux := http.NewServeMux()
	mux.HandleFunc("POST /do", Mutating(NewToken(token), func(w http.ResponseWriter, r *http.Request) { WriteJSON(w, http.StatusOK, "done") }))
	s, err := Start(mux, addr, sock, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Shutdown(context.Background()) })
	return addr, sock
}

// Review 18 #12: no token and an API reachable from other hosts is warned
// about; loopback, a token, or no TCP listener is not.
func TestTokenWarning(t *testing.T) {
	for _, tc := range []struct {
		token, listen string
		warn          bool
	}{
		{"", "0.0.0.0:7480", true},
		{"", "10.1.2.3:7480", true},
		{"", ":7480", true},
		{"", "127.0.0.1:7480", false},
		{"", "[::1]:7480", false},
		{"", "localhost:7480", false},
		{"", "", false},
		{"tok", "0.0.0.0:7480", false},
	} {
		w := TokenWarning(tc.token, "/etc/strata/api-tokn", "api.token_file", tc.listen)
		if (w != "") != tc.warn {
			t.Errorf("token %q listen %q: warning %q, want one: %v", tc.token, tc.listen, w, tc.warn)
		}
		if tc.warn && (!strings.Contains(w, "api.token_file /etc/strata/api-tokn is missing or empty") || !strings.Contains(w, tc.listen) || !strings.Contains(w, "401")) {
			t.Errorf("warning %q does not name the key, the file, the address and 401", w)
		}
	}
}

// TestLongResponse: a long answer (LongResponse) is not cut by the API's
// write timeout while the client keeps reading, however long it takes in
// all; a client that stops reading is cut off within the per-write stall
// limit, and the handler's write fails (it does not block for ever).
func TestLongResponse(t *testing.T) {
	defer func(a, b time.Duration) { writeTimeout, writeStall = a, b }(writeTimeout, writeStall)
	writeTimeout, writeStall = 500*time.Millisecond, 300*time.Millisecond
	chunk := make([]byte, 64<<10)
	ended := make(chan error, 2)
	mux := http.NewServeMux()
	mux.HandleFunc("/steady", func(w http.ResponseWriter, r *http.Request) {
		w = LongResponse(w)
		for i := 0; i < 20; i++ { // 2 s in all, 4 times the write timeout
			if _, err := w.Write(chunk); err != nil {
				ended <- err
				return
			}
			w.(http.Flusher).Flush()
			time.Sleep(100 * time.Millisecond)
		}
		ended <- nil
	})
	mux.HandleFunc("/stuck", func(w http.ResponseWriter, r *http.Request) {
		w = LongResponse(w)
		for {
			if _, err := w.Write(chunk); err != nil {
				ended <- err
				return
			}
		}
	})
	sock := filepath.Join(t.TempDir(), "api.sock")
	s, err := Start(mux, "", sock, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Shutdown(context.Background())
	dial := func(path string) (net.Conn, *bufio.Reader) {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: x\r\n\r\n", path)
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %v %v", path, resp, err)
		}
		return c, bufio.NewReader(resp.Body)
	}

	c, body := dial("/steady")
	n, err := io.Copy(io.Discard, body)
	c.Close()
	if err != nil || n != 20*int64(len(chunk)) {
		t.Errorf("steady reader got %d bytes (%v), want %d", n, err, 20*len(chunk))
	}
	if err := <-ended; err != nil {
		t.Errorf("steady answer: %v", err)
	}

	c, _ = dial("/stuck")
	defer c.Close()
	select {
	case err := <-ended:
		if err == nil {
			t.Error("stuck reader: the handler's writes did not fail")
		}
	case <-time.After(10 * writeStall):
		t.Errorf("a client that stopped reading still holds the handler after %s (stall limit %s)", 10*writeStall, writeStall)
	}
}
