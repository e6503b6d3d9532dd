package testenv

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
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

// A child port is free and below the ephemeral range, where no outgoing
// connection's local port can land.
func TestChildPort(t *testing.T) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		t.Fatal(err)
	}
	var lo, hi int
	if _, err := fmt.Sscan(string(b), &lo, &hi); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		p := ChildPort(t)
		if p >= lo || p < 10000 {
			t.Fatalf("child port %d, want 10000 <= port < %d", p, lo)
		}
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
		if err != nil {
			t.Fatalf("child port %d not free: %v", p, err)
		}
		l.Close()
	}
}
