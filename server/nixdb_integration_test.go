//go:build integration

package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/internal/apiserve"
	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/nixstore"
	"github.com/strata-nix/strata/server/replica"
	"github.com/strata-nix/strata/snapshot/btrfs"
)

// TestNixDBEndpoint: GET /v1/generations/N/nixdb serves the generation's
// Nix DB: zstd, headers that say what the decompressed file is (sha256,
// size, valid paths with the root, schema, root path), made once and kept
// in the generation's state directory; the file, installed into an empty
// store, makes Nix report every path exactly as the central store's Nix
// does (signatures included), and the generation's root refers to them
// all. An ETag answers a repeated request with 304; an unknown generation
// is a 404.
func TestNixDBEndpoint(t *testing.T) {
	sv := newAPICentral(t)
	c, g1, cl := sv.central, sv.g1, sv.cl
	ctx := context.Background()

	body, d, err := cl.NixDB(ctx, g1)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(body)
	body.Close()
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	want := c.store.PathInfos(t)
	root := nixstore.RootOf("/nix/store", g1)
	if hex.EncodeToString(sum[:]) != d.SHA256 || int64(len(b)) != d.Size || d.Paths != len(want)+1 || d.Schema != 10 ||
		d.Root != root.Path || d.Compressed <= 0 || d.Compressed >= d.Size {
		t.Fatalf("answer %+v for %d bytes with sha256 %x; central store has %d paths", d, len(b), sum, len(want))
	}
	for _, f := range []string{nixDBFile, nixDBInfo} {
		if _, err := os.Stat(filepath.Join(c.cfg.StateDir, "generations", "1", f)); err != nil {
			t.Fatalf("not kept: %v", err)
		}
	}
	// Served again from what was kept: the same bytes.
	body, d2, err := cl.NixDB(ctx, g1)
	if err != nil {
		t.Fatal(err)
	}
	b2, _ := io.ReadAll(body)
	body.Close()
	if d2 != d || string(b2) != string(b) {
		t.Fatal("second answer differs")
	}
	req, _ := http.NewRequest(http.MethodGet, sv.url+"/v1/generations/1/nixdb", nil)
	req.Header.Set("If-None-Match", `"nixdb-`+d.SHA256+`"`)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotModified {
		t.Fatalf("If-None-Match: %s", resp.Status)
	}
	_, _, err = cl.NixDB(ctx, 99)
	var se *api.StatusError
	if !errors.As(err, &se) || se.Code != http.StatusNotFound {
		t.Fatalf("unknown generation: %v", err)
	}

	// Installed into an empty store holding the files: Nix sees the
	// central store's paths as the central store's Nix does.
	bs := nixtest.New(t, filepath.Join(t.TempDir(), "root"))
	store := filepath.Join(bs.NixRoot(), "store")
	os.MkdirAll(store, 0o755)
	copyTree(t, filepath.Join(c.store.NixRoot(), "store"), store)
	os.WriteFile(filepath.Join(store, filepath.Base(root.Path)), root.Content, 0o444)
	err = nixstore.InstallDB(ctx, filepath.Join(bs.NixRoot(), "var", "nix", "db"), strings.NewReader(string(b)),
		nixstore.DBFile{SHA256: d.SHA256, Size: d.Size, Paths: d.Paths, Schema: d.Schema, Root: d.Root}, nixstore.InstallOptions{})
	if err != nil {
		t.Fatal(err)
	}
	got := bs.PathInfos(t)
	if _, ok := got[root.Path]; !ok {
		t.Fatal("root not valid")
	}
	delete(got, root.Path)
	if len(got) != len(want) {
		t.Errorf("%d paths on the builder, %d on the central store", len(got), len(want))
	}
	for p, w := range want {
		g := got[p]
		slices.Sort(g.Signatures)
		slices.Sort(w.Signatures)
		if !reflect.DeepEqual(g, w) {
			t.Errorf("nix path-info %s:\nbuilder %+v\ncentral %+v", p, g, w)
		}
	}
	if refs := strings.Fields(bs.Run(t, "nix-store", "--query", "--references", root.Path)); len(refs) != len(want) {
		t.Fatalf("root refers to %d paths, want %d", len(refs), len(want))
	}
}

// TestReplicaServesSameNixDB: a replica makes generation N's Nix DB from
// the snapshot it received, and it is the primary's byte for byte (same
// sha256, size, paths and root), so a builder may take it from either.
func TestReplicaServesSameNixDB(t *testing.T) {
	prim := newPrimary(t, 3)
	made := prim.c.store.Fill(t)
	sk, _ := nixtest.GenerateKey(t, "central-1")
	prim.c.store.Sign(t, sk, made...)
	publish(t, prim.srv.Server)
	prim.add(t, "two", "2\n")
	_, rs, p := prim.replica(t)
	if res := syncOnce(t, p); len(res.Received) != 2 {
		t.Fatalf("received %+v", res.Received)
	}
	for _, id := range []uint64{1, 2} {
		_, a, err := prim.srv.NixDB(id)
		if err != nil {
			t.Fatal(err)
		}
		_, b, err := rs.NixDB(id)
		if err != nil {
			t.Fatal(err)
		}
		a.Compressed, b.Compressed = 0, 0
		if a != b || a.Paths < 5 {
			t.Errorf("generation %d: the replica's nix db %+v, the primary's %+v", id, b, a)
		}
	}
}

// lyingPrimary is the primary's API claiming that generation lie has the
// registration of generation like (its manifest and its delta from like
// say so), while its snapshot stream is the real one.
type lyingPrimary struct {
	replica.Primary
	lie, like uint64
}

func (p lyingPrimary) Generations(ctx context.Context) (api.GenerationList, error) {
	l, err := p.Primary.Generations(ctx)
	var sum string
	for _, g := range l.Generations {
		if g.ID == p.like {
			sum = g.RegistrationSHA256
		}
	}
	for i := range l.Generations {
		if l.Generations[i].ID == p.lie {
			l.Generations[i].RegistrationSHA256 = sum
		}
	}
	return l, err
}

func (p lyingPrimary) Delta(ctx context.Context, from, to uint64) (api.Delta, error) {
	if from == p.like && to == p.lie {
		return api.Delta{From: from, To: to, Removed: []string{}}, nil
	}
	return p.Primary.Delta(ctx, from, to)
}

// TestReplicaNixDBMatchesRegistration: a replica serves a generation's Nix
// DB only when the received snapshot's own DB gives the registration it
// checked against the primary's manifest. A generation made live from a
// registration (the primary's delta, staged) that the snapshot's DB does
// not give gets no DB (409 naming both sha256s), and builders import from
// the checked registration; the generations whose DB agrees still get
// theirs.
func TestReplicaNixDBMatchesRegistration(t *testing.T) {
	prim := newPrimary(t, 10)
	prim.add(t, "one", "1\n")
	prim.add(t, "two", "2\n")
	re, rs, _ := prim.replica(t)
	b, err := btrfs.NewReplica(re.snapDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	p := replica.New(replica.Options{Backend: b, Target: rs.Server, StateDir: re.cfg.StateDir, Registry: prometheus.NewRegistry(),
		Primary: lyingPrimary{replica.Fixed(api.NewClient(prim.api.URL, "primary-token"), prim.api.URL), 2, 1}})
	if res := syncOnce(t, p); len(res.Received) != 2 || res.Received[1].From != 1 {
		t.Fatalf("received %+v, want 1, then 2 from 1", res.Received)
	}
	g1, _ := rs.Generation(1)
	g2, _ := rs.Generation(2)
	if g2.RegistrationSHA256 != g1.RegistrationSHA256 {
		t.Fatalf("generation 2 went live with registration %s, want the lie (generation 1's %s)", g2.RegistrationSHA256, g1.RegistrationSHA256)
	}
	if _, d, err := rs.NixDB(1); err != nil || d.Paths < 2 {
		t.Fatalf("generation 1's nix db: %+v %v", d, err)
	}
	_, d, err := rs.NixDB(2)
	if !errors.Is(err, nixstore.ErrNotRegistration) || !strings.Contains(err.Error(), g2.RegistrationSHA256) {
		t.Fatalf("generation 2's nix db: %+v %v, want refused naming its registration %s", d, err, g2.RegistrationSHA256)
	}
	for _, f := range []string{nixDBFile, nixDBInfo} {
		if _, err := os.Stat(filepath.Join(re.cfg.StateDir, "generations", "2", f)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s of the refused generation: %v, want none", f, err)
		}
	}
	hs := httptest.NewServer(rs.Handler(apiserve.NewToken(""), nil, func() any { return nil }))
	defer hs.Close()
	_, _, err = api.NewClient(hs.URL, "").NixDB(context.Background(), 2)
	var se *api.StatusError
	if !errors.As(err, &se) || se.Code != http.StatusConflict {
		t.Fatalf("GET /v1/generations/2/nixdb: %v, want 409", err)
	}
}
