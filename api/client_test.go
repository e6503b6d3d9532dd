package api

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
)

// An address that answers without HTTP (the NFS port given for the API's:
// a new user's replica.of said only "EOF") gets a hint saying so; an
// address where nothing listens does not.
func TestNoHTTPAnswerHint(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			// As an RPC server: read the request, answer with a record
			// mark, then nothing. (Bytes sent before the request is read
			// can fail it otherwise in net/http, as readLoopPeekFailLocked.)
			c.Read(make([]byte, 512))
			c.Write([]byte{0x80, 0, 0, 0x1c})
			c.Close()
		}
	}()
	_, err = NewClient(l.Addr().String(), "").Generations(context.Background())
	if err == nil || !strings.Contains(err.Error(), "no HTTP answer: is this the strata API's address") {
		t.Errorf("an address that closes without HTTP: %v, want the hint", err)
	}
	free, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := free.Addr().String()
	free.Close()
	_, err = NewClient(addr, "").Generations(context.Background())
	if err == nil || strings.Contains(err.Error(), "no HTTP answer") {
		t.Errorf("nothing listening: %v, want an error without the hint", err)
	}
}

// A new-user test: `strata pin 2` (no --name) sent ".../pin?name=", which
// error messages showed. A pin without a name sends no name parameter; a
// name is sent escaped.
func TestPinQuery(t *testing.T) {
	var got []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = append(got, r.URL.RequestURI())
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"id": 2}`))
	}))
	defer srv.Close()
	c := NewClient(srv.URL, "")
	for _, name := range []string{"", "keep me"} {
		if _, err := c.Pin(context.Background(), 2, name); err != nil {
			t.Fatal(err)
		}
	}
	want := []string{"/v1/generations/2/pin", "/v1/generations/2/pin?name=keep+me"}
	if !slices.Equal(got, want) {
		t.Errorf("pin requests %q, want %q", got, want)
	}
}
