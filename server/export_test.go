package server

import (
	"context"
	"log/slog"
	"net"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// An nfs.listen that cannot be bound is an error naming the key and the
// address (a new-user test found "listen nfs ADDR").
func TestOpenExportNamesBadAddress(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	addr := l.Addr().String()
	cfg := Config{StateDir: t.TempDir(), NFSListen: addr}
	ex, err := openExport(context.Background(), cfg, slog.New(slog.DiscardHandler), prometheus.NewRegistry())
	if err == nil {
		ex.close()
		t.Fatal("openExport on an address in use: no error")
	}
	if !strings.Contains(err.Error(), "bind nfs.listen "+addr+": ") || !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("err = %v, want one naming nfs.listen, the address and the cause", err)
	}
}
