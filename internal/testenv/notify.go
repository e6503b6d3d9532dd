package testenv

import (
	"net"
	"path/filepath"
	"testing"
)

// NotifySocket listens on a real unixgram socket, as systemd does for a
// Type=notify service, and returns its path (for NOTIFY_SOCKET) and the
// datagrams (sd_notify messages) received, until the test ends.
func NotifySocket(t testing.TB) (path string, msgs <-chan string) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "notify.sock")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ch := make(chan string, 1024)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			ch <- string(buf[:n])
		}
	}()
	return path, ch
}
