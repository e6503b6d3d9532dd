//go:build integration

package server

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/nixstore"
)

// TestPublishRowsAndPathsEndpoint: a publish writes the generation's path
// rows next to its registration; GET /v1/generations/N/paths serves them and
// they hold what `nix path-info --json` says of every path (signatures, ca,
// deriver, references, NAR hash and size, registration time); ?from=M
// serves only the rows added since M; a generation without rows (older
// strata) is a 404 that says so.
func TestPublishRowsAndPathsEndpoint(t *testing.T) {
	sv := newAPICentral(t)
	c, made, sk, s, g1, cl := sv.central, sv.made, sv.key, sv.srv, sv.g1, sv.cl
	if _, err := os.Stat(filepath.Join(c.cfg.StateDir, "generations", "1", "paths.jsonl.gz")); err != nil {
		t.Fatalf("rows artifact: %v", err)
	}
	ctx := context.Background()

	get := func(id, from uint64) (nixstore.RowsHeader, *nixstore.Rows) {
		t.Helper()
		body, err := cl.Paths(ctx, id, from)
		if err != nil {
			t.Fatal(err)
		}
		defer body.Close()
		h, rs, err := nixstore.ReadRows(body)
		if err != nil {
			t.Fatal(err)
		}
		return h, rs
	}
	h, rs := get(g1, 0)
	if h.Generation != g1 || h.StoreDir != "/nix/store" || h.From != 0 || h.Paths != len(rs.Paths) {
		t.Fatalf("header %+v", h)
	}
	sameAsPathInfo(t, rs, c.store.PathInfos(t))
	var signed, ca, drvOut int
	for _, r := range rs.Paths {
		if len(r.Sigs) > 0 {
			signed++
		}
		if r.CA != "" {
			ca++
		}
		if len(r.Outputs) > 0 {
			drvOut++
			if r.Outputs["out"] != made[3] {
				t.Errorf("drv %s outputs %v, want out=%s", r.Path, r.Outputs, made[3])
			}
		}
	}
	if signed != 2 || ca == 0 || drvOut != 1 {
		t.Fatalf("rows have %d signed paths (want 2), %d with ca (want some), %d derivations with outputs (want 1)", signed, ca, drvOut)
	}
	// The registration endpoint is unchanged.
	reg, err := cl.Registration(ctx, g1)
	if err != nil {
		t.Fatal(err)
	}
	sameRecords(t, "registration", parse(t, reg), parse(t, []byte(c.store.DumpDB(t))))

	// Generation 2 adds a path and a signature on an old one: the delta
	// has exactly those rows.
	added := c.store.AddText(t, "later", "added later\n")
	c.store.Sign(t, sk, made[1])
	g2 := publish(t, s)
	h, d := get(g2, g1)
	if h.Generation != g2 || h.From != g1 {
		t.Fatalf("delta header %+v", h)
	}
	var got []string
	for _, r := range d.Paths {
		got = append(got, r.Path)
	}
	want := []string{added, made[1]}
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("delta paths %v, want %v", got, want)
	}
	// The delta is kept and served again byte for byte.
	cached, err := os.ReadFile(filepath.Join(c.cfg.StateDir, "generations", "2", "paths-from-1.jsonl.gz"))
	if err != nil {
		t.Fatalf("delta not kept: %v", err)
	}
	body, err := cl.Paths(ctx, g2, g1)
	if err != nil {
		t.Fatal(err)
	}
	again, _ := io.ReadAll(body)
	body.Close()
	if !bytes.Equal(again, cached) {
		t.Fatal("second delta request differs from the kept delta")
	}
	_, full2 := get(g2, 0)
	sameAsPathInfo(t, full2, c.store.PathInfos(t))

	for _, path := range []string{"/v1/generations/9/paths", "/v1/generations/2/paths?from=9", "/v1/generations/2/paths?from=x"} {
		err := cl.Do(ctx, "GET", path, nil)
		var se *api.StatusError
		if !errors.As(err, &se) || se.Code/100 != 4 {
			t.Errorf("GET %s: %v, want a 4xx", path, err)
		}
	}
	// A generation published by an older strata has no rows: 404 naming why.
	if err := os.Remove(filepath.Join(c.cfg.StateDir, "generations", "1", "paths.jsonl.gz")); err != nil {
		t.Fatal(err)
	}
	_, err = cl.Paths(ctx, g1, 0)
	var se *api.StatusError
	if !errors.As(err, &se) || se.Code != 404 || !strings.Contains(se.Message, "no path rows") {
		t.Fatalf("rows of a generation without them: %v", err)
	}
}

// sameAsPathInfo checks every row against `nix path-info --json`.
func sameAsPathInfo(t *testing.T, rs *nixstore.Rows, infos map[string]nixtest.PathInfo) {
	t.Helper()
	if len(rs.Paths) != len(infos) {
		t.Errorf("%d rows, nix path-info lists %d paths", len(rs.Paths), len(infos))
	}
	for _, r := range rs.Paths {
		pi, ok := infos[r.Path]
		if !ok {
			t.Errorf("row %s: not in nix path-info", r.Path)
			continue
		}
		hash, err := nixstore.NormalizeSHA256(pi.NarHash)
		if err != nil {
			t.Fatal(err)
		}
		sigs, wantSigs := slices.Sorted(slices.Values(r.Sigs)), slices.Sorted(slices.Values(pi.Signatures))
		refs := pi.References
		if refs == nil {
			refs = []string{}
		}
		gotRefs := r.References
		if gotRefs == nil {
			gotRefs = []string{}
		}
		slices.Sort(refs)
		if hash != r.NarHash || pi.NarSize != r.NarSize || pi.Deriver != r.Deriver || pi.CA != r.CA ||
			!slices.Equal(sigs, wantSigs) || !reflect.DeepEqual(gotRefs, refs) || pi.RegistrationTime != r.RegistrationTime ||
			pi.Ultimate != r.Ultimate {
			t.Errorf("row %s differs from nix path-info:\n row %+v\ninfo %+v", r.Path, r, pi)
		}
	}
}
