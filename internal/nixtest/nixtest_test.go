package nixtest

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestFillMakesDeriversAndReferences(t *testing.T) {
	s := New(t, filepath.Join(t.TempDir(), "root"))
	paths := s.Fill(t)
	dump := s.DumpDB(t)
	for _, p := range paths {
		if !strings.Contains(dump, p+"\n") {
			t.Errorf("dump-db lacks %s", p)
		}
	}
	if !strings.Contains(dump, ".drv\n") {
		t.Errorf("dump-db has no deriver:\n%s", dump)
	}
}
