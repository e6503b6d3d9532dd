package testenv

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// ReservePort binds a TCP socket to a free port on 127.0.0.1 without
// listening on it, for a server that a test starts later in its own
// process. Until listen is called, connections to addr are refused (as to a
// server that is down), and no other socket can take the port meanwhile:
// the socket is bound without SO_REUSEADDR, so neither bind(":0") nor an
// outgoing connection of another test picks it. (Picking a port by
// listening on ":0" and closing the listener leaves it free for anyone
// until the server binds it again: "address already in use" under load.)
// listen may be called once; the socket is closed at the end of the test
// if it never was.
func ReservePort(t testing.TB) (addr string, listen func() net.Listener) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("reserve port: socket: %v", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		unix.Close(fd)
		t.Fatalf("reserve port: bind 127.0.0.1:0: %v", err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		unix.Close(fd)
		t.Fatalf("reserve port: getsockname: %v", err)
	}
	addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(sa.(*unix.SockaddrInet4).Port))
	f := os.NewFile(uintptr(fd), "reserved "+addr)
	used := false
	t.Cleanup(func() {
		if !used {
			f.Close()
		}
	})
	return addr, func() net.Listener {
		t.Helper()
		if used {
			t.Fatalf("listen on reserved %s twice", addr)
		}
		used = true
		defer f.Close() // FileListener holds its own copy of the socket
		if err := unix.Listen(int(f.Fd()), unix.SOMAXCONN); err != nil {
			t.Fatalf("listen on reserved %s: %v", addr, err)
		}
		l, err := net.FileListener(f)
		if err != nil {
			t.Fatalf("listen on reserved %s: %v", addr, err)
		}
		return l
	}
}

// ChildPort returns a free TCP port on 127.0.0.1 for a server that another
// process (a strata child, a guest's forwarded port) binds later, when the
// test cannot hand over a reserved socket. The port is picked at random
// below the kernel's ephemeral range (net.ipv4.ip_local_port_range), so
// neither an outgoing connection nor a bind(":0") of another test can take
// it between this call and the child's bind; picking with listen(":0")
// returned a port from that range ("server exited before READY" once in ten
// runs of TestSnapshotDirOwnedByOneServer on a loaded host).
func ChildPort(t testing.TB) int {
	t.Helper()
	low := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		var lo, hi int
		if _, err := fmt.Sscan(string(b), &lo, &hi); err == nil && lo > 1024 {
			low = lo
		}
	}
	const floor = 10000
	if low <= floor+1000 {
		t.Fatalf("child port: ephemeral range starts at %d, leaving no ports below it", low)
	}
	for i := 0; i < 200; i++ {
		port := floor + rand.IntN(low-floor)
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			continue // taken: try another
		}
		l.Close()
		return port
	}
	t.Fatalf("child port: no free port in %d-%d after 200 tries", floor, low-1)
	return 0
}

// ChildAddr is ChildPort as "127.0.0.1:port".
func ChildAddr(t testing.TB) string {
	t.Helper()
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(ChildPort(t)))
}
