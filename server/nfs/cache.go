package nfs

import (
	"sync"
	"unsafe"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	"golang.org/x/sys/unix"
)

// A generation never changes after it is live, so what the export learns
// about one of its objects (attributes, the sealed handle of a child name or
// of a parent) stays true for the generation's life. go-nfs asks for the
// same facts many times per request (LOOKUP: four Lstats and a ToHandle;
// READ: Open then Stat), and clients ask for the same objects again and
// again, so each generation keeps two small caches:
//
//   - attrCache: sealed handle (plus child name, or "parent") -> attributes
//     and sealed handle. A hit needs no system call and no MAC check: an
//     entry is only added for bytes that were unsealed or sealed here.
//   - fdCache: open O_RDONLY descriptors of recently used directories (for
//     fstatat / name_to_handle_at of their entries) and regular files (for
//     READ), so a hit needs no open_by_handle_at.
//
// Both are LRUs with a fixed number of entries: memory and descriptors do
// not grow with the number of files served.

const (
	// defaultAttrEntries bounds the attribute cache of one generation
	// (about 300 bytes an entry).
	defaultAttrEntries = 8192
	// defaultFDEntries bounds the descriptors one generation keeps open.
	defaultFDEntries = 128
)

// Cache key kinds: the first byte of a key, followed by the sealed handle.
const (
	keyObject = 'h' // the object the handle names
	keyChild  = 'n' // entry name inside the handle's directory: 'n' handle '/' name
	keyParent = 'p' // the handle's parent directory
	keyDirFD  = 'd' // O_RDONLY|O_DIRECTORY descriptor
	keyFileFD = 'f' // O_RDONLY descriptor of a regular file
)

// keyBuf holds a cache key built for a lookup only, so that looking up does
// not allocate. Room: kind, the largest handle, '/', the longest name.
type keyBuf [1 + maxHandle + 1 + 255]byte

// view returns the key cacheKey would, as a string over k's bytes: valid
// while k is, and never to be stored (stored keys come from cacheKey). A
// key that does not fit (never for a valid handle and name) is allocated.
func (k *keyBuf) view(kind byte, handle []byte, name string) string {
	n := 1 + len(handle)
	if name != "" {
		n += 1 + len(name)
	}
	if n > len(k) {
		return cacheKey(kind, handle, name)
	}
	k[0] = kind
	copy(k[1:], handle)
	if name != "" {
		k[1+len(handle)] = '/'
		copy(k[2+len(handle):], name)
	}
	return unsafe.String(&k[0], n)
}

func cacheKey(kind byte, handle []byte, name string) string {
	b := make([]byte, 0, 1+len(handle)+1+len(name))
	b = append(b, kind)
	b = append(b, handle...)
	if name != "" {
		b = append(b, '/')
		b = append(b, name...)
	}
	return string(b)
}

// attrEntry is what the export knows about one object.
type attrEntry struct {
	handle []byte // its sealed handle; nil if it has none (never handed out)
	info   *info  // its lstat attributes; shared, never modified
}

type attrCache struct {
	mu  sync.Mutex
	lru *simplelru.LRU[string, attrEntry]
}

func newAttrCache(n int) *attrCache {
	if n <= 0 {
		n = defaultAttrEntries
	}
	l, _ := simplelru.NewLRU[string, attrEntry](n, nil)
	return &attrCache{lru: l}
}

func (c *attrCache) get(key string) (attrEntry, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Get(key)
}

func (c *attrCache) add(key string, e attrEntry) {
	c.mu.Lock()
	c.lru.Add(key, e)
	c.mu.Unlock()
}

func (c *attrCache) purge() {
	c.mu.Lock()
	c.lru.Purge()
	c.mu.Unlock()
}

// sharedFD is an open descriptor used by the cache and by callers. It is
// closed when the last of them lets go.
type sharedFD struct {
	fd   int
	refs int // guarded by the owning fdCache's mu; 1 for the cache while cached
}

type fdCache struct {
	mu     sync.Mutex
	lru    *simplelru.LRU[string, *sharedFD]
	closed bool
}

func newFDCache(n int) *fdCache {
	if n <= 0 {
		n = defaultFDEntries
	}
	c := &fdCache{}
	c.lru, _ = simplelru.NewLRU(n, func(_ string, s *sharedFD) { c.unrefLocked(s) })
	return c
}

func (c *fdCache) unrefLocked(s *sharedFD) {
	s.refs--
	if s.refs == 0 {
		unix.Close(s.fd)
	}
}

// get returns a cached descriptor with a reference for the caller, or nil.
func (c *fdCache) get(key string) *sharedFD {
	c.mu.Lock()
	defer c.mu.Unlock()
	s, ok := c.lru.Get(key)
	if !ok {
		return nil
	}
	s.refs++
	return s
}

// put caches fd under key and returns it with a reference for the caller.
// If key is already cached (a concurrent miss), fd is closed and the cached
// one returned. After purge nothing is cached: fd is only the caller's.
func (c *fdCache) put(key string, fd int) *sharedFD {
	c.mu.Lock()
	defer c.mu.Unlock()
	if s, ok := c.lru.Get(key); ok {
		unix.Close(fd)
		s.refs++
		return s
	}
	s := &sharedFD{fd: fd, refs: 1}
	if !c.closed {
		s.refs++
		c.lru.Add(key, s)
	}
	return s
}

// release drops the caller's reference.
func (c *fdCache) release(s *sharedFD) {
	c.mu.Lock()
	c.unrefLocked(s)
	c.mu.Unlock()
}

// purge drops every cached descriptor (those in use close on release) and
// caches nothing more.
func (c *fdCache) purge() {
	c.mu.Lock()
	c.closed = true
	c.lru.Purge()
	c.mu.Unlock()
}
