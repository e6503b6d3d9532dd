package nixstore

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
)

// fakePath makes a well-formed store path under dir for name.
func fakePath(dir, name string) string {
	h := sha256.Sum256([]byte(name))
	return dir + "/" + encodeNix32(h[:20]) + "-" + name
}

func fakeHash(name string) string {
	h := sha256.Sum256([]byte("nar:" + name))
	return hex.EncodeToString(h[:])
}

// fakeInfos makes n sorted records under dir, each referring to up to
// maxRefs earlier-created paths (and sometimes itself), some with derivers.
func fakeInfos(dir string, n, maxRefs int, seed uint64) []PathInfo {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	infos := make([]PathInfo, n)
	for i := range infos {
		name := fmt.Sprintf("pkg-%d", i)
		infos[i] = PathInfo{Path: fakePath(dir, name), NarHash: fakeHash(name), NarSize: uint64(r.IntN(1 << 20))}
		if i%3 == 0 {
			infos[i].Deriver = fakePath(dir, name+".drv")
		}
		if i > 0 && maxRefs > 0 {
			seen := map[string]bool{}
			for k := r.IntN(maxRefs + 1); k > 0; k-- {
				ref := infos[r.IntN(i)].Path
				if !seen[ref] {
					seen[ref] = true
					infos[i].References = append(infos[i].References, ref)
				}
			}
		}
		if i%7 == 0 {
			infos[i].References = append(infos[i].References, infos[i].Path)
		}
	}
	Sort(infos)
	return infos
}
