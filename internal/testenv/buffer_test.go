package testenv

import (
	"io"
	"strings"
	"testing"
	"testing/iotest"
)

// CountingReader counts every byte read through it, in short reads and
// up to EOF, and passes the bytes on unchanged.
func TestCountingReader(t *testing.T) {
	text := strings.Repeat("0123456789", 1000)
	r := &CountingReader{R: iotest.HalfReader(strings.NewReader(text))}
	b := make([]byte, 7)
	n, err := io.ReadFull(r, b)
	if n != 7 || err != nil || r.N != 7 {
		t.Fatalf("after reading 7 bytes: read %d, %v, counted %d", n, err, r.N)
	}
	rest, err := io.ReadAll(r)
	if err != nil || string(b)+string(rest) != text {
		t.Fatalf("read %d bytes, %v: not the text", 7+len(rest), err)
	}
	if r.N != int64(len(text)) {
		t.Fatalf("counted %d bytes, read %d", r.N, len(text))
	}
}
