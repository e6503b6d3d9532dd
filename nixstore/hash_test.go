package nixstore

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"strings"
	"testing"
)

func sha256Hex(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

func TestNormalizeSHA256(t *testing.T) {
	// A pair Nix itself printed: the NAR hash of a file added with
	// nix-store --add (ValidPaths.hash) and its ca field (base-32).
	const b16 = "1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13"
	const n32 = "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"
	raw, _ := hex.DecodeString(b16)
	b64 := base64.StdEncoding.EncodeToString(raw)
	for _, in := range []string{b16, "sha256:" + b16, "sha256:" + strings.ToUpper(b16), "sha256:" + n32, n32, "sha256:" + b64, "sha256-" + b64} {
		got, err := NormalizeSHA256(in)
		if err != nil || got != b16 {
			t.Errorf("NormalizeSHA256(%q) = %q, %v; want %s", in, got, err, b16)
		}
	}
	for _, in := range []string{"", "md5:" + b16, "sha256:" + n32[:51], "sha256:" + "e" + n32[1:], "sha256:" + b16[:62] + "zz", "sha256-" + b64[:40] + "!!!!", "sha256:zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"} {
		if got, err := NormalizeSHA256(in); err == nil {
			t.Errorf("NormalizeSHA256(%q) = %q, want an error", in, got)
		}
	}
	if got := encodeNix32(raw); got != n32 {
		t.Errorf("encodeNix32 = %s, want %s", got, n32)
	}
}
