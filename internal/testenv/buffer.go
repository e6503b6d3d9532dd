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
