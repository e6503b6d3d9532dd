package testenv

import (
	"errors"
	"net"
	"syscall"
	"testing"
)

// A reserved port refuses connections until listen, cannot be bound by
// anyone else meanwhile (net.Listen sets SO_REUSEADDR, which a bound but
// not listening socket would otherwise let through), and then serves.
func TestReservePort(t *testing.T) {
	addr, listen := ReservePort(t)
	if _, err := net.Dial("tcp", addr); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial %s before listen: %v, want connection refused", addr, err)
	}
	if l, err := net.Listen("tcp", addr); err == nil {
		l.Close()
		t.Fatalf("another listener bound the reserved %s", addr)
	} else if !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("listen on reserved %s: %v, want address in use", addr, err)
	}
	l := listen()
	defer l.Close()
	if l.Addr().String() != addr {
		t.Fatalf("listener on %s, reserved %s", l.Addr(), addr)
	}
	go func() {
		if c, err := l.Accept(); err == nil {
			c.Write([]byte("x"))
			c.Close()
		}
	}()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial %s after listen: %v", addr, err)
	}
	defer c.Close()
	b := make([]byte, 1)
	if _, err := c.Read(b); err != nil || b[0] != 'x' {
		t.Fatalf("read from %s: %q %v", addr, b, err)
	}
}
