package builder

import (
	"context"
	"slices"
	"testing"
)

// TestImportUsesPathRows: first start and rotation import the server's path
// rows (signatures included), the rotation only the rows added since the
// current generation; a server without rows for a generation (published by
// an older strata) still gets every path imported, from its registration.
func TestImportUsesPathRows(t *testing.T) {
	for _, noRows := range []bool{false, true} {
		u := newUnitEnv(t)
		u.srv.noRows = noRows
		a1, b1 := info("a"), info("bb")
		u.srv.sigs = map[string][]string{a1.Path: {"central-1:c2ln"}}
		u.srv.publish(a1, b1)
		a := u.agent(t)
		if err := a.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		c1 := info("ccc", a1.Path)
		u.srv.sigs[c1.Path] = []string{"central-1:Y2Nj", "other-2:eA=="}
		u.srv.publish(a1, b1, c1)
		if err := a.Rotate(context.Background(), 2); err != nil {
			t.Fatal(err)
		}
		for _, p := range []string{a1.Path, b1.Path, c1.Path} {
			if !u.nix.isValid(p) {
				t.Fatalf("noRows=%v: %s not imported", noRows, p)
			}
		}
		if st := a.State(); st.PathsImported != 1 {
			t.Fatalf("noRows=%v: rotation imported %d paths, want 1", noRows, st.PathsImported)
		}
		if u.srv.pathsCalls != [2]int{1, 1} {
			t.Fatalf("noRows=%v: /paths calls (full, delta) = %v, want one each", noRows, u.srv.pathsCalls)
		}
		var wantA, wantC []string
		if !noRows {
			wantA, wantC = u.srv.sigs[a1.Path], u.srv.sigs[c1.Path]
		}
		if got := u.nix.rows[a1.Path].Sigs; !slices.Equal(got, wantA) {
			t.Fatalf("noRows=%v: signatures of %s imported as %v, want %v", noRows, a1.Path, got, wantA)
		}
		if got := u.nix.rows[c1.Path].Sigs; !slices.Equal(got, wantC) {
			t.Fatalf("noRows=%v: signatures of %s imported as %v, want %v", noRows, c1.Path, got, wantC)
		}
	}
}
