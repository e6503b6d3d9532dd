package nixstore

import (
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strings"
)

// NormalizeSHA256 turns a SHA-256 hash as Nix stores or prints it into the
// registration's form, 64 lowercase hex digits. It accepts an optional
// "sha256:" prefix followed by base16 (64 digits), Nix's base-32 (52
// characters) or base64 (44 characters), and SRI "sha256-<base64>".
func NormalizeSHA256(s string) (string, error) {
	rest, ok := strings.CutPrefix(s, "sha256:")
	if !ok {
		if sri, isSRI := strings.CutPrefix(s, "sha256-"); isSRI {
			return fromBase64(s, sri)
		}
		if i := strings.IndexByte(s, ':'); i >= 0 {
			return "", fmt.Errorf("hash %q: algorithm %q is not sha256", clip(s), s[:i])
		}
	}
	switch len(rest) {
	case 64:
		if isBase16SHA256(rest) {
			return rest, nil
		}
		if b, err := hex.DecodeString(rest); err == nil {
			return hex.EncodeToString(b), nil // upper-case hex
		}
		return "", fmt.Errorf("hash %q: bad base16", clip(s))
	case 52:
		b, err := decodeNix32(rest, 32)
		if err != nil {
			return "", fmt.Errorf("hash %q: %w", clip(s), err)
		}
		return hex.EncodeToString(b), nil
	case 44:
		return fromBase64(s, rest)
	default:
		return "", fmt.Errorf("hash %q: length %d fits no sha256 encoding (64 base16, 52 base-32, 44 base64)", clip(s), len(rest))
	}
}

func fromBase64(s, b64 string) (string, error) {
	b, err := base64.StdEncoding.Strict().DecodeString(b64)
	if err != nil || len(b) != 32 {
		return "", fmt.Errorf("hash %q: bad base64 sha256", clip(s))
	}
	return hex.EncodeToString(b), nil
}

// decodeNix32 decodes Nix's base-32 (libutil hash.cc): the last character
// holds the lowest 5 bits, and bits past size*8 must be zero.
func decodeNix32(s string, size int) ([]byte, error) {
	if len(s) != (size*8-1)/5+1 {
		return nil, fmt.Errorf("base-32 of %d bytes has %d characters, not %d", size, (size*8-1)/5+1, len(s))
	}
	out := make([]byte, size)
	for n := 0; n < len(s); n++ {
		c := s[len(s)-n-1]
		d := strings.IndexByte(nix32Alphabet, c)
		if d < 0 {
			return nil, fmt.Errorf("bad base-32 character %q", c)
		}
		b := n * 5
		i, j := b/8, uint(b%8)
		out[i] |= byte(d << j)
		if i < size-1 {
			out[i+1] |= byte(d >> (8 - j))
		} else if d>>(8-j) != 0 {
			return nil, fmt.Errorf("base-32 value overflows %d bytes", size)
		}
	}
	return out, nil
}

// encodeNix32 is the inverse of decodeNix32 (for tests and tools).
func encodeNix32(b []byte) string {
	n := (len(b)*8-1)/5 + 1
	var sb strings.Builder
	for k := n - 1; k >= 0; k-- {
		bit := k * 5
		i, j := bit/8, uint(bit%8)
		c := b[i] >> j
		if i < len(b)-1 {
			c |= b[i+1] << (8 - j)
		}
		sb.WriteByte(nix32Alphabet[c&0x1f])
	}
	return sb.String()
}
