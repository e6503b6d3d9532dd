package api

import (
	"context"
	"net"
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
