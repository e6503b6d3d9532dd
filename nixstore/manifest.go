package nixstore

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
)

// NarBytes is the sum of the NAR sizes of infos.
func NarBytes(infos []PathInfo) uint64 {
	var n uint64
	for i := range infos {
		n += infos[i].NarSize
	}
	return n
}

// RegistrationSHA256 is the lowercase hex SHA-256 of the registration text
// of infos (as WriteRegistration writes it, in the order given).
func RegistrationSHA256(infos []PathInfo) (string, error) {
	h := sha256.New()
	if err := WriteRegistration(h, infos); err != nil {
		return "", fmt.Errorf("hash registration: %w", err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
