package busypoll

import (
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/testenv"
)

// pair returns a client connection and the server side accepted through a
// busy-polling listener with the given window.
func pair(t *testing.T, window time.Duration) (*Listener, net.Conn, net.Conn) {
	t.Helper()
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := Listen(inner, window)
	t.Cleanup(func() { l.Close() })
	client, err := net.Dial("tcp", inner.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	server, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Close() })
	return l, client, server
}

func TestPingPongCounts(t *testing.T) {
	l, client, server := pair(t, DefaultWindow)
	if _, ok := server.(*Conn); !ok && l.limit >= 1 {
		t.Fatalf("accepted %T, want *busypoll.Conn", server)
	}
	done := make(chan error, 1)
	go func() { // echo server
		buf := make([]byte, 64)
		for {
			n, err := server.Read(buf)
			if err != nil {
				done <- err
				return
			}
			if _, err := server.Write(buf[:n]); err != nil {
				done <- err
				return
			}
		}
	}()
	const rounds = 2000
	msg, got := []byte("call"), make([]byte, 4)
	for i := range rounds {
		if _, err := client.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(client, got); err != nil || string(got) != "call" {
			t.Fatalf("round %d: got %q, %v", i, got, err)
		}
	}
	client.Close()
	if err := <-done; !errors.Is(err, io.EOF) {
		t.Fatalf("server Read after the client closed: %v, want io.EOF", err)
	}
	ready, caught, parked := l.Waits(Ready), l.Waits(Caught), l.Waits(Parked)
	t.Logf("%d round trips: %d reads ready, %d caught by spinning, %d parked", rounds, ready, caught, parked)
	if total := ready + caught + parked; l.limit >= 1 && total != rounds+1 {
		t.Errorf("%d reads counted, want %d (one per call and the end of file)", total, rounds+1)
	}
	if b := l.busy.Load(); b != 0 {
		t.Errorf("%d connections still counted busy after the only one ended", b)
	}
}

// A call that arrives while the reader spins is caught without parking.
// Whether the CPU is spare is the machine's business, so the test lets the
// spin go on whatever a yield took, for up to a second.
func TestSpinCatchesCall(t *testing.T) {
	l, client, server := pair(t, time.Second)
	testenv.Require(t, l.limit >= 1, "GOMAXPROCS >= 2 (with one P busypoll never spins)")
	l.yielded = time.Hour
	got := make(chan error, 1)
	go func() {
		_, err := server.Read(make([]byte, 8))
		got <- err
	}()
	for deadline := time.Now().Add(5 * time.Second); l.spinners.Load() == 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the reader never started spinning")
		}
	}
	if _, err := client.Write([]byte("call")); err != nil {
		t.Fatal(err)
	}
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	if c := l.Waits(Caught); c != 1 {
		t.Fatalf("caught = %d (ready %d, parked %d), want the call caught by the spin", c, l.Waits(Ready), l.Waits(Parked))
	}
}

func TestDeadlineStillApplies(t *testing.T) {
	_, _, server := pair(t, DefaultWindow)
	server.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	start := time.Now()
	_, err := server.Read(make([]byte, 8))
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read past its deadline: %v, want os.ErrDeadlineExceeded", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("Read returned %v after a 50ms deadline", d)
	}
}

func TestCloseWakesReaderAndReleasesBusy(t *testing.T) {
	l, client, server := pair(t, DefaultWindow)
	if _, err := client.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := server.Read(make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	if b := l.busy.Load(); b != 1 && l.limit >= 1 {
		t.Fatalf("busy = %d after a Read returned data, want 1", b)
	}
	errc := make(chan error, 1)
	go func() {
		_, err := server.Read(make([]byte, 1)) // parks: the client sends nothing more
		errc <- err
	}()
	time.Sleep(20 * time.Millisecond)
	server.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Read on a closed connection: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not wake the parked Read")
	}
	if b := l.busy.Load(); b != 0 {
		t.Fatalf("busy = %d after Close, want 0", b)
	}
}

func TestDisabled(t *testing.T) {
	_, client, server := pair(t, -1)
	if _, ok := server.(*net.TCPConn); !ok {
		t.Fatalf("window -1 accepted %T, want the plain *net.TCPConn", server)
	}
	client.Write([]byte("ok"))
	buf := make([]byte, 2)
	if _, err := io.ReadFull(server, buf); err != nil || string(buf) != "ok" {
		t.Fatalf("read %q, %v", buf, err)
	}
}
