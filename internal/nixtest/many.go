package nixtest

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// nix32 is Nix's base-32 alphabet.
const nix32 = "0123456789abcdfghijklmnpqrsvwxyz"

// manyPath names path i of AddMany: a 32-character base-32 hash part and
// the name.
func manyPath(prefix string, i int) string {
	name := fmt.Sprintf("%s-%d", prefix, i)
	h := sha256.Sum256([]byte(name))
	var sb strings.Builder
	sb.WriteString("/nix/store/")
	for k := range 32 {
		bit := k * 5
		v := uint(h[bit/8])>>(bit%8) | uint(h[bit/8+1])<<(8-bit%8)
		sb.WriteByte(nix32[v&31])
	}
	sb.WriteString("-" + name)
	return sb.String()
}

// AddMany makes n small single-file store paths named <hash>-prefix-i,
// each referring to up to 5 earlier ones, and registers them all at once
// with `nix-store --load-db` (hashes given: the NAR hashes are not the
// files' own, which nothing here checks). It is how tests get a store of
// 100,000 registered paths in seconds. It returns the paths.
func (s Store) AddMany(t testing.TB, prefix string, n int) []string {
	t.Helper()
	store := filepath.Join(s.NixRoot(), "store")
	r := rand.New(rand.NewPCG(uint64(n), 7))
	paths := make([]string, n)
	var reg bytes.Buffer
	for i := range paths {
		paths[i] = manyPath(prefix, i)
		if err := os.WriteFile(filepath.Join(store, filepath.Base(paths[i])), []byte(paths[i]+"\n"), 0o444); err != nil {
			t.Fatal(err)
		}
		var refs []string
		if i > 0 {
			for k := r.IntN(6); k > 0; k-- {
				refs = append(refs, paths[r.IntN(i)])
			}
		}
		slices.Sort(refs)
		refs = slices.Compact(refs)
		h := sha256.Sum256([]byte(paths[i]))
		fmt.Fprintf(&reg, "%s\n%s\n%d\n\n%d\n", paths[i], hex.EncodeToString(h[:]), 128+r.IntN(1<<16), len(refs))
		for _, ref := range refs {
			reg.WriteString(ref + "\n")
		}
	}
	cmd := s.Command("nix-store", "--load-db")
	cmd.Stdin = &reg
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nix-store --load-db: %v\n%s", err, out)
	}
	return paths
}
