// Package xdr is strata's one XDR decoder (RFC 4506), shared by everything
// that reads ONC RPC bytes: the NFS guard's record check, the export's fast
// path and reply metrics, and the test client (internal/nfsraw).
//
// It is bounded: every read is checked against the bytes that are there,
// every variable-length item against a maximum the caller gives, and
// nothing is allocated from a length on the wire (opaque data is returned
// as a view into the input). The first failure is kept in Err and makes
// every later read return zero values, so a caller decodes a whole
// structure and checks Err once.
package xdr

import (
	"encoding/binary"
	"fmt"
)

// Decoder reads XDR from a byte slice.
type Decoder struct {
	// B holds the bytes not read yet.
	B []byte
	// Off is how many bytes have been read.
	Off int
	// Err is the first failure (*Error, or what Fail was given).
	Err error
}

// NewDecoder reads b.
func NewDecoder(b []byte) *Decoder { return &Decoder{B: b} }

// Error is a decoding failure: an item runs past the input, or is longer
// than its maximum.
type Error struct {
	What string // what was being read
	Off  int    // where it started
	// Need is how many bytes it needed and Left how many there were; or,
	// when Max > 0, Len is the length it declared and Max its bound.
	Need, Left int
	Len, Max   int
}

func (e *Error) Error() string {
	if e.Max > 0 {
		return fmt.Sprintf("%s of %d bytes exceeds %d", e.What, e.Len, e.Max)
	}
	return fmt.Sprintf("%s needs %d bytes at offset %d, %d left", e.What, e.Need, e.Off, e.Left)
}

// Fail records err as the decoder's failure unless there already is one.
func (d *Decoder) Fail(err error) {
	if d.Err == nil {
		d.Err = err
	}
}

// Left is the number of bytes not read yet.
func (d *Decoder) Left() int { return len(d.B) }

// need checks that n bytes are there.
func (d *Decoder) need(n int, what string) bool {
	if d.Err != nil {
		return false
	}
	if n < 0 || n > len(d.B) {
		d.Err = &Error{What: what, Off: d.Off, Need: n, Left: len(d.B)}
		return false
	}
	return true
}

func (d *Decoder) advance(n int) {
	d.B = d.B[n:]
	d.Off += n
}

// U32 reads an unsigned int.
func (d *Decoder) U32() uint32 {
	if !d.need(4, "uint32") {
		return 0
	}
	v := binary.BigEndian.Uint32(d.B)
	d.advance(4)
	return v
}

// U64 reads an unsigned hyper.
func (d *Decoder) U64() uint64 {
	if !d.need(8, "uint64") {
		return 0
	}
	v := binary.BigEndian.Uint64(d.B)
	d.advance(8)
	return v
}

// Skip reads n bytes and drops them.
func (d *Decoder) Skip(n int, what string) {
	if d.need(n, what) {
		d.advance(n)
	}
}

// Fixed reads n bytes (a fixed-length opaque without padding), as a view.
func (d *Decoder) Fixed(n int, what string) []byte {
	if !d.need(n, what) {
		return nil
	}
	v := d.B[:n:n]
	d.advance(n)
	return v
}

// Opaque reads variable-length opaque data of at most max bytes and its
// padding to a multiple of 4, and returns a view of the data.
func (d *Decoder) Opaque(max int, what string) []byte { return d.opaque(max, true, what) }

// OpaqueNoPad is Opaque without consuming the padding: go-nfs reads some
// file handles that way (xdr.ReadOpaque), and the guard must walk a call
// exactly as go-nfs will.
func (d *Decoder) OpaqueNoPad(max int, what string) []byte { return d.opaque(max, false, what) }

func (d *Decoder) opaque(max int, pad bool, what string) []byte {
	off := d.Off
	n := d.U32()
	if d.Err != nil {
		return nil
	}
	if int64(n) > int64(max) {
		d.Err = &Error{What: what, Off: off, Len: int(n), Max: max}
		return nil
	}
	l := int(n)
	if pad {
		l = (l + 3) &^ 3
	}
	if !d.need(l, what) {
		return nil
	}
	v := d.B[:n:n]
	d.advance(l)
	return v
}

// Pad4 rounds n up to a multiple of 4.
func Pad4(n int) int { return (n + 3) &^ 3 }
