package nfs

import (
	"io/fs"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/golang-lru/v2/simplelru"
)

// dirCache keeps recent directory listings by cookie verifier, so each
// READDIR/READDIRPLUS page of a large directory is served without re-reading
// and re-sorting it. It is bounded by the total number of entries kept; the
// least recently used listings go first. A listing larger than the bound is
// not cached.
type dirCache struct {
	mu      sync.Mutex
	lru     *simplelru.LRU[uint64, *dirListing]
	entries int // sum of len(list) over cached listings
	max     int
}

type dirListing struct {
	path string
	list []fs.FileInfo
	// handles[i] is list[i]'s sealed handle once READDIRPLUS has made it
	// (an empty slice: the entry has none, e.g. a nested subvolume). A
	// generation never changes, so neither does a handle.
	handles []atomic.Pointer[[]byte]
}

// maxListings bounds the number of cached listings whatever their size.
const maxListings = 4096

func newDirCache(maxEntries int) *dirCache {
	c := &dirCache{max: maxEntries}
	c.lru, _ = simplelru.NewLRU(maxListings, func(_ uint64, l *dirListing) {
		c.entries -= len(l.list)
	})
	return c
}

func (c *dirCache) add(v uint64, path string, list []fs.FileInfo) {
	if len(list) > c.max {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if old, ok := c.lru.Peek(v); ok && old.path == path {
		c.lru.Get(v)
		return
	}
	c.lru.Remove(v)
	for c.entries+len(list) > c.max {
		c.lru.RemoveOldest()
	}
	c.lru.Add(v, &dirListing{path: path, list: list, handles: make([]atomic.Pointer[[]byte], len(list))})
	c.entries += len(list)
}

func (c *dirCache) get(v uint64, path string) []fs.FileInfo {
	if l := c.listing(v, path); l != nil {
		return l.list
	}
	return nil
}

// listing returns the cached listing of path, or nil.
func (c *dirCache) listing(v uint64, path string) *dirListing {
	c.mu.Lock()
	defer c.mu.Unlock()
	l, ok := c.lru.Get(v)
	if !ok || l.path != path {
		return nil
	}
	return l
}
