package cluster

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/hashicorp/memberlist"

	"github.com/strata-nix/strata/internal/atomicfile"
	"github.com/strata-nix/strata/internal/secretfile"
)

// Keyring is the gossip encryption keyring: AES-256 keys, the first the
// primary (used to encrypt; every key is tried to decrypt). It wraps
// memberlist's keyring and writes every change back to its file, so a
// restart keeps a rotation.
//
// Rotation is per node, as memberlist's keyring is: run each step on every
// member before the next step (`strata cluster keys install` everywhere,
// then `use` everywhere, then `remove` everywhere). A member that switches
// its primary before every member has installed the key is refused by
// those that lack it.
type Keyring struct {
	file string
	ml   *memberlist.Keyring

	mu sync.Mutex // serialises changes and writes of file
}

// KeyInfo describes one key without revealing it.
type KeyInfo struct {
	// Fingerprint is the first 8 bytes of the key's sha256, in hex.
	Fingerprint string `json:"fingerprint"`
	Primary     bool   `json:"primary"`
}

// ParseKey decodes one base64 (standard encoding) AES-256 key.
func ParseKey(s string) ([]byte, error) {
	k, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil {
		return nil, fmt.Errorf("key is not base64: %w", err)
	}
	if len(k) != 32 {
		return nil, fmt.Errorf("key is %d bytes: want 32 (AES-256; make one with `head -c32 /dev/urandom | base64`)", len(k))
	}
	return k, nil
}

// Fingerprint names a key in output without revealing it.
func Fingerprint(k []byte) string {
	s := sha256.Sum256(k)
	return hex.EncodeToString(s[:8])
}

// LoadKeyring reads file: one base64 key per line, the first the primary;
// blank lines and lines starting with # are ignored. The file must be
// private to its owner (secretfile.Read). key is the config key named in
// errors.
func LoadKeyring(key, file string) (*Keyring, error) {
	b, err := secretfile.Read(file, key)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	var keys [][]byte
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, err := ParseKey(line)
		if err != nil {
			return nil, fmt.Errorf("config: key %q: %s line %d: %w", key, file, i+1, err)
		}
		keys = append(keys, k)
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("config: key %q: %s holds no key", key, file)
	}
	ml, err := memberlist.NewKeyring(keys, keys[0])
	if err != nil {
		return nil, fmt.Errorf("config: key %q: %w", key, err)
	}
	return &Keyring{file: file, ml: ml}, nil
}

// NewKeyring makes a keyring that is not backed by a file (tests).
func NewKeyring(keys ...[]byte) (*Keyring, error) {
	if len(keys) == 0 {
		return nil, errors.New("new keyring: no key")
	}
	ml, err := memberlist.NewKeyring(keys, keys[0])
	if err != nil {
		return nil, err
	}
	return &Keyring{ml: ml}, nil
}

// List describes the installed keys, the primary first.
func (k *Keyring) List() []KeyInfo {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.listLocked()
}

func (k *Keyring) listLocked() []KeyInfo {
	var out []KeyInfo
	for i, key := range k.ml.GetKeys() { // GetKeys puts the primary first
		out = append(out, KeyInfo{Fingerprint: Fingerprint(key), Primary: i == 0})
	}
	return out
}

// ErrKeyringReadOnly is returned (wrapped) by Install, Use and Remove when
// the keyring's file cannot take the change; nothing was changed.
var ErrKeyringReadOnly = errors.New("keyring file cannot be written")

// Install adds key (not primary). Installing an installed key is a no-op.
func (k *Keyring) Install(key []byte) error {
	return k.change("install", func(r *memberlist.Keyring) error { return r.AddKey(key) })
}

// Use makes an installed key the primary.
func (k *Keyring) Use(key []byte) error {
	return k.change("use", func(r *memberlist.Keyring) error {
		if !has(r, key) {
			return fmt.Errorf("key %s is not installed: install it first", Fingerprint(key))
		}
		return r.UseKey(key)
	})
}

// Remove removes an installed key that is not the primary.
func (k *Keyring) Remove(key []byte) error {
	return k.change("remove", func(r *memberlist.Keyring) error {
		if !has(r, key) {
			return fmt.Errorf("key %s is not installed", Fingerprint(key))
		}
		if bytes.Equal(r.GetPrimaryKey(), key) {
			return fmt.Errorf("key %s is the primary: use another key first", Fingerprint(key))
		}
		return r.RemoveKey(key)
	})
}

func has(r *memberlist.Keyring, key []byte) bool {
	for _, x := range r.GetKeys() {
		if bytes.Equal(x, key) {
			return true
		}
	}
	return false
}

// change applies op to a copy of the keyring, writes the copy to the file
// (temp, fsync, rename; mode 0600), and only then to the keyring in use: a
// change the file cannot keep is refused with nothing changed, so a restart
// never silently reverts a rotation. A keyring that is a systemd credential
// ($CREDENTIALS_DIRECTORY, read-only, copied from its source at each start)
// is refused before anything is tried.
func (k *Keyring) change(op string, f func(*memberlist.Keyring) error) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if dir := credentialDir(k.file); dir != "" {
		return fmt.Errorf("keyring %s: %w: cluster.keyring_file %s is a systemd credential (a read-only copy in $CREDENTIALS_DIRECTORY %s, made at each start): nothing changed. "+
			"Change the keyring file the unit loads (LoadCredential=; the shipped units: /etc/strata/credentials/cluster.keys) on every member and restart each, a round at a time (README \"Key rotation\"), "+
			"or point cluster.keyring_file at a file the daemon may write", op, ErrKeyringReadOnly, k.file, dir)
	}
	next, err := memberlist.NewKeyring(k.ml.GetKeys(), k.ml.GetPrimaryKey())
	if err != nil {
		return fmt.Errorf("keyring %s: %w", op, err)
	}
	if err := f(next); err != nil {
		return fmt.Errorf("keyring %s: %w", op, err)
	}
	if k.file != "" && !sameKeys(next.GetKeys(), k.ml.GetKeys()) {
		var b strings.Builder
		b.WriteString("# strata gossip keyring: base64 AES-256 keys, the first is the primary\n")
		for _, key := range next.GetKeys() {
			b.WriteString(base64.StdEncoding.EncodeToString(key) + "\n")
		}
		if err := atomicfile.WriteFile(k.file, []byte(b.String()), 0o600); err != nil {
			return fmt.Errorf("keyring %s: %w: %w: nothing changed (cluster.keyring_file must be in a directory the daemon may write; the server's unit makes /etc read-only)", op, ErrKeyringReadOnly, err)
		}
	}
	// next took the same change, so this cannot fail.
	if err := f(k.ml); err != nil {
		return fmt.Errorf("keyring %s: %w", op, err)
	}
	return nil
}

func sameKeys(a, b [][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !bytes.Equal(a[i], b[i]) {
			return false
		}
	}
	return true
}

// credentialDir returns $CREDENTIALS_DIRECTORY when file lies in it.
func credentialDir(file string) string {
	dir := os.Getenv("CREDENTIALS_DIRECTORY")
	if dir == "" || file == "" {
		return ""
	}
	rel, err := filepath.Rel(filepath.Clean(dir), filepath.Clean(file))
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return ""
	}
	return dir
}
