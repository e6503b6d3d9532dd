package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/zstd"
)

// Client calls a strata daemon's HTTP API over TCP or a unix socket.
type Client struct {
	base  string
	token atomic.Pointer[string]
	hc    *http.Client
}

// NewClient returns a client for addr: "host:port", "http://host:port" or
// "unix:/path/to/api.sock". token is sent as a bearer token when non-empty.
func NewClient(addr, token string) *Client {
	c := &Client{hc: &http.Client{Timeout: 10 * time.Minute}}
	c.token.Store(&token)
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		c.base = "http://unix"
		c.hc.Transport = &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}}
		return c
	}
	if !strings.Contains(addr, "://") {
		addr = "http://" + addr
	}
	c.base = strings.TrimRight(addr, "/")
	return c
}

// SetToken replaces the bearer token of the requests sent from now on (a
// replica's replica.token_file re-read on SIGHUP); requests already sent
// keep theirs.
func (c *Client) SetToken(token string) { c.token.Store(&token) }

// authorize adds the bearer token, if any, to req.
func (c *Client) authorize(req *http.Request) {
	if t := *c.token.Load(); t != "" {
		req.Header.Set("Authorization", "Bearer "+t)
	}
}

// Do sends a request and decodes a JSON answer into out (nil: discard). A
// non-2xx answer is an error carrying the server's message.
func (c *Client) Do(ctx context.Context, method, path string, out any) error {
	body, err := c.raw(ctx, method, path)
	if err != nil {
		return err
	}
	defer body.Close()
	if out == nil {
		_, err = io.Copy(io.Discard, body)
		return err
	}
	if err := json.NewDecoder(body).Decode(out); err != nil {
		return fmt.Errorf("%s %s: decode answer: %w", method, path, err)
	}
	return nil
}

func (c *Client) raw(ctx context.Context, method, path string) (io.ReadCloser, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, nil)
	if err != nil {
		return nil, err
	}
	c.authorize(req)
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w%s", method, path, err, noHTTP(err))
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return nil, newStatusError(method, path, resp, b)
	}
	return resp.Body, nil
}

// noHTTP is a hint for a request that the address answered by closing the
// connection, or with what is not HTTP: an address of something else, such
// as the NFS port given for the API's (replica.of, server.api, --api).
func noHTTP(err error) string {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || strings.Contains(err.Error(), "malformed HTTP response") {
		return " (no HTTP answer: is this the strata API's address, not the NFS port?)"
	}
	return ""
}

// StatusError is a non-2xx answer.
type StatusError struct {
	Method, Path string
	// Code is the HTTP status code, Status its text.
	Code   int
	Status string
	// Message is the server's error message, or the body's start.
	Message string
	// JSON reports whether Message came from an Error body.
	JSON bool
}

func (e *StatusError) Error() string {
	if e.JSON {
		return fmt.Sprintf("%s %s: %s (%s)", e.Method, e.Path, e.Message, e.Status)
	}
	return fmt.Sprintf("%s %s: %s: %s", e.Method, e.Path, e.Status, e.Message)
}

func newStatusError(method, path string, resp *http.Response, b []byte) *StatusError {
	e := &StatusError{Method: method, Path: path, Code: resp.StatusCode, Status: resp.Status}
	var body Error
	if json.Unmarshal(b, &body) == nil && body.Error != "" {
		e.Message, e.JSON = body.Error, true
	} else {
		e.Message = strings.TrimSpace(string(b))
	}
	return e
}

// Generations lists the live generations.
func (c *Client) Generations(ctx context.Context) (GenerationList, error) {
	var l GenerationList
	return l, c.Do(ctx, http.MethodGet, "/v1/generations", &l)
}

// NFSAccess asks whether the server's NFS export admits this client.
func (c *Client) NFSAccess(ctx context.Context) (NFSAccess, error) {
	var a NFSAccess
	return a, c.Do(ctx, http.MethodGet, "/v1/nfs/access", &a)
}

// Generation returns generation id's manifest.
func (c *Client) Generation(ctx context.Context, id uint64) (Generation, error) {
	var g Generation
	return g, c.Do(ctx, http.MethodGet, "/v1/generations/"+strconv.FormatUint(id, 10), &g)
}

// Registration returns generation id's full registration text.
func (c *Client) Registration(ctx context.Context, id uint64) ([]byte, error) {
	body, err := c.raw(ctx, http.MethodGet, "/v1/generations/"+strconv.FormatUint(id, 10)+"/registration")
	if err != nil {
		return nil, err
	}
	defer body.Close()
	return io.ReadAll(body)
}

// Paths returns generation id's path rows (a nixstore rows file), or with
// from > 0 only the rows added or changed since generation from. The
// caller closes the body.
func (c *Client) Paths(ctx context.Context, id, from uint64) (io.ReadCloser, error) {
	path := "/v1/generations/" + strconv.FormatUint(id, 10) + "/paths"
	if from > 0 {
		path += "?from=" + strconv.FormatUint(from, 10)
	}
	return c.raw(ctx, http.MethodGet, path)
}

// NixDB returns generation id's Nix DB, decompressed as it is read, and
// what the server says it is (its headers). The caller checks the bytes
// against it (nixstore.InstallDB does) and closes the body.
func (c *Client) NixDB(ctx context.Context, id uint64) (io.ReadCloser, NixDB, error) {
	path := "/v1/generations/" + strconv.FormatUint(id, 10) + "/nixdb"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+path, nil)
	if err != nil {
		return nil, NixDB{}, err
	}
	c.authorize(req)
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, NixDB{}, fmt.Errorf("GET %s: %w", path, err)
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return nil, NixDB{}, newStatusError(http.MethodGet, path, resp, b)
	}
	h := resp.Header
	d := NixDB{SHA256: h.Get(HeaderNixDBSHA256), Root: h.Get(HeaderNixDBRoot), Compressed: resp.ContentLength}
	var errs []string
	for name, dst := range map[string]any{HeaderNixDBSize: &d.Size, HeaderNixDBPaths: &d.Paths, HeaderNixDBSchema: &d.Schema} {
		if _, err := fmt.Sscan(h.Get(name), dst); err != nil {
			errs = append(errs, fmt.Sprintf("header %s: %q", name, h.Get(name)))
		}
	}
	if ct := h.Get("Content-Type"); ct != NixDBContentType {
		errs = append(errs, fmt.Sprintf("content type %q, want %s", ct, NixDBContentType))
	}
	if len(errs) > 0 || d.SHA256 == "" || d.Root == "" {
		resp.Body.Close()
		return nil, NixDB{}, fmt.Errorf("GET %s: not a generation DB answer: %s", path, strings.Join(errs, "; "))
	}
	zr, err := zstd.NewReader(resp.Body, zstd.WithDecoderConcurrency(1))
	if err != nil {
		resp.Body.Close()
		return nil, NixDB{}, fmt.Errorf("GET %s: %w", path, err)
	}
	return zstdBody{zr, resp.Body}, d, nil
}

// zstdBody is a decompressed HTTP body.
type zstdBody struct {
	*zstd.Decoder
	body io.ReadCloser
}

func (z zstdBody) Close() error {
	z.Decoder.Close()
	return z.body.Close()
}

// Delta returns what changed from generation from to generation to.
func (c *Client) Delta(ctx context.Context, from, to uint64) (Delta, error) {
	var d Delta
	return d, c.Do(ctx, http.MethodGet, fmt.Sprintf("/v1/generations/%d/delta?from=%d", to, from), &d)
}

// CheckToken asks whether the server accepts this client's token for
// mutating calls and streams (GET /v1/token): nil if it does, a
// *StatusError with Code 401 if not (404 from a server older than the call).
func (c *Client) CheckToken(ctx context.Context) error {
	return c.Do(ctx, http.MethodGet, "/v1/token", nil)
}

// Publish asks the server to publish a generation now.
func (c *Client) Publish(ctx context.Context) (PublishResult, error) {
	var r PublishResult
	return r, c.Do(ctx, http.MethodPost, "/v1/publish", &r)
}

// Pin protects generation id from retention. Without a name it sends no
// name parameter (the server keeps the name of a pin the generation has).
func (c *Client) Pin(ctx context.Context, id uint64, name string) (Generation, error) {
	var g Generation
	path := fmt.Sprintf("/v1/generations/%d/pin", id)
	if name != "" {
		path += "?name=" + url.QueryEscape(name)
	}
	return g, c.Do(ctx, http.MethodPost, path, &g)
}

// Unpin removes generation id's pin.
func (c *Client) Unpin(ctx context.Context, id uint64) (Generation, error) {
	var g Generation
	return g, c.Do(ctx, http.MethodDelete, fmt.Sprintf("/v1/generations/%d/pin", id), &g)
}

// Status returns the daemon's status document.
func (c *Client) Status(ctx context.Context) (map[string]any, error) {
	var m map[string]any
	return m, c.Do(ctx, http.MethodGet, "/v1/status", &m)
}

// Send sends in as a JSON body and decodes a JSON answer into out (nil:
// discard), like Do. Secrets travel in bodies, never in URLs.
func (c *Client) Send(ctx context.Context, method, path string, in, out any) error {
	b, err := json.Marshal(in)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, bytes.NewReader(b))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	c.authorize(req)
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if resp.StatusCode/100 != 2 {
		var e Error
		if json.Unmarshal(body, &e) == nil && e.Error != "" {
			return fmt.Errorf("%s %s: %s (%s)", method, path, e.Error, resp.Status)
		}
		return fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, strings.TrimSpace(string(body)))
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("%s %s: decode answer: %w", method, path, err)
	}
	return nil
}

// Forget drops the manifest of generation id, whose snapshot is missing;
// confirm must repeat id.
func (c *Client) Forget(ctx context.Context, id, confirm uint64) error {
	return c.Do(ctx, http.MethodDelete, fmt.Sprintf("/v1/generations/%d?confirm=%d", id, confirm), nil)
}

// CheckBaseURL checks a daemon's API URL as a configuration key gives it
// (a builder's server.api and server.prefer, a replica's replica.of): http
// or https, a host, and optionally a path prefix in front of /v1/... (a
// reverse proxy); no user, query or fragment. The API's own /v1 is refused:
// every call adds it, so http://srv:7480/v1 would call /v1/v1/....
// example is a good URL for the message.
func CheckBaseURL(s, example string) error {
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return fmt.Errorf("want an http:// API URL such as %s (or with a path prefix, http://proxy/prefix), without user, query or fragment", example)
	}
	if p := strings.TrimRight(u.Path, "/"); p == "/v1" || strings.HasSuffix(p, "/v1") || strings.Contains(p, "/v1/") {
		return fmt.Errorf("want the API URL without the API's own /v1 path, such as %s: drop the /v1 (every call adds it)", example)
	}
	return nil
}
