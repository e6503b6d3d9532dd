package nfs

import (
	"crypto/hmac"
	"crypto/sha256"
	"testing"

	"golang.org/x/sys/unix"
)

func fdOpen(fd int) bool {
	_, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	return err == nil
}

func devNull(t *testing.T) int {
	t.Helper()
	fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return fd
}

func TestFDCacheClosesEvictedOnlyAfterLastUser(t *testing.T) {
	c := newFDCache(2)
	a := c.put("a", devNull(t)) // in use
	c.put("b", devNull(t))
	c.release(c.get("b"))
	c.put("c", devNull(t)) // evicts a, still in use
	if !fdOpen(a.fd) {
		t.Fatal("evicted descriptor closed while in use")
	}
	c.release(a)
	if fdOpen(a.fd) {
		t.Fatal("evicted descriptor still open after its last user released it")
	}
	if c.get("a") != nil {
		t.Fatal("evicted key still cached")
	}
	if c.lru.Len() != 2 {
		t.Fatalf("cache holds %d descriptors, bound is 2", c.lru.Len())
	}
}

func TestFDCachePurgeClosesAndStopsCaching(t *testing.T) {
	c := newFDCache(4)
	idle := c.put("idle", devNull(t))
	c.release(idle)
	busy := c.put("busy", devNull(t))
	c.purge()
	if fdOpen(idle.fd) {
		t.Fatal("idle descriptor open after purge")
	}
	if !fdOpen(busy.fd) {
		t.Fatal("busy descriptor closed under its user by purge")
	}
	c.release(busy)
	if fdOpen(busy.fd) {
		t.Fatal("busy descriptor open after release")
	}
	late := c.put("late", devNull(t))
	c.release(late)
	if fdOpen(late.fd) || c.lru.Len() != 0 {
		t.Fatal("a purged cache kept a descriptor")
	}
}

func TestFDCacheConcurrentMissKeepsOne(t *testing.T) {
	c := newFDCache(4)
	first := c.put("k", devNull(t))
	dup := devNull(t)
	second := c.put("k", dup)
	if second != first {
		t.Fatal("second put of a cached key did not return the cached descriptor")
	}
	if fdOpen(dup) {
		t.Fatal("duplicate descriptor of a concurrent miss not closed")
	}
	c.release(first)
	c.release(second)
	if !fdOpen(first.fd) {
		t.Fatal("cached descriptor closed while cached")
	}
}

func TestAttrCacheBounded(t *testing.T) {
	c := newAttrCache(100)
	for i := range 1000 {
		c.add(cacheKey(keyObject, []byte{byte(i), byte(i >> 8)}, ""), attrEntry{info: &info{}})
	}
	if n := c.lru.Len(); n != 100 {
		t.Fatalf("attribute cache holds %d entries, bound is 100", n)
	}
	if _, ok := c.get(cacheKey(keyObject, []byte{byte(999 & 0xff), byte(999 >> 8)}, "")); !ok {
		t.Fatal("most recent entry missing")
	}
}

func TestCacheKeysDistinct(t *testing.T) {
	h := []byte{1, 2, 3, 4}
	keys := map[string]bool{}
	for _, k := range []string{
		cacheKey(keyObject, h, ""), cacheKey(keyParent, h, ""), cacheKey(keyChild, h, "a"),
		cacheKey(keyChild, h, "b"), cacheKey(keyDirFD, h, ""), cacheKey(keyFileFD, h, ""),
	} {
		if keys[k] {
			t.Fatalf("duplicate cache key %q", k)
		}
		keys[k] = true
	}
}

func TestMACPooledMatchesFresh(t *testing.T) {
	k1 := []byte("0123456789abcdef0123456789abcdef")
	k2 := []byte("fedcba9876543210fedcba9876543210")
	a := mac(k1, []byte("msg"))
	fresh := hmac.New(sha256.New, k1)
	fresh.Write([]byte("msg"))
	if string(a) != string(fresh.Sum(nil)[:macLen]) {
		t.Fatal("pooled MAC differs from HMAC-SHA256")
	}
	for range 3 {
		if string(mac(k1, []byte("msg"))) != string(a) {
			t.Fatal("pooled MAC differs between calls")
		}
	}
	if string(mac(k2, []byte("msg"))) == string(a) {
		t.Fatal("two keys give the same MAC")
	}
	if string(mac(k1, []byte("msh"))) == string(a) {
		t.Fatal("two messages give the same MAC")
	}
}
