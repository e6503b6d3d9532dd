//go:build vm

package vm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/strata-nix/strata/internal/nixtest"
	"github.com/strata-nix/strata/internal/testenv"
)

// TestBuilderFailover: a primary `strata server` (btrfs on a loop device)
// and a replica `strata server` (its own btrfs loop device, replica.of the
// primary) on the host; `strata builder` in a guest with the kernel NFS
// client, on the primary (server.prefer: primary, replica), failover.after
// 5s. While a build reads generation files in a loop, a process holds a
// generation file open and another has its cwd in a generation path, the
// host kill -9s the primary. The guest checks:
//
//   - within failover.after + 10 s the builder serves generation 1 from the
//     replica (same generation, the replica's NFS mount, the primary's gone);
//   - a stat loop started after the failover sees 0 failures, and
//     nix-store --verify --check-contents is clean;
//   - the build started before the failure either succeeds or fails with
//     "Input/output error" (RESULT line says which);
//   - what the held fd and the cwd see (RESULT lines: EIO or hang);
//   - the primary restarted: the builder stays on the replica (no flap)
//     until `strata builder rotate --server <primary>` moves it back, with
//     0 failed stats during that move.
func TestBuilderFailover(t *testing.T) {
	testenv.RequireRoot(t)
	strata := buildStatic(t, "github.com/strata-nix/strata/cmd/strata")
	statloop := buildStatic(t, "github.com/strata-nix/strata/internal/cmd/statloop")
	for _, k := range []Kernel{Kernel612, Kernel61} {
		t.Run(k.String(), func(t *testing.T) { builderFailover(t, k, strata, statloop) })
	}
}

// serverProc is a `strata server` child process that can be killed and
// started again with the same configuration.
type serverProc struct {
	t      *testing.T
	strata string
	cfg    string
	mu     sync.Mutex
	cmd    *exec.Cmd
}

func (s *serverProc) start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	cmd := exec.Command(s.strata, "server", "--config", s.cfg)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	s.cmd = cmd
	return nil
}

func (s *serverProc) kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		s.cmd.Process.Signal(syscall.SIGKILL)
		s.cmd.Wait()
		s.cmd = nil
	}
}

func builderFailover(t *testing.T, k Kernel, strata, statloop string) {
	mnt := testenv.LoopBtrfs(t, "1G")
	testenv.Run(t, "btrfs", "subvolume", "create", filepath.Join(mnt, "nix"))
	central := nixtest.New(t, mnt)
	paths := central.Fill(t)
	held := central.AddTree(t, "held", map[string]string{"big": strings.Repeat("held bytes of generation 1\n", 40000)})
	rmnt := testenv.LoopBtrfs(t, "1G")

	papi, pnfs, rapi, rnfs := freePort(t), freePort(t), freePort(t), freePort(t)
	dir := t.TempDir()
	token := filepath.Join(dir, "token")
	os.WriteFile(token, []byte("vm-test-token\n"), 0o600)
	os.MkdirAll(filepath.Join(mnt, "snaps"), 0o755)
	pcfg := filepath.Join(dir, "primary.yaml")
	os.WriteFile(pcfg, []byte(fmt.Sprintf(`store:
  root: %s
snapshot:
  backend: btrfs
  snapshot_dir: %s
state_dir: %s
publish:
  interval: 0s
api:
  listen: 127.0.0.1:%d
  token_file: %s
nfs:
  listen: 0.0.0.0:%d
  allow: [127.0.0.0/8]
`, central.NixRoot(), filepath.Join(mnt, "snaps"), filepath.Join(dir, "primary"), papi, token, pnfs)), 0o644)
	rcfg := filepath.Join(dir, "replica.yaml")
	os.WriteFile(rcfg, []byte(fmt.Sprintf(`replica:
  of: http://127.0.0.1:%d
  token_file: %s
  interval: 1s
snapshot:
  snapshot_dir: %s
state_dir: %s
api:
  listen: 127.0.0.1:%d
  token_file: %s
nfs:
  listen: 0.0.0.0:%d
  allow: [127.0.0.0/8]
`, papi, token, filepath.Join(rmnt, "gens"), filepath.Join(dir, "replica"), rapi, token, rnfs)), 0o644)

	primary := &serverProc{t: t, strata: strata, cfg: pcfg}
	if err := primary.start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(primary.kill)
	waitGenerations(t, papi, 1)
	replica := &serverProc{t: t, strata: strata, cfg: rcfg}
	if err := replica.start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(replica.kill)
	waitGenerations(t, rapi, 1)

	var killedAt time.Time
	var hostMu sync.Mutex
	onLine := func(line string) {
		switch {
		case strings.Contains(line, "HOST-KILL-PRIMARY") && !strings.Contains(line, "echo"):
			hostMu.Lock()
			killedAt = time.Now()
			hostMu.Unlock()
			primary.kill()
			t.Logf("host: killed the primary (SIGKILL)")
		case strings.Contains(line, "HOST-RESTART-PRIMARY") && !strings.Contains(line, "echo"):
			go func() {
				if err := primary.start(); err != nil {
					t.Errorf("restart primary: %v", err)
				}
				t.Logf("host: restarted the primary")
			}()
		}
	}
	res := Boot(context.Background(), t, Guest{
		Kernel: k,
		Nix:    true,
		Env: map[string]string{"PAPI": strconv.Itoa(papi), "RAPI": strconv.Itoa(rapi), "PNFS": strconv.Itoa(pnfs),
			"RNFS": strconv.Itoa(rnfs), "TOOL": paths[0], "DATA": paths[1], "HELD": held},
		Files: []File{
			{Guest: "/bin/strata", Host: strata},
			{Guest: "/bin/statloop", Host: statloop},
		},
		Script:  checkFuncs + failoverScript,
		Timeout: 25 * time.Minute,
		OnLine:  onLine,
	})
	for _, l := range strings.Split(res.Output, "\n") {
		if strings.HasPrefix(l, "RESULT ") {
			t.Log(l)
		}
	}
	hostMu.Lock()
	if killedAt.IsZero() {
		t.Error("the guest never asked to kill the primary")
	}
	hostMu.Unlock()
	requireChecks(t, res, 17)
}

const failoverScript = `
export PAGER=cat
mkdir -p /usr/libexec/nix && ln -sf "$(command -v nix)" /usr/libexec/nix/build-remote
S=unix:/var/lib/strata/builder/api.sock
P=http://10.0.2.2:$PAPI
R=http://10.0.2.2:$RAPI
mkdir -p /nix /var/lib/strata /etc/strata
mount -t tmpfs nix /nix && mkdir -p /nix/store /nix/var/nix
mount -t tmpfs state /var/lib/strata
cat > /etc/strata/builder.yaml <<EOF2
server:
  api: $P
  prefer: [$P, $R]
failover:
  after: 5s
rotate:
  check_interval: 1h
EOF2
strata builder --config /etc/strata/builder.yaml > /builder.log 2>&1 &
BPID=$!
trap 'echo "--- builder log"; tail -60 /builder.log' EXIT
st() { strata status --api $S --json 2>/dev/null; }
field() { st | sed -n "s/^  \"$1\": \"\\{0,1\\}\\([^\",]*\\)\"\\{0,1\\},\\{0,1\\}\$/\\1/p"; }
now() { cut -d' ' -f1 /proc/uptime; }
i=0; while ! st | grep -q '"ready": true' && [ $i -lt 300 ]; do sleep 0.5; i=$((i+1)); done
st
check "ready on generation 1 from the primary" sh -c "[ \"$(field generation)\" = 1 ] && [ \"$(field server)\" = $P ]"
check "status lists both servers, primary first" sh -c "strata status --api $S | grep -E '^servers \\(best first\\): +\\[$P .*$R'"

# A build that reads generation files for a while.
cat > /reader.nix <<EOF2
derivation { name = "reader"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "i=0; touch /tmp/build-running; while [ \$i -lt 60 ]; do \$in0/bin/run > /dev/null; cat \$in1/data.txt > /dev/null; ls \$in1 > /dev/null; sleep 0.5; i=\$((i+1)); done; mkdir \$out; \$in0/bin/run > \$out/said" ];
  in0 = builtins.storePath "$TOOL"; in1 = builtins.storePath "$DATA"; }
EOF2
nix-build /reader.nix --no-out-link > /tmp/build.out 2>&1 &
BUILD=$!
i=0; while [ ! -e /tmp/build-running ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
check "the build runs" test -e /tmp/build-running
# A process with its cwd in a generation path, and a held fd.
(cd $DATA && exec sleep 100000) &
CWD=$!
exec 7< $HELD/big
head -c 100 <&7 > /dev/null
statloop -duration 60s $DATA/data.txt $TOOL/bin/run > /tmp/loop-during 2>&1 &
LDUR=$!
sleep 2

t0=$(now)
echo HOST-KILL-PRIMARY
i=0; while { [ "$(field server)" != $R ] || [ "$(field state)" != "idle(1)" ]; } && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
t1=$(now)
took=$(echo "$t1 $t0" | awk '{print $1-$2}')
echo "TIMING primary killed -> serving generation 1 from the replica: $took s (failover.after 5s)"
echo "RESULT failover took $took s on $(uname -r)"
st
check "within failover.after + 10 s the builder serves generation 1 from the replica" sh -c "[ \"$(field server)\" = $R ] && [ \"$(field generation)\" = 1 ] && echo $took | awk '{exit !(\$1 <= 15)}'"
st | tr -d '\n ' > /tmp/stj
check "status: one failover, primary -> replica, same generation" grep -q '"count":1,"last":{"at":"[^"]*","from":"'$P'","generation":1,"reason":"unansweredfor.*","to":"'$R'","took":' /tmp/stj
strata status --api $S
check "one NFS mount, the replica's; the overlay on it" sh -c "[ \$(grep ' nfs ' /proc/mounts | grep -vc ' /var/lib/strata/builder/dead/') -eq 1 ] && grep -q 'lower/1@10.0.2.2_$RAPI nfs .*port=$RNFS' /proc/mounts && grep -q 'lowerdir=/var/lib/strata/builder/lower/1@10.0.2.2_$RAPI:' /proc/mounts"
statloop -duration 10s $DATA/data.txt $TOOL/bin/run $HELD/big > /tmp/loop-after 2>&1
cat /tmp/loop-after
check "a stat loop started after the failover sees 0 failures" grep -q 'failures=0 ' /tmp/loop-after
check "nix-store --verify --check-contents is clean" sh -c "nix-store --verify --check-contents 2>&1 | tee /tmp/v; ! grep -qiE 'disappeared|modified|error' /tmp/v"

# What processes that held files on the dead server's lower see.
# probe CMD...: runs CMD in the background and says how it ended, or that
# it was still blocked after 20 s (then kills it).
probe() {
  "$@" > /dev/null 2> /tmp/probe.err & p=$!
  i=0; while kill -0 $p 2>/dev/null && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
  if kill -0 $p 2>/dev/null; then kill -9 $p; echo "hung (still blocked after 20 s)"; else wait $p; echo "exit $? after $((i/10)) s: $(tr '\n' ' ' < /tmp/probe.err)"; fi
}
probe sh -c 'echo 3 > /proc/sys/vm/drop_caches'
HELDR=$(probe sh -c 'cat <&7'); CWDR=$(probe cat /proc/$CWD/cwd/data.txt); STATR=$(probe stat /proc/$CWD/cwd/.)
echo "RESULT held fd (opened before the kill) read after the failover: $HELDR"
echo "RESULT read by name through a cwd in the old overlay: $CWDR"
echo "RESULT stat of the cwd in the old overlay: $STATR"
printf '%s\n' "$HELDR" "$CWDR" "$STATR" > /tmp/held-results
check "a held fd and a cwd on the dead server's lower get an error, not a hang" sh -c "! grep -q hung /tmp/held-results && [ \$(grep -c '^exit 1 ' /tmp/held-results) = 3 ]"
exec 7<&-
kill $CWD 2>/dev/null
# bwait PID SECS: wait for child PID at most SECS, then kill it; sets BW to
# its exit status or "hung". (A child that exited is a zombie until waited
# for: kill -0 would still find it.)
running() { [ -e /proc/$1/stat ] && ! awk '{exit !($3=="Z")}' /proc/$1/stat; }
bwait() { i=0; while running $1 && [ $i -lt $(($2*10)) ]; do sleep 0.1; i=$((i+1)); done; if running $1; then kill -9 $1; wait $1; BW=hung; else wait $1; BW=$?; fi; }
bwait $LDUR 90; echo "stat loop across the failure: $BW"; cat /tmp/loop-during
echo "RESULT stat loop running across the failure: $(tail -1 /tmp/loop-during)"

bwait $BUILD 600; brc=$BW
tail -5 /tmp/build.out
if [ $brc = 0 ]; then echo "RESULT build started before the failure: succeeded"; else echo "RESULT build started before the failure: failed (exit $brc): $(grep -m1 -iE 'error|input/output' /tmp/build.out)"; fi
check "the build succeeded or failed with an I/O error" sh -c "[ $brc = 0 ] || grep -qE 'Input/output error|[Ee]rror 512' /tmp/build.out"

# The primary comes back: no flap.
echo HOST-RESTART-PRIMARY
i=0; while ! strata generations --api 10.0.2.2:$PAPI > /dev/null 2>&1 && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done
check "the primary answers again" strata generations --api 10.0.2.2:$PAPI
sleep 15
st | tr -d '\n ' > /tmp/stj
check "no flap: still on the replica 15 s after the primary came back" sh -c "[ \"$(field server)\" = $R ] && grep -q '\"count\":1,' /tmp/stj"
statloop -stop /tmp/stop2 -ready /tmp/ready2 $DATA/data.txt $TOOL/bin/run > /tmp/loop-back 2>&1 &
LB=$!
while [ ! -e /tmp/ready2 ]; do sleep 0.1; done
check "strata builder rotate --server <primary>" strata builder rotate --api $S --server $P
sleep 1; touch /tmp/stop2; wait $LB; cat /tmp/loop-back
check "back on the primary's generation 1, 0 failed stats during the move" sh -c "[ \"$(field server)\" = $P ] && [ \"$(field generation)\" = 1 ] && grep -q 'failures=0 ' /tmp/loop-back && grep -q 'lower/1 nfs .*port=$PNFS' /proc/mounts && [ \$(grep ' nfs ' /proc/mounts | grep -vc ' /var/lib/strata/builder/dead/') -eq 1 ]"
check "nix-store --verify --check-contents is clean on the primary again" sh -c "nix-store --verify --check-contents 2>&1 | tee /tmp/v; ! grep -qiE 'disappeared|modified|error' /tmp/v"
check "one overlay on /nix/store" sh -c "[ \$(grep -c ' /nix/store overlay ' /proc/mounts) -eq 1 ]"
check "builder still running" kill -0 $BPID
dmesg | grep -iE 'nfs|rpc' | tail -10
`
