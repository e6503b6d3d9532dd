//go:build deploy

package deploy

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/nfsraw"
)

// play runs ansible-playbook testdata/site.yml against the containers with
// extra variables, prints its recap and returns each host's counts.
type play struct {
	t        *testing.T
	dir      string
	inv      string
	playbook string
	base     map[string]any
	runs     int
	repoRoot string
	hosts    []*container
}

// hostLine is c's inventory line as name, in ansible's INI format.
func hostLine(name string, c *container, extra string) string {
	return fmt.Sprintf("%s ansible_host=%s ansible_user=root ansible_ssh_private_key_file=%s ansible_python_interpreter=/usr/bin/python3 "+
		"ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null' %s\n", name, c.addr, c.key, extra)
}

func newPlay(t *testing.T, server, builder *container, base map[string]any) *play {
	dir := t.TempDir()
	inv := filepath.Join(dir, "inventory.ini")
	os.WriteFile(inv, []byte("[strata_servers]\n"+hostLine("server", server, "")+"\n[strata_builders]\n"+hostLine("builder", builder, "")), 0o600)
	return &play{t: t, dir: dir, inv: inv, base: base, repoRoot: repoRoot(t), hosts: []*container{server, builder},
		playbook: filepath.Join(repoRoot(t), "deploy", "testdata", "site.yml")}
}

// newPlayFor is a play with one host in group.
func newPlayFor(t *testing.T, group string, c *container, extra string, base map[string]any) *play {
	dir := t.TempDir()
	inv := filepath.Join(dir, "inventory.ini")
	os.WriteFile(inv, []byte("["+group+"]\n"+hostLine(c.name, c, extra)), 0o600)
	return &play{t: t, dir: dir, inv: inv, base: base, repoRoot: repoRoot(t), hosts: []*container{c},
		playbook: filepath.Join(repoRoot(t), "deploy", "testdata", "site.yml")}
}

func (p *play) run(what string, vars map[string]any) map[string]recap {
	t := p.t
	t.Helper()
	out, r, err := p.exec(what, vars)
	if err != nil || len(r) != len(p.hosts) {
		t.Fatalf("ansible-playbook (%s): %v\n%s\n%s", what, err, tail(out, 80), p.journals())
	}
	for h, c := range r {
		if c.failed != 0 || c.unreachable != 0 {
			t.Fatalf("ansible-playbook (%s): %s failed=%d unreachable=%d\n%s\n%s", what, h, c.failed, c.unreachable, tail(out, 80), p.journals())
		}
	}
	return r
}

// runUnchanged runs the play again with the same variables: an idempotent
// role changes nothing on any host the second time.
func (p *play) runUnchanged() {
	p.t.Helper()
	for h, c := range p.run("second apply, must be changed=0", nil) {
		if c.changed != 0 {
			p.t.Errorf("second run: %s changed=%d, want 0", h, c.changed)
		}
	}
}

// exec runs ansible-playbook, prints its recap, and returns its output,
// each host's counts and its error.
func (p *play) exec(what string, vars map[string]any) (string, map[string]recap, error) {
	all := map[string]any{}
	for k, v := range p.base {
		all[k] = v
	}
	for k, v := range vars {
		all[k] = v
	}
	ev, _ := json.Marshal(all)
	p.runs++
	start := time.Now()
	cmd := exec.Command("ansible-playbook", "-i", p.inv, "-e", string(ev), p.playbook)
	cmd.Env = append(os.Environ(), "ANSIBLE_ROLES_PATH="+filepath.Join(p.repoRoot, "ansible", "roles"),
		"ANSIBLE_HOST_KEY_CHECKING=False", "ANSIBLE_NOCOLOR=1", "ANSIBLE_HOME="+filepath.Join(p.dir, "home"),
		"ANSIBLE_LOCAL_TEMP="+filepath.Join(p.dir, "tmp"), "ANSIBLE_RETRY_FILES_ENABLED=False")
	out, err := cmd.CombinedOutput()
	fmt.Printf("--- ansible-playbook run %d (%s), %s:\n%s\n", p.runs, what, time.Since(start).Round(time.Second), recapText(string(out)))
	return string(out), parseRecap(string(out)), err
}

// journals is the strata units' journal of every container, for failures.
func (p *play) journals() string {
	var b strings.Builder
	for _, c := range p.hosts {
		out, _ := c.try("systemctl status --no-pager strata-server strata-builder; journalctl -b --no-pager -n 80 -u strata-server -u strata-builder")
		fmt.Fprintf(&b, "--- journal of %s (%s):\n%s\n", c.name, c.addr, out)
	}
	return b.String()
}

// waitFor polls cond every half second for at most d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s (last: %s)", what, d, state)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// TestAnsibleNspawn applies the strata_server and strata_builder roles with
// Debian's ansible-playbook over SSH to two booted systemd-nspawn containers
// (a cached mmdebstrap bookworm rootfs; the server's /nix is a real btrfs
// subvolume holding a real Nix store), and checks what an operator would.
func TestAnsibleNspawn(t *testing.T) {
	fs, bin, br, key, pub := nspawnHost(t)
	mnt, _ := centralStore(t)

	// nspawn's own seccomp filter refuses open_by_handle_at (a container
	// escape); the NFS export needs it.
	server := boot(t, fs, br, 2, key, pub, "--bind="+mnt+":/srv/strata", "--system-call-filter=open_by_handle_at")
	builder := boot(t, fs, br, 3, key, pub)
	hostIP, token := br.prefix+"1", "tok-"+randHex(8)
	p := newPlay(t, server, builder, map[string]any{"strata_binary": bin, "strata_token": token,
		"strata_allow": []string{hostIP + "/32", builder.addr + "/32"}})

	t.Cleanup(func() {
		if t.Failed() {
			fmt.Print(p.journals())
		}
	})

	// Two runs: the second changes nothing.
	first := p.run("first apply", nil)
	if first["server"].changed == 0 || first["builder"].changed == 0 {
		t.Fatalf("first run changed nothing: %+v", first)
	}
	p.runUnchanged()

	const unit = "strata-server.service"
	if s := server.prop(t, unit, "ActiveState"); s != "active" {
		t.Fatalf("server unit %s, want active", s)
	}
	// Active only after READY=1: the daemon logged its NFS and API
	// listeners bound before systemd logged the unit started.
	journal := server.sh(t, "journalctl -b -o short-monotonic --no-pager -u "+unit)
	iAPI, iNFS, iStarted := strings.Index(journal, "api listening"), strings.Index(journal, "nfs export listening"), strings.Index(journal, "Started strata-server.service")
	if iStarted < 0 {
		iStarted = strings.Index(journal, "Started strata server")
	}
	if iAPI < 0 || iNFS < 0 || iStarted < 0 || iAPI > iStarted || iNFS > iStarted {
		t.Fatalf("journal does not show the listeners up before systemd's \"Started\":\n%s", journal)
	}
	waitFor(t, 20*time.Second, "STATUS=serving generation 1", func() (bool, string) {
		s := server.prop(t, unit, "StatusText")
		return s == "serving generation 1", s
	})
	out := server.sh(t, "strata status --api unix:/var/lib/strata/server/api.sock")
	if !strings.Contains(out, "server") {
		t.Fatalf("strata status through the unit's socket: %q", out)
	}
	for path, mode := range map[string]string{"/etc/strata/credentials/api-token": "600", "/etc/systemd/system/strata-server.service": "600",
		"/etc/strata/server.yaml": "600", "/etc/strata/credentials": "700", "/var/lib/strata/server": "700"} {
		if got := server.sh(t, "stat -c %a "+path); got != mode {
			t.Errorf("%s: mode %s, want %s", path, got, mode)
		}
	}
	// The token reached the daemon through LoadCredential= and %d.
	publish := func(tok string) int {
		req, _ := http.NewRequest("POST", "http://"+server.addr+":7480/v1/publish", nil)
		if tok != "" {
			req.Header.Set("Authorization", "Bearer "+tok)
		}
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		return res.StatusCode
	}
	if c1, c2 := publish(""), publish(token); c1 != http.StatusUnauthorized || c2 != http.StatusOK {
		t.Fatalf("publish over TCP: without token HTTP %d (want 401), with the role's token HTTP %d (want 200)", c1, c2)
	}
	mount := func() error {
		c, err := nfsraw.Dial(server.addr + ":2049")
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetTimeout(5 * time.Second)
		status, _, err := c.Mount("/gen/1")
		if err == nil && status != 0 {
			err = fmt.Errorf("MOUNT status %d", status)
		}
		return err
	}
	if err := mount(); err != nil {
		t.Fatalf("MOUNT /gen/1 from the host (in nfs.allow): %v", err)
	}

	// nfs.allow changed through the role: a reload, same process, and the
	// host is refused from then on.
	pid := server.prop(t, unit, "MainPID")
	r := p.run("nfs.allow without the host: reload", map[string]any{"strata_allow": []string{builder.addr + "/32"}})
	if r["server"].changed == 0 || r["builder"].changed != 0 {
		t.Fatalf("allowlist change: %+v", r)
	}
	if got := server.prop(t, unit, "MainPID"); got != pid {
		t.Fatalf("allowlist change restarted the server (pid %s -> %s), want a reload", pid, got)
	}
	if !strings.Contains(server.sh(t, "journalctl -b --no-pager -u "+unit), "msg=reloaded nfs.allow=["+builder.addr+"/32]") {
		t.Fatal("journal lacks the reload of nfs.allow")
	}
	if err := mount(); err == nil {
		t.Fatal("MOUNT from the host still works after nfs.allow dropped it")
	}

	// retention.keep is reloadable too: same process, the journal names it.
	r = p.run("retention.keep changed: reload", map[string]any{"strata_allow": []string{builder.addr + "/32"}, "strata_keep": 5})
	if r["server"].changed == 0 {
		t.Fatalf("retention.keep change: %+v", r)
	}
	if got := server.prop(t, unit, "MainPID"); got != pid {
		t.Fatalf("retention.keep change restarted the server (pid %s -> %s), want a reload", pid, got)
	}
	if j := server.sh(t, "journalctl -b --no-pager -u "+unit); !strings.Contains(j, "retention.keep=5") {
		t.Fatalf("journal lacks the reload of retention.keep:\n%s", tail(j, 20))
	}

	// A key that needs a restart, through the role: the handler restarts.
	r = p.run("publish.interval changed: restart", map[string]any{"strata_allow": []string{builder.addr + "/32"}, "strata_keep": 5, "strata_publish_interval": "1h"})
	if r["server"].changed == 0 {
		t.Fatalf("config change: %+v", r)
	}
	pid2 := server.prop(t, unit, "MainPID")
	if pid2 == pid || server.prop(t, unit, "ActiveState") != "active" {
		t.Fatalf("config change: MainPID %s -> %s, state %s: want a restart to active", pid, pid2, server.prop(t, unit, "ActiveState"))
	}

	// A hung daemon: the watchdog kills it and Restart= brings it back. A
	// drop-in shortens WatchdogSec (60 s shipped) to keep the test short.
	server.sh(t, "mkdir -p /etc/systemd/system/strata-server.service.d && "+
		"printf '[Service]\\nWatchdogSec=5s\\nTimeoutAbortSec=10s\\n' > /etc/systemd/system/strata-server.service.d/test-watchdog.conf && "+
		"systemctl daemon-reload && systemctl restart strata-server")
	hung := server.prop(t, unit, "MainPID")
	restarts := server.prop(t, unit, "NRestarts")
	server.sh(t, "kill -STOP "+hung)
	waitFor(t, 90*time.Second, "watchdog restart", func() (bool, string) {
		n, pidNow, state := server.prop(t, unit, "NRestarts"), server.prop(t, unit, "MainPID"), server.prop(t, unit, "ActiveState")
		return n != restarts && pidNow != hung && pidNow != "0" && state == "active", fmt.Sprintf("NRestarts=%s MainPID=%s %s", n, pidNow, state)
	})
	j := server.sh(t, "journalctl -b --no-pager -u "+unit)
	if !strings.Contains(j, "Watchdog timeout") {
		t.Fatalf("journal lacks the watchdog timeout:\n%s", tail(j, 30))
	}
	fmt.Printf("--- watchdog: NRestarts %s -> %s; journal:\n%s\n", restarts, server.prop(t, unit, "NRestarts"), grepLines(j, "Watchdog", "goroutine 1 ", "SIGABRT", "Scheduled restart", "Main process exited"))

	// The builder: installed and started, but not READY (no kernel NFS
	// client in a container): systemd keeps it activating, nix-daemon
	// would wait; strata status says why.
	const bunit = "strata-builder.service"
	if s := builder.prop(t, bunit, "ActiveState"); s != "activating" {
		t.Fatalf("builder unit %s, want activating (not READY without an NFS mount)", s)
	}
	bs := builder.sh(t, "strata status --api unix:/var/lib/strata/builder/api.sock")
	fmt.Printf("--- builder in a container (no NFS client): ActiveState=activating, strata status:\n%s\n", bs)
	if !strings.Contains(strings.ToLower(bs), "mount") && !strings.Contains(bs, "nfs") {
		t.Fatalf("builder status does not say the mount failed: %q", bs)
	}
}

func grepLines(s string, subs ...string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		for _, sub := range subs {
			if strings.Contains(l, sub) {
				out = append(out, l)
				break
			}
		}
	}
	return strings.Join(out, "\n")
}
