package nixstore

import "testing"

// sameSQL: statements that differ only in spacing, case, quoting of plain
// identifiers and comments are the same; any other difference is not.
func TestSameSQL(t *testing.T) {
	trigger := "CREATE TRIGGER DeleteSelfRefs before delete on ValidPaths\n  begin\n    delete from Refs where referrer = old.id and reference = old.id;\n  end"
	for _, c := range []struct {
		a, b string
		same bool
	}{
		{"CREATE INDEX IndexReferrer on Refs(referrer)", "CREATE INDEX IndexReferrer on Refs(referrer)", true},
		{"CREATE INDEX IndexReferrer on Refs(referrer)", "create index  \"IndexReferrer\"\n\ton [Refs] ( `referrer` )", true},
		{"CREATE INDEX IndexReferrer on Refs(referrer) -- why", "CREATE INDEX IndexReferrer /* why */ on Refs(referrer)", true},
		{trigger, "CREATE TRIGGER \"DeleteSelfRefs\" BEFORE DELETE ON \"ValidPaths\" BEGIN DELETE FROM Refs WHERE referrer=old.id AND reference=old.id; END", true},
		{"CREATE INDEX IndexReferrer on Refs(referrer)", "CREATE INDEX IndexReferrer on Refs(referrer, reference)", false},
		{"CREATE INDEX IndexReferrer on Refs(referrer)", "CREATE UNIQUE INDEX IndexReferrer on Refs(referrer)", false},
		{"CREATE INDEX x on t(a) WHERE b = 'A'", "CREATE INDEX x on t(a) WHERE b = 'a'", false},      // string literals keep their case
		{"CREATE INDEX x on t(a) WHERE b = 'a  b'", "CREATE INDEX x on t(a) WHERE b = 'a b'", false}, // and their spaces
		{`CREATE INDEX x on "my table"(a)`, `CREATE INDEX x on "My Table"(a)`, false},
		{trigger, "CREATE TRIGGER DeleteSelfRefs after delete on ValidPaths begin delete from Refs where referrer = old.id; end", false},
		{"CREATE INDEX ab on t(a)", "CREATE INDEX a b on t(a)", false},
	} {
		if got := sameSQL(c.a, c.b); got != c.same {
			t.Errorf("sameSQL(%q, %q) = %v, want %v (%q, %q)", c.a, c.b, got, c.same, normSQL(c.a), normSQL(c.b))
		}
	}
}
