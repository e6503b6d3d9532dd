package xdr

import (
	"errors"
	"testing"
)

func TestDecoderBounds(t *testing.T) {
	b := []byte{0, 0, 0, 5, 'h', 'e', 'l', 'l', 'o', 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2}
	d := NewDecoder(b)
	if v := d.Opaque(8, "name"); string(v) != "hello" || d.Off != 12 {
		t.Fatalf("Opaque = %q at %d", v, d.Off)
	}
	if v := d.U64(); v != 1<<32|2 || d.Err != nil || d.Left() != 0 {
		t.Fatalf("U64 = %x, %v, %d left", v, d.Err, d.Left())
	}
	if v := d.U32(); v != 0 || d.Err == nil {
		t.Fatalf("read past the end: %d, %v", v, d.Err)
	}
	// Once failed, everything reads zero.
	d = NewDecoder([]byte{0, 0, 0, 9, 1, 2})
	if v := d.Opaque(100, "data"); v != nil || d.Err == nil {
		t.Fatal("opaque longer than the input accepted")
	}
	var e *Error
	if !errors.As(d.Err, &e) || e.Need != 12 || e.Left != 2 {
		t.Fatalf("error %v", d.Err)
	}
	// A declared length over the maximum fails before any allocation.
	d = NewDecoder([]byte{0x7f, 0xff, 0xff, 0xf0})
	if v := d.Opaque(400, "credential"); v != nil || !errors.As(d.Err, &e) || e.Max != 400 || e.Len != 0x7ffffff0 {
		t.Fatalf("huge opaque: %v %v", v, d.Err)
	}
	// Without padding, the next read starts right after the data.
	d = NewDecoder([]byte{0, 0, 0, 1, 'x', 0, 0, 0, 7})
	d.OpaqueNoPad(4, "handle")
	if d.Off != 5 {
		t.Fatalf("OpaqueNoPad left offset %d, want 5", d.Off)
	}
	d.Fail(errors.New("custom"))
	if d.Err.Error() != "custom" {
		t.Fatal("Fail did not record")
	}
}
