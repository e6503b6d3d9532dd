package nixstore

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"strings"
)

// GenerationRoot is the garbage-collector root path of a strata
// generation on a builder: a small text file, <hash>-strata-generation-<N>,
// registered as a valid path whose references are every path of the
// generation (see builder/gcroot.go). Its name, contents and NAR hash
// depend only on the store dir and the generation, so the server can
// register it in a generation's Nix DB (BuildGenerationDB) exactly as the
// builder would.
type GenerationRoot struct {
	// Path is the store path; Content the file's contents.
	Path    string
	Content []byte
	// NarHash (base-16 SHA-256) and NarSize are the file's NAR
	// serialisation's.
	NarHash string
	NarSize uint64
}

// RootOf returns generation gen's root in storeDir (the store dir paths
// are named in, normally /nix/store).
func RootOf(storeDir string, gen uint64) GenerationRoot {
	content := []byte(fmt.Sprintf("strata generation %d: a garbage collector root for its store paths\n", gen))
	h, size := NarOfFile(content)
	return GenerationRoot{Path: TextPath(storeDir, fmt.Sprintf("strata-generation-%d", gen), content, nil),
		Content: content, NarHash: h, NarSize: size}
}

// NarOfFile returns the base16 SHA-256 and size of the NAR serialisation
// of a non-executable regular file with contents b.
func NarOfFile(b []byte) (string, uint64) {
	var nar []byte
	str := func(s []byte) {
		nar = binary.LittleEndian.AppendUint64(nar, uint64(len(s)))
		nar = append(nar, s...)
		if r := len(s) % 8; r != 0 {
			nar = append(nar, make([]byte, 8-r)...)
		}
	}
	for _, s := range []string{"nix-archive-1", "(", "type", "regular", "contents"} {
		str([]byte(s))
	}
	str(b)
	str([]byte(")"))
	sum := sha256.Sum256(nar)
	return hex.EncodeToString(sum[:]), uint64(len(nar))
}

// TextPath is the store path Nix gives a text file with these contents and
// references (Store::makeTextPath): the name's hash commits to both.
func TextPath(storeDir, name string, contents []byte, refs []string) string {
	var s strings.Builder
	s.WriteString("text")
	for _, r := range refs {
		s.WriteString(":")
		s.WriteString(r)
	}
	h := sha256.Sum256(contents)
	s.WriteString(":sha256:" + hex.EncodeToString(h[:]) + ":" + storeDir + ":" + name)
	full := sha256.Sum256([]byte(s.String()))
	var c [20]byte
	for i, x := range full {
		c[i%20] ^= x
	}
	return storeDir + "/" + encodeNix32(c[:]) + "-" + name
}
