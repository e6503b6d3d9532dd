//go:build vm

package vm

import (
	"context"
	"encoding/json"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
)

// TestNixVersions: a central store written by Debian trixie's Nix 2.26
// (content-addressed `nix-store --add` paths, a built derivation, a built
// floating content-addressed derivation with the ca-derivations feature,
// every path signed with `nix store sign`) is published by `strata server`
// on the host; `strata builder` runs in a 6.12 guest (kernel NFS client)
// with trixie's Nix 2.26 (ca-derivations on) and with bookworm's 2.8. On
// each, after the first start and after a rotation to a generation that adds
// a signed path, `nix path-info --json --all` on the builder prints for every
// path exactly what it prints on the central store (signatures, ca, NAR
// hash and size, deriver, references, registration time, ultimate), and
// `nix-store --verify --check-contents` is clean. The empty builder's first
// start installs the generation's Nix DB (the log says so, and no fallback
// to importing rows); the rotation imports the new rows, never falling back
// to --load-db or to the registration text. On 2.8 the floating-CA .drv (which 2.8's
// --load-db refuses) is valid like every other path.
func TestNixVersions(t *testing.T) {
	testenv.RequireRoot(t)
	trixie := nixtest.TrixieBin(t)
	strata := buildStatic(t, "github.com/strata-nix/strata/cmd/strata")

	// Each builder gets its own central store and server: the first
	// guest publishes generation 2.
	setup := func(t *testing.T) (string, string, string, int, int, map[string]nixtest.PathInfo, map[string]nixtest.PathInfo) {
		t.Helper()
		mnt := testenv.LoopBtrfs(t, "1G")
		testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(mnt, "nix"))
		central := nixtest.NewWith(t, nixtest.Store{Root: mnt, Bin: trixie, Features: []string{"ca-derivations"}})
		if v := central.Version(t); !strings.HasPrefix(v, "2.26.") {
			t.Fatalf("central store runs nix %s, want 2.26", v)
		}
		made := central.Fill(t)
		floating := central.BuildFloatingCA(t, "floating", `mkdir $out; echo floating > $out/x; echo $in0 > $out/ref`, made[1])
		central.Build(t, "on-floating", `mkdir $out; echo $in0 > $out/ref`, floating)
		sk, _ := nixtest.GenerateKey(t, "central-1")
		signAll := func() map[string]nixtest.PathInfo {
			var all []string
			for p := range central.PathInfos(t) {
				all = append(all, p)
			}
			slices.Sort(all)
			central.Sign(t, sk, all...)
			return central.PathInfos(t)
		}
		gen1 := signAll()
		var floatingDrv string
		for p, in := range gen1 {
			if strings.HasSuffix(p, "-floating.drv") && !strings.HasSuffix(p, "-on-floating.drv") {
				floatingDrv = p
			}
			if len(in.Signatures) == 0 {
				t.Fatalf("central path %s unsigned", p)
			}
		}
		if floatingDrv == "" {
			t.Fatal("no floating-CA .drv in the central store")
		}
		realisation := central.Run(t, "nix", "realisation", "info", "--json", floatingDrv+"^out")
		if !strings.Contains(realisation, "-floating") {
			t.Fatalf("central realisation of %s^out: %s", floatingDrv, realisation)
		}

		api, nfsPort := freePort(t), freePort(t)
		startStrataServer(t, strata, mnt, central, api, nfsPort)
		waitGenerations(t, api, 1)
		// Generation 2, published from the guest, adds a signed path.
		later := central.AddText(t, "later", "added for generation 2\n")
		gen2 := signAll()
		if len(gen2[later].Signatures) == 0 || len(gen2) != len(gen1)+1 {
			t.Fatalf("generation 2 fixture: %d paths (want %d), later signed %v", len(gen2), len(gen1)+1, gen2[later].Signatures)
		}
		return floatingDrv, realisation, later, api, nfsPort, gen1, gen2
	}
	for _, v := range []struct {
		name, bin, version, features string
		trixie                       bool
		checks                       int
	}{
		{"nix-2.26", NixTrixieBin, "2.26.", "nix-command ca-derivations", true, 13},
		{"nix-2.8", "/usr/bin", "2.8.", "nix-command", false, 12},
	} {
		t.Run(v.name, func(t *testing.T) {
			floatingDrv, realisation, later, api, nfsPort, gen1, gen2 := setup(t)
			res := Boot(context.Background(), t, Guest{
				Kernel:    Kernel612,
				Nix:       true,
				NixTrixie: v.trixie,
				Env: map[string]string{"API": strconv.Itoa(api), "NFS": strconv.Itoa(nfsPort), "NIXBIN": v.bin,
					"WANTVER": v.version, "FEATURES": v.features, "FLOATING": floatingDrv, "LATER": later, "REALISATIONS": realisationsEnv(v.trixie)},
				Files: []File{
					{Guest: "/bin/strata", Host: strata},
					{Guest: "/token", Data: []byte("vm-test-token\n")},
				},
				Script:  checkFuncs + nixVersionsScript,
				Timeout: 15 * time.Minute,
			})
			requireChecks(t, res, v.checks)
			if v.trixie {
				// The realisation as the central store has it
				// (output path, signatures, dependencies).
				_, rest, _ := strings.Cut(res.Output, "REALISATION-BEGIN\n")
				body, _, _ := strings.Cut(rest, "REALISATION-END")
				var got, want any
				if err := json.Unmarshal([]byte(strings.TrimSpace(body)), &got); err != nil {
					t.Fatalf("guest realisation: %v: %q", err, body)
				}
				if err := json.Unmarshal([]byte(realisation), &want); err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(got, want) {
					t.Fatalf("realisation of %s^out: builder %v, central %v", floatingDrv, got, want)
				}
				t.Logf("compare: realisation %s^out identical: %s", floatingDrv, realisation)
			}
			for _, g := range []struct {
				label string
				want  map[string]nixtest.PathInfo
			}{{"gen1", gen1}, {"gen2", gen2}} {
				got := pathInfoBlock(t, res.Output, g.label)
				samePathInfos(t, v.name+" builder, "+g.label, got, g.want)
			}
		})
	}
}

func realisationsEnv(on bool) string {
	if on {
		return "1"
	}
	return ""
}

// pathInfoBlock parses the `nix path-info --json` the guest printed
// between PATHINFO-BEGIN label and PATHINFO-END.
func pathInfoBlock(t *testing.T, out, label string) map[string]nixtest.PathInfo {
	t.Helper()
	_, rest, ok := strings.Cut(out, "PATHINFO-BEGIN "+label+"\n")
	if !ok {
		t.Fatalf("guest printed no path-info for %s", label)
	}
	body, _, ok := strings.Cut(rest, "PATHINFO-END")
	if !ok {
		t.Fatalf("guest path-info for %s is cut short", label)
	}
	infos, err := nixtest.ParsePathInfos(strings.TrimSpace(body))
	if err != nil {
		t.Fatal(err)
	}
	return infos
}

// gcRootPath names the builder's per-generation GC root path.
var gcRootPath = regexp.MustCompile(`^/nix/store/[0-9a-z]{32}-strata-generation-[0-9]+$`)

// samePathInfos fails unless every central path is on the builder with the
// same fields; builder paths not in want (its own) are reported too.
func samePathInfos(t *testing.T, what string, got, want map[string]nixtest.PathInfo) {
	t.Helper()
	var sigs, cas int
	for p, w := range want {
		g, ok := got[p]
		if !ok {
			t.Errorf("%s: %s not valid", what, p)
			continue
		}
		slices.Sort(g.Signatures)
		slices.Sort(w.Signatures)
		slices.Sort(g.References)
		slices.Sort(w.References)
		if !reflect.DeepEqual(g, w) {
			t.Errorf("%s: %s differs:\nbuilder %+v\ncentral %+v", what, p, g, w)
			continue
		}
		sigs += len(g.Signatures)
		if g.CA != "" {
			cas++
		}
	}
	for p, g := range got {
		if _, ok := want[p]; ok {
			continue
		}
		// The agent's own GC root path for the generation (builder/gcroot.go)
		// is the one builder path the central store does not have: it must
		// refer to every path of the generation, or a GC could take them.
		if gcRootPath.MatchString(p) {
			for w := range want {
				if !slices.Contains(g.References, w) {
					t.Errorf("%s: GC root %s does not refer to generation path %s", what, p, w)
				}
			}
			t.Logf("%s: GC root %s refers to all %d generation paths", what, p, len(want))
			continue
		}
		t.Errorf("%s: %s valid on the builder but not in the central store", what, p)
	}
	t.Logf("compare: %s: %d paths identical to the central store's nix path-info (%d signatures, %d with ca)", what, len(want), sigs, cas)
}

const nixVersionsScript = `
trap 'echo "--- builder log"; tail -30 /builder.log 2>/dev/null' EXIT
export PAGER=cat PATH=$NIXBIN:$PATH
export NIX_CONFIG="experimental-features = $FEATURES"
S=unix:/var/lib/strata/builder/api.sock
mkdir -p /nix /var/lib/strata /etc/strata
mount -t tmpfs nix /nix && mkdir -p /nix/store /nix/var/nix
mount -t tmpfs state /var/lib/strata
nix-store --version
check "nix is $WANTVER" sh -c "nix-store --version | grep -q 'Nix) $WANTVER'"
cat > /etc/strata/builder.yaml <<EOF2
server:
  api: http://10.0.2.2:$API
  nfs: 10.0.2.2:$NFS
nix:
  bin: $NIXBIN/nix-store
rotate:
  check_interval: 1h
EOF2
strata builder --config /etc/strata/builder.yaml > /builder.log 2>&1 &
BPID=$!
ready() { strata status --api $S --json 2>/dev/null | grep -q '"ready": true'; }
i=0; while ! ready && [ $i -lt 180 ]; do sleep 1; i=$((i+1)); done
check "builder ready on generation 1" sh -c "strata status --api $S --json | grep -q '\"generation\": 1,'"
check "floating-CA .drv valid" nix-store --check-validity $FLOATING
if [ -n "$REALISATIONS" ]; then
  check "realisation of the floating-CA output imported" sh -c "nix realisation info --json '$FLOATING^out' > /tmp/real"
  echo "REALISATION-BEGIN"; cat /tmp/real; echo; echo "REALISATION-END"
fi
echo "PATHINFO-BEGIN gen1"; nix path-info --json --all 2>/tmp/pi.err; echo; echo "PATHINFO-END"; cat /tmp/pi.err
check "nix-store --verify --check-contents (generation 1)" sh -c "nix-store --verify --check-contents 2>&1 | tee /tmp/v; ! grep -qiE 'disappeared|modified|error' /tmp/v"
check "publish generation 2" sh -c "strata publish --api 10.0.2.2:$API --token-file /token"
check "forced rotation" strata builder rotate --api $S
check "generation 2" sh -c "strata status --api $S --json | grep -q '\"generation\": 2,'"
check "new path valid" nix-store --check-validity $LATER
echo "PATHINFO-BEGIN gen2"; nix path-info --json --all 2>/tmp/pi.err; echo; echo "PATHINFO-END"; cat /tmp/pi.err
check "nix-store --verify --check-contents (generation 2)" sh -c "nix-store --verify --check-contents 2>&1 | tee /tmp/v; ! grep -qiE 'disappeared|modified|error' /tmp/v"
check "first start installed generation 1's Nix DB (no fallback to rows)" sh -c "grep -q 'msg=\"installed the generation.s nix db\" generation=1 ' /builder.log && ! grep -qE 'importing rows|importing the generation.s rows' /builder.log"
check "rotation imported generation 2's rows, never --load-db or the registration" sh -c "grep -qE 'msg=rotated from=1 to=2 imported=[1-9]' /builder.log && ! grep -q 'load-db instead' /builder.log && ! grep -q 'no path rows' /builder.log"
check "builder still running" kill -0 $BPID
`
