package nfs

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var testKey = bytes.Repeat([]byte{7}, keyLen)

func TestSealRoundTripAndSizes(t *testing.T) {
	for klen := 1; klen <= maxKernelHandle; klen++ {
		kh := make([]byte, klen)
		for i := range kh {
			kh[i] = byte(i*31 + klen)
		}
		h, err := seal(testKey, 42, 0x4d, kh)
		if err != nil {
			t.Fatalf("klen %d: %v", klen, err)
		}
		if len(h)%4 != 0 || len(h) > 64 {
			t.Fatalf("klen %d: handle of %d bytes (want a multiple of 4, at most 64)", klen, len(h))
		}
		s, err := unseal(testKey, h)
		if err != nil {
			t.Fatalf("klen %d: unseal: %v", klen, err)
		}
		if s.gen != 42 || s.ktype != 0x4d || !bytes.Equal(s.kh, kh) {
			t.Fatalf("klen %d: unsealed %+v", klen, s)
		}
	}
	// btrfs handles are 20 bytes: 36-byte NFS handles.
	h, _ := seal(testKey, 1, 0x4d, make([]byte, 20))
	if len(h) != 44 {
		t.Errorf("20-byte kernel handle sealed to %d bytes, want 44", len(h))
	}
}

func TestSealRejectsOversize(t *testing.T) {
	if _, err := seal(testKey, 1, 1, make([]byte, maxKernelHandle+1)); err == nil {
		t.Error("sealed a kernel handle that cannot fit 64 bytes")
	}
	if _, err := seal(testKey, 1, 1, nil); err == nil {
		t.Error("sealed an empty kernel handle")
	}
	if _, err := seal(testKey, 1, 0x100, []byte{1}); err == nil {
		t.Error("sealed a handle type that does not fit a byte")
	}
}

func TestUnsealRejectsForgery(t *testing.T) {
	kh := []byte{1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0}
	good, err := seal(testKey, 5, 0x4d, kh)
	if err != nil {
		t.Fatal(err)
	}
	mutate := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	cases := map[string][]byte{
		"empty":             nil,
		"every bit flipped": mutate(func(b []byte) []byte { return b }), // replaced below
		"other generation":  mutate(func(b []byte) []byte { b[11] = 6; return b }),
		"other inode":       mutate(func(b []byte) []byte { b[12] = 2; return b }),
		"other type":        mutate(func(b []byte) []byte { b[1] = 0x4e; return b }),
		"other version":     mutate(func(b []byte) []byte { b[0] = 2; return b }),
		"reserved set":      mutate(func(b []byte) []byte { b[3] = 1; return b }),
		"length lies":       mutate(func(b []byte) []byte { b[2] = 16; return b }),
		"mac flipped":       mutate(func(b []byte) []byte { b[len(b)-1] ^= 1; return b }),
		"truncated by 4":    good[:len(good)-4],
		"truncated by 1":    good[:len(good)-1],
		"not multiple of 4": append(append([]byte(nil), good...), 0),
		"extended by 4":     append(append([]byte(nil), good...), 0, 0, 0, 0),
		"too long":          make([]byte, 68),
		"all zero":          make([]byte, len(good)),
	}
	delete(cases, "every bit flipped")
	for i := range good {
		for bit := 0; bit < 8; bit++ {
			b := append([]byte(nil), good...)
			b[i] ^= 1 << bit
			if _, err := unseal(testKey, b); err == nil {
				t.Fatalf("byte %d bit %d flipped: handle still unseals", i, bit)
			}
		}
	}
	for name, b := range cases {
		if _, err := unseal(testKey, b); err == nil {
			t.Errorf("%s: forged handle unsealed", name)
		}
	}
	if _, err := unseal(bytes.Repeat([]byte{8}, keyLen), good); err == nil {
		t.Error("handle unsealed under another key")
	}
	// Nonzero padding with a recomputed MAC is still refused (one canonical form).
	kh18 := make([]byte, 18)
	h, _ := seal(testKey, 5, 0x4d, kh18)
	h[handleHeader+18] = 1
	k := len(h) - macLen
	copy(h[k:], mac(testKey, h[:k]))
	if _, err := unseal(testKey, h); err == nil {
		t.Error("handle with nonzero padding unsealed")
	}
}

func TestBtrfsSubvolOwnership(t *testing.T) {
	kh := make([]byte, 20)
	kh[0] = 0x01
	kh[8] = 0x07 // root objectid 263 (0x107)
	kh[9] = 0x01
	g := &gen{id: 3, subvol: 263}
	if !g.owns(sealed{gen: 3, ktype: 0x4d, kh: kh}) {
		t.Error("handle of the generation's own subvolume refused")
	}
	other := append([]byte(nil), kh...)
	other[8] = 0x08
	if g.owns(sealed{gen: 3, ktype: 0x4d, kh: other}) {
		t.Error("handle of another subvolume accepted")
	}
	if g.owns(sealed{gen: 4, ktype: 0x4d, kh: kh}) {
		t.Error("handle of another generation accepted")
	}
	if g.owns(sealed{gen: 3, ktype: 1, kh: kh}) {
		t.Error("non-btrfs handle accepted for a btrfs generation")
	}
}

func TestKeyCreatedOnceAndReused(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	k1, err := loadKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, keyFileName))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("key file mode %v, want 0600", fi.Mode().Perm())
	}
	k2, err := loadKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(k1, k2) || len(k1) != keyLen {
		t.Error("second start did not reuse the key")
	}
	// A key others can read is refused, naming the file and the fix.
	kf := filepath.Join(dir, keyFileName)
	os.Chmod(kf, 0o644)
	if _, err := loadKey(dir); err == nil || !strings.Contains(err.Error(), kf) || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("mode 0644 key: %v, want a refusal naming %s and chmod 600", err, kf)
	}
	os.Chmod(kf, 0o600)
	left, _ := filepath.Glob(filepath.Join(dir, "*.tmp-*"))
	if len(left) != 0 {
		t.Errorf("temp files left behind: %v", left)
	}
	if err := os.WriteFile(filepath.Join(dir, keyFileName), []byte("short"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := loadKey(dir); err == nil {
		t.Error("a damaged key file was accepted")
	}
}
