package nfs

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"sync"

	"github.com/strata-nix/strata/internal/secretfile"
)

// Sealed NFS file handle layout (all handles are a multiple of 4 bytes and at
// most 64 bytes, the NFSv3 limit):
//
//	[0]      version (handleVersion)
//	[1]      kernel handle type (name_to_handle_at's handle_type, must fit a byte)
//	[2]      kernel handle length in bytes (1..maxKernelHandle)
//	[3]      reserved, zero
//	[4:12]   generation id, big endian
//	[12:k]   kernel handle bytes, zero padded to a multiple of 4
//	[k:k+12] HMAC-SHA256(key, bytes[0:k]) truncated to 12 bytes
//
// The handle carries no server state: any process with the same key resolves
// it, so handles survive restarts. The MAC makes the kernel handle opaque and
// unforgeable: open_by_handle_at would otherwise open any inode of the
// filesystem (on btrfs, of any subvolume) for whoever can guess its bytes.
const (
	handleVersion   = 1
	handleHeader    = 12
	macLen          = 12
	maxHandle       = 64
	maxKernelHandle = maxHandle - handleHeader - macLen // 40
	minHandle       = handleHeader + 4 + macLen
	keyLen          = 32
	keyFileName     = "nfs-handle.key"
)

// errBadHandle is returned for every handle that does not unseal: wrong size,
// unknown version, bad padding or MAC. NFS callers answer NFS3ERR_STALE.
var errBadHandle = errors.New("bad file handle")

// sealed is what an unsealed handle says.
type sealed struct {
	gen   uint64
	ktype int32
	kh    []byte // kernel handle bytes, exactly klen long
}

func pad4(n int) int { return (n + 3) &^ 3 }

// seal builds the NFS handle for kernel handle kh of type ktype in generation gen.
func seal(key []byte, gen uint64, ktype int32, kh []byte) ([]byte, error) {
	if ktype < 0 || ktype > 0xff {
		return nil, fmt.Errorf("seal handle: kernel handle type %d does not fit a byte", ktype)
	}
	if len(kh) == 0 || len(kh) > maxKernelHandle {
		return nil, fmt.Errorf("seal handle: kernel handle of %d bytes (max %d)", len(kh), maxKernelHandle)
	}
	k := handleHeader + pad4(len(kh))
	b := make([]byte, k+macLen)
	b[0] = handleVersion
	b[1] = byte(ktype)
	b[2] = byte(len(kh))
	binary.BigEndian.PutUint64(b[4:12], gen)
	copy(b[handleHeader:], kh)
	copy(b[k:], mac(key, b[:k]))
	return b, nil
}

// unseal checks b and returns what it names. It never says why a handle is
// bad beyond errBadHandle: a forger learns nothing.
func unseal(key []byte, b []byte) (sealed, error) {
	s, err := parseSealed(b)
	if err != nil {
		return sealed{}, err
	}
	k := len(b) - macLen
	if !hmac.Equal(b[k:], mac(key, b[:k])) {
		return sealed{}, errBadHandle
	}
	return s, nil
}

// parseSealed checks the layout of b and returns what it names, without
// checking the MAC: only for bytes already unsealed or sealed by this
// process (see gen.unseal).
func parseSealed(b []byte) (sealed, error) {
	n := len(b)
	if n < minHandle || n > maxHandle || n%4 != 0 {
		return sealed{}, errBadHandle
	}
	if b[0] != handleVersion || b[3] != 0 {
		return sealed{}, errBadHandle
	}
	klen := int(b[2])
	if klen == 0 || handleHeader+pad4(klen)+macLen != n {
		return sealed{}, errBadHandle
	}
	for _, p := range b[handleHeader+klen : n-macLen] {
		if p != 0 {
			return sealed{}, errBadHandle
		}
	}
	return sealed{
		gen:   binary.BigEndian.Uint64(b[4:12]),
		ktype: int32(b[1]),
		kh:    b[handleHeader : handleHeader+klen],
	}, nil
}

// macPools keeps keyed HMAC states per key (one key per export in
// practice), so a MAC costs a Reset instead of hmac.New's key schedule.
var macPools sync.Map // string(key) -> *sync.Pool of hash.Hash

func mac(key, msg []byte) []byte {
	p, ok := macPools.Load(string(key))
	if !ok {
		k := bytes.Clone(key)
		p, _ = macPools.LoadOrStore(string(k), &sync.Pool{New: func() any { return hmac.New(sha256.New, k) }})
	}
	pool := p.(*sync.Pool)
	h := pool.Get().(hash.Hash)
	h.Reset()
	h.Write(msg)
	var sum [sha256.Size]byte
	out := h.Sum(sum[:0])
	pool.Put(h)
	return bytes.Clone(out[:macLen])
}

// loadKey returns the handle MAC key kept in dir, creating it (32 random
// bytes, mode 0600) on first use. The file is written to a temp file, synced
// and linked into place, so a crash never leaves a partial key and a
// concurrent creator never replaces a key already in use.
func loadKey(dir string) ([]byte, error) {
	path := filepath.Join(dir, keyFileName)
	key, err := readKey(path)
	if err == nil || !errors.Is(err, os.ErrNotExist) {
		return key, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state dir %s: %w", dir, err)
	}
	key = make([]byte, keyLen)
	if _, err := io.ReadFull(rand.Reader, key); err != nil {
		return nil, fmt.Errorf("generate handle key: %w", err)
	}
	tmp, err := os.CreateTemp(dir, keyFileName+".tmp-*")
	if err != nil {
		return nil, fmt.Errorf("create handle key %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("create handle key %s: %w", path, err)
	}
	if _, err := tmp.Write(key); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("write handle key %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("sync handle key %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return nil, fmt.Errorf("close handle key %s: %w", path, err)
	}
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, os.ErrExist) {
			return readKey(path) // someone else won the race: use theirs
		}
		return nil, fmt.Errorf("install handle key %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return key, nil
}

func readKey(path string) ([]byte, error) {
	key, err := secretfile.Read(path, "nfs handle key")
	if err != nil {
		return nil, err
	}
	if len(key) != keyLen {
		return nil, fmt.Errorf("read handle key %s: %d bytes, want %d (file damaged? removing it makes every client handle stale)", path, len(key), keyLen)
	}
	return key, nil
}

// KeyFile is the path of the handle MAC key in state dir dir. The server
// makes it only on its very first start; see server.Daemon.
func KeyFile(dir string) string { return filepath.Join(dir, keyFileName) }
