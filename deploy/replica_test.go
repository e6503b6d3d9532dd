//go:build deploy

package deploy

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/nfsraw"
	"github.com/strata-nix/strata/internal/testenv"
)

// exportWalk walks /gen/id of the NFS export at addr and returns one line
// per entry: path, type, mode, owner, size, link target, sha256 of a file.
func exportWalk(t *testing.T, addr string, id int) string {
	t.Helper()
	c, err := nfsraw.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetTimeout(30 * time.Second)
	st, root, err := c.Mount(fmt.Sprintf("/gen/%d", id))
	if err != nil || st != 0 {
		t.Fatalf("MOUNT /gen/%d at %s: status %d, %v", id, addr, st, err)
	}
	st, a, err := c.Getattr(root)
	if err != nil || st != 0 {
		t.Fatalf("GETATTR /gen/%d at %s: status %d, %v", id, addr, st, err)
	}
	lines := []string{fmt.Sprintf("/ %d %o %d:%d", a.Type, a.Mode, a.UID, a.GID)}
	var walk func(fh []byte, prefix string)
	walk = func(fh []byte, prefix string) {
		ents, err := c.ListAll(fh, 0, 0, 32768)
		if err != nil {
			t.Fatalf("list %s at %s: %v", prefix, addr, err)
		}
		for _, e := range ents {
			if e.Name == "." || e.Name == ".." {
				continue
			}
			p := prefix + "/" + e.Name
			line := fmt.Sprintf("%s %d %o %d:%d %d", p, e.Attr.Type, e.Attr.Mode, e.Attr.UID, e.Attr.GID, e.Attr.Size)
			switch e.Attr.Type {
			case 1:
				st, data, err := c.ReadAll(e.FH)
				if err != nil || st != 0 {
					t.Fatalf("read %s at %s: status %d, %v", p, addr, st, err)
				}
				sum := sha256.Sum256(data)
				line += " " + hex.EncodeToString(sum[:])
			case 5:
				st, target, err := c.Readlink(e.FH)
				if err != nil || st != 0 {
					t.Fatalf("readlink %s at %s: status %d, %v", p, addr, st, err)
				}
				line += " -> " + target
			case 2:
				walk(e.FH, p)
			}
			lines = append(lines, line)
		}
	}
	walk(root, "")
	return strings.Join(lines, "\n")
}

// TestAnsibleReplicaNspawn deploys a primary and a btrfs replica of it with
// the strata_server role (deploy/testdata/replica.yml) to two booted
// systemd-nspawn containers, each with its own btrfs filesystem, and checks
// that the replica, running under the shipped strata-server.service (its
// capability bounding set, ProtectSystem=strict, the role's layout drop-in),
// receives the primary's generations (the first whole, the next
// incrementally) and serves them over NFS as the primary does. The central
// store is laid out as a real one: the store dir group nixbld (30000) mode
// 1775, store paths read-only, a user's profile dir: btrfs receive must
// chown, write into 0555 directories and chmod/utimes inodes root does not
// own. Before that, the role refuses a replica without its token, naming
// strata_replica_token.
func TestAnsibleReplicaNspawn(t *testing.T) {
	fs, bin, br, key, pub := nspawnHost(t)
	pmnt, st := centralStore(t)
	nixRoot := st.NixRoot()
	testenv.Run(t, "chown", "0:30000", filepath.Join(nixRoot, "store"))
	testenv.Run(t, "chmod", "1775", filepath.Join(nixRoot, "store"))
	profile := filepath.Join(nixRoot, "var", "nix", "profiles", "per-user", "alice")
	os.MkdirAll(profile, 0o755)
	os.WriteFile(filepath.Join(profile, "channels"), []byte("alice's\n"), 0o444)
	testenv.Run(t, "chown", "-R", "1000:1000", profile)
	rmnt := testenv.LoopBtrfs(t, "1G")

	primary := boot(t, fs, br, 2, key, pub, "--bind="+pmnt+":/srv/strata", "--system-call-filter=open_by_handle_at")
	repl := boot(t, fs, br, 3, key, pub, "--bind="+rmnt+":/srv/strata", "--system-call-filter=open_by_handle_at")
	hostIP, token := br.prefix+"1", "tok-"+randHex(8)
	dir := t.TempDir()
	inv := filepath.Join(dir, "inventory.ini")
	os.WriteFile(inv, []byte("[strata_servers]\n"+hostLine("primary", primary, "")+"\n[strata_replicas]\n"+hostLine("replica", repl, "")), 0o600)
	p := &play{t: t, dir: dir, inv: inv, repoRoot: repoRoot(t), hosts: []*container{primary, repl},
		playbook: filepath.Join(repoRoot(t), "deploy", "testdata", "replica.yml"),
		base:     map[string]any{"strata_binary": bin, "strata_token": token, "strata_allow": []string{hostIP + "/32"}}}
	t.Cleanup(func() {
		if t.Failed() {
			fmt.Print(p.journals())
		}
	})

	// No replica token: the role stops before the unit starts, naming the
	// variable.
	out, r, err := p.exec("replica without strata_replica_token: refused", map[string]any{"strata_replica_token": ""})
	if err == nil || r["replica"].failed == 0 || !strings.Contains(out, "strata_replica_token: /etc/strata/credentials/replica-token (the daemon's replica.token_file) is missing or empty") {
		t.Fatalf("replica without a token: %v %+v, want the role to fail naming strata_replica_token\n%s", err, r, tail(out, 40))
	}
	if s := repl.prop(t, "strata-server.service", "ActiveState"); s == "active" || s == "activating" {
		t.Fatalf("replica unit %s after the refused play", s)
	}

	p.run("primary and replica", nil)
	p.runUnchanged()
	const unit = "strata-server.service"
	dropin := repl.sh(t, "cat /etc/systemd/system/strata-server.service.d/50-layout.conf")
	if !strings.Contains(dropin+"\n", "\nReadWritePaths=/srv/strata/snaps\n") || !strings.Contains(dropin, "\nRequiresMountsFor=/srv/strata/snaps\n") {
		t.Fatalf("replica's layout drop-in: want /srv/strata/snaps writable and no store root:\n%s", dropin)
	}
	caps := repl.prop(t, unit, "CapabilityBoundingSet")
	fmt.Printf("--- replica unit: CapabilityBoundingSet=%s\n", caps)

	serving := func(c *container, id int) {
		t.Helper()
		want := fmt.Sprintf("serving generation %d", id)
		waitFor(t, 90*time.Second, c.name+": STATUS="+want, func() (bool, string) {
			s := c.prop(t, unit, "StatusText")
			return s == want, s + "; " + c.prop(t, unit, "ActiveState")
		})
	}
	serving(primary, 1)
	serving(repl, 1)
	pw, rw := exportWalk(t, primary.addr+":2049", 1), exportWalk(t, repl.addr+":2049", 1)
	if first, _, _ := strings.Cut(rw, "\n"); pw != rw || !strings.HasPrefix(first, "/ 2 ") || !strings.HasSuffix(first, "1775 0:30000") {
		t.Fatalf("generation 1 over NFS: the replica serves\n%s\nthe primary\n%s", rw, pw)
	}
	// The whole received snapshot (the export shows its store only): every
	// inode with its type, mode, owner, size, mtime and link target.
	tree := func(c *container, id int) string {
		return c.sh(t, fmt.Sprintf("cd /srv/strata/snaps/strata-%d && find . -printf '%%p %%y %%m %%U:%%G %%s %%T@ %%l\\n' | LC_ALL=C sort", id))
	}
	if pt, rt := tree(primary, 1), tree(repl, 1); pt != rt || !strings.Contains(rt, "./var/nix/profiles/per-user/alice d 755 1000:1000 ") {
		t.Fatalf("snapshot 1: the replica received\n%s\nthe primary has\n%s", rt, pt)
	}

	// A new path on the primary, published: the replica receives it
	// incrementally under the same unit.
	path := st.AddText(t, "after-deploy", "second generation\n")
	req, _ := http.NewRequest("POST", "http://"+primary.addr+":7480/v1/publish", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	res, err := http.DefaultClient.Do(req)
	if err != nil || res.StatusCode != http.StatusOK {
		t.Fatalf("publish on the primary: %v %v", err, res)
	}
	res.Body.Close()
	// The publish answered once generation 2 was live on the primary.
	serving(repl, 2)
	pw, rw = exportWalk(t, primary.addr+":2049", 2), exportWalk(t, repl.addr+":2049", 2)
	if pw != rw || !strings.Contains(rw, "/"+filepath.Base(path)+" ") {
		t.Fatalf("generation 2 over NFS: the replica serves\n%s\nthe primary\n%s", rw, pw)
	}
	if pt, rt := tree(primary, 2), tree(repl, 2); pt != rt {
		t.Fatalf("snapshot 2: the replica received\n%s\nthe primary has\n%s", rt, pt)
	}
	j := repl.sh(t, "journalctl -b --no-pager -o cat -u "+unit)
	if l := grepLines(j, `msg="snapshot received"`); !strings.Contains(l, " id=2 from=1 ") {
		t.Fatalf("replica journal lacks the incremental receive of generation 2:\n%s", tail(j, 40))
	}
	fmt.Printf("--- replica: generations 1 (whole) and 2 (incremental) received under %s and served over NFS as the primary serves them (%d entries); journal:\n%s\n",
		unit, strings.Count(rw, "\n")+1, grepLines(j, "snapshot received", "Started"))
}
