package api

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"
)

// A stream reads to io.EOF only when every byte arrived and matches the
// sender's trailers; a broken connection, a missing or a wrong trailer is an
// error.
func TestStreamChecksTrailer(t *testing.T) {
	data := strings.Repeat("stream-bytes ", 10000)
	sum := sha256.Sum256([]byte(data))
	for _, tc := range []struct {
		name    string
		handler func(w http.ResponseWriter)
		wantErr string
	}{
		{"whole", func(w http.ResponseWriter) {
			w.Header().Set("Trailer", TrailerStreamBytes+", "+TrailerStreamSHA256)
			io.WriteString(w, data)
			w.Header().Set(TrailerStreamBytes, strconv.Itoa(len(data)))
			w.Header().Set(TrailerStreamSHA256, hex.EncodeToString(sum[:]))
		}, ""},
		{"aborted", func(w http.ResponseWriter) {
			io.WriteString(w, data[:len(data)/2])
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		}, "unexpected EOF"},
		{"no trailer", func(w http.ResponseWriter) { io.WriteString(w, data) }, "without the sender's trailer"},
		{"wrong sum", func(w http.ResponseWriter) {
			w.Header().Set("Trailer", TrailerStreamBytes+", "+TrailerStreamSHA256)
			io.WriteString(w, data)
			w.Header().Set(TrailerStreamBytes, strconv.Itoa(len(data)))
			w.Header().Set(TrailerStreamSHA256, strings.Repeat("0", 64))
		}, "the sender sent"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path != "/v1/generations/3/stream" || r.URL.Query().Get("from") != "2" || r.Header.Get("Authorization") != "Bearer tok" {
					http.Error(w, "bad request "+r.URL.String(), 400)
					return
				}
				tc.handler(w)
			}))
			defer ts.Close()
			st, err := NewClient(ts.URL, "tok").Stream(context.Background(), StreamRequest{ID: 3, From: 2})
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			b, err := io.ReadAll(st)
			if tc.wantErr == "" {
				if err != nil || string(b) != data || st.Bytes() != int64(len(data)) {
					t.Fatalf("read %d bytes, err %v", len(b), err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
		})
	}
}

// A sender that stays connected but stops sending ends the stream with
// ErrStreamStalled after Stall, whether it stops before its headers or in
// the middle of the body; a slow sender that keeps sending does not.
func TestStreamStall(t *testing.T) {
	data := strings.Repeat("x", 64<<10)
	for _, tc := range []struct {
		name    string
		handler func(w http.ResponseWriter, r *http.Request)
		stalled bool
	}{
		{"mid-stream", func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, data)
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		}, true},
		{"before headers", func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }, true},
		{"slow but sending", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Trailer", TrailerStreamBytes+", "+TrailerStreamSHA256)
			h := sha256.New()
			for i := 0; i < 10; i++ {
				io.WriteString(w, "chunk")
				h.Write([]byte("chunk"))
				w.(http.Flusher).Flush()
				time.Sleep(100 * time.Millisecond)
			}
			w.Header().Set(TrailerStreamBytes, "50")
			w.Header().Set(TrailerStreamSHA256, hex.EncodeToString(h.Sum(nil)))
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := httptest.NewServer(http.HandlerFunc(tc.handler))
			defer ts.Close()
			done := make(chan error, 1)
			go func() {
				st, err := NewClient(ts.URL, "").Stream(context.Background(), StreamRequest{ID: 1, Stall: 300 * time.Millisecond})
				if err == nil {
					_, err = io.Copy(io.Discard, st)
					st.Close()
				}
				done <- err
			}()
			select {
			case err := <-done:
				if tc.stalled != errors.Is(err, ErrStreamStalled) {
					t.Fatalf("stream: %v, want stalled %v", err, tc.stalled)
				}
				if !tc.stalled && err != nil {
					t.Fatalf("slow stream: %v", err)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("the stream still waits for a sender that stopped sending")
			}
		})
	}
}
