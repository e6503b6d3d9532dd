package testenv

import (
	"bytes"
	"io"
	"sync"
)

// Buffer collects what a logger or a child process writes, for a test to
// poll: Write and String may be called from any goroutine. Tee, when set,
// gets every write as well (os.Stderr: the test's output shows it).
type Buffer struct {
	Tee io.Writer

	mu sync.Mutex
	b  bytes.Buffer
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.Tee != nil {
		b.Tee.Write(p)
	}
	return b.b.Write(p)
}

// String returns everything written so far.
func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// CountingReader passes R's bytes on and counts them in N: how much a
// reader under test took (a DB install that must stop at the size it was
// told, a send stream's size). Read N once reading is done.
type CountingReader struct {
	R io.Reader
	N int64
}

func (c *CountingReader) Read(p []byte) (int, error) {
	n, err := c.R.Read(p)
	c.N += int64(n)
	return n, err
}
