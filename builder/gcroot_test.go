package builder

import "testing"

// textPath agrees with Nix's builtins.toFile (Store::makeTextPath), with
// and without references (values printed by Nix 2.8's nix-instantiate).
func TestTextPathMatchesNix(t *testing.T) {
	for _, tc := range []struct {
		name, content string
		refs          []string
		want          string
	}{
		{"strata-test", "hello\n", nil, "/nix/store/b51h222fhdz3xwypplrps84q7l95idkc-strata-test"},
		{"strata-test2", "uses /nix/store/12wigjpizrn8axaqxj288q1b751qmwya-a\n", []string{"/nix/store/12wigjpizrn8axaqxj288q1b751qmwya-a"}, "/nix/store/q47fkg41fg56ppxg6kla0f1igv8p7vrd-strata-test2"},
	} {
		if got := textPath("/nix/store", tc.name, []byte(tc.content), tc.refs); got != tc.want {
			t.Errorf("textPath(%s) = %s, want %s", tc.name, got, tc.want)
		}
	}
}
