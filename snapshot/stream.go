package snapshot

import (
	"context"
	"io"
)

// Streamer moves generations between hosts: a primary server sends a
// generation's snapshot as a byte stream, a replica server receives it and
// gets the same files under the same generation id. The stream format is the
// filesystem's own (btrfs send, zfs send), so both ends must be of the same
// Kind.
//
// A received snapshot is a generation like any other: List shows it, Destroy
// removes it, its Path is read-only. Only a receive that finished in full
// makes one: an interrupted or failed receive leaves no strata-N behind (a
// Resumer may keep hidden partial state for ResumeReceive).
type Streamer interface {
	// Send writes generation id's snapshot to w as a stream. With from 0
	// the stream is whole; otherwise it is incremental against generation
	// from's snapshot (it carries only the changes and needs from on the
	// receiving side). A missing id or from fails with ErrNotFound.
	Send(ctx context.Context, w io.Writer, id, from uint64) error
	// Receive reads a stream that Send made on another host and makes it
	// generation id here. from names the incremental stream's base, which
	// must exist here (ErrNotFound otherwise); 0 for a whole stream. It
	// fails with ErrExists if generation id exists, and refuses a stream
	// that does not carry generation id's snapshot.
	Receive(ctx context.Context, r io.Reader, id, from uint64) (Snapshot, error)
}

// Resumer is a Streamer whose interrupted receives can continue where they
// stopped instead of starting again (ZFS receive resume tokens).
type Resumer interface {
	Streamer
	// ResumeToken returns the token of an interrupted receive kept here,
	// or "" when there is none.
	ResumeToken(ctx context.Context) (string, error)
	// SendResume writes the rest of the stream an interrupted receive on
	// another host stopped in, given that receive's token. It refuses a
	// token that names a snapshot outside this backend's store.
	SendResume(ctx context.Context, w io.Writer, token string) error
	// ResumeReceive reads a stream that SendResume made and finishes
	// generation id with it.
	ResumeReceive(ctx context.Context, r io.Reader, id uint64) (Snapshot, error)
	// AbortReceive discards an interrupted receive's partial state (none
	// is fine).
	AbortReceive(ctx context.Context) error
}
