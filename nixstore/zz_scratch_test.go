//go:build scratch

package nixstore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"testing"
	"time"
)

func TestScratchDelta(t *testing.T) {
	reg := func(g string) []byte {
		in, err := ReadDB(context.Background(), "/tmp/rb/exp/mnt/gens/"+g+"/var/nix/db")
		if err != nil {
			t.Fatal(err)
		}
		var b bytes.Buffer
		WriteRegistration(&b, in)
		return b.Bytes()
	}
	r1, r2 := reg("strata-1"), reg("strata-2")
	for i := 0; i < 3; i++ {
		s := time.Now()
		added, removed, err := DeltaText(r1, r2)
		t1 := time.Since(s)
		s = time.Now()
		out, err := ApplyDelta(r1, added, removed)
		t2 := time.Since(s)
		s = time.Now()
		sha256.Sum256(out)
		t3 := time.Since(s)
		s = time.Now()
		paths, _, err := RegistrationPaths(out)
		t4 := time.Since(s)
		s = time.Now()
		err = VerifyPresent("/tmp/rb/exp/mnt/gens/strata-2/store", "/nix/store", paths)
		t5 := time.Since(s)
		t.Logf("delta %v apply %v sha %v paths %v present %v (%v) eq=%v", t1, t2, t3, t4, t5, err, bytes.Equal(out, r2))
	}
}
