//go:build integration

package nfs

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/strata-nix/strata/internal/nfsraw"
)

// TestReadCountsAndEOF reads a sparse file larger than MaxRead (4 GiB and
// then some, with data written around 0, MaxRead, 4 GiB and its end) at
// every interesting count, from 0 past MaxRead, and offsets around the end
// of file, 4 GiB and MaxRead, through the fast path (one buffer up to
// readChunk, chunks of readChunk above, the last one padded) and through
// go-nfs (the export with the fast path off):
// every reply has the file's bytes, min(count, MaxRead, size-offset) of
// them, and eof true exactly when offset + returned = size. FSINFO
// advertises MaxRead.
func TestReadCountsAndEOF(t *testing.T) {
	const size = 4<<30 + 20<<20 + 3
	chunks := []int64{0, MaxRead - 1<<19, 4<<30 - 1<<19, size - 1<<20}
	fx := newFixture(t, func(store string) {
		f, err := os.Create(filepath.Join(store, "sparse"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		for _, off := range chunks {
			b := make([]byte, 1<<20)
			rand.Read(b)
			if _, err := f.WriteAt(b, off); err != nil {
				t.Fatal(err)
			}
		}
	})
	local, err := os.Open(filepath.Join(fx.gen[1], "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	defer local.Close()
	want := func(off uint64, count uint32) []byte {
		n := min(int64(count), MaxRead, max(0, size-int64(off)))
		b := make([]byte, n)
		if _, err := local.ReadAt(b, int64(off)); err != nil {
			t.Fatal(err)
		}
		return b
	}

	counts := []uint32{0, 1, 2, 3, 4, 5, 4095, 4096, 4097, 64<<10 - 1, 64 << 10, 64<<10 + 1,
		readChunk - 1, readChunk, readChunk + 1, readChunk + 2, 2*readChunk + 3, MaxRead - 1, MaxRead, MaxRead + 1, 2 * MaxRead, 1 << 30, 0xffffffff}
	offsets := []uint64{0, 1, MaxRead - 1, MaxRead, MaxRead + 1, 4<<30 - 1, 4 << 30, 4<<30 + 1,
		size - MaxRead - 1, size - MaxRead, size - MaxRead + 1, size - 1<<20, size - 5, size - 1, size, size + 1, 1 << 40}

	for _, path := range []struct {
		name       string
		noFastPath bool
	}{{"fast path", false}, {"go-nfs", true}} {
		t.Run(path.name, func(t *testing.T) {
			_, addr, _ := fx.serveWith(t, path.noFastPath)
			rc := raw(t, addr)
			root := mountRaw(t, rc, "/gen/1")
			fh := lookupPath(t, rc, root, "sparse")
			if !path.noFastPath {
				st, d, err := rc.NFS(19, (&nfsraw.Enc{}).Opaque(root))
				if err != nil || st != nfsraw.NFS3OK {
					t.Fatalf("FSINFO: %d %v", st, err)
				}
				d.PostOpAttr()
				rtmax, rtpref := d.U32(), d.U32()
				if rtmax != MaxRead || rtpref > rtmax {
					t.Errorf("FSINFO rtmax %d rtpref %d, want rtmax %d (what READ serves), rtpref <= rtmax", rtmax, rtpref, MaxRead)
				}
			}
			for _, off := range offsets {
				for _, count := range counts {
					// go-nfs allocates every READ whole: keep its run
					// to the counts around the edges.
					if path.noFastPath && count > MaxRead+1 && count != 0xffffffff {
						continue
					}
					what := fmt.Sprintf("READ offset %d count %d", off, count)
					st, data, eof, err := rc.ReadView(fh, off, count)
					if err != nil || st != nfsraw.NFS3OK {
						t.Fatalf("%s: status %d, %v", what, st, err)
					}
					w := want(off, count)
					if !bytes.Equal(data, w) {
						t.Fatalf("%s: %d bytes that differ from the file's %d", what, len(data), len(w))
					}
					if wantEOF := off+uint64(len(data)) >= size; eof != wantEOF {
						t.Fatalf("%s: %d bytes, eof %v; want eof %v (size %d)", what, len(data), eof, wantEOF, int64(size))
					}
				}
			}
			// Reading the whole file in rtmax-sized READs, following eof,
			// gets every byte: no short READ claims the end.
			var got int64
			for off := uint64(4 << 30); ; {
				st, data, eof, err := rc.ReadView(fh, off, MaxRead+4096)
				if err != nil || st != nfsraw.NFS3OK {
					t.Fatalf("READ at %d: %d %v", off, st, err)
				}
				got += int64(len(data))
				off += uint64(len(data))
				if eof {
					break
				}
			}
			if got != size-4<<30 {
				t.Errorf("reading from 4 GiB to eof got %d bytes, want %d", got, int64(size-4<<30))
			}
		})
	}
}
