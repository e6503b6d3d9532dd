//go:build vm

package vm

import (
	"bufio"
	"context"
	"fmt"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// exportProc is server/nfs running in a child process (vm/internal/nfsserve),
// so that a test can kill -9 it.
type exportProc struct {
	cmd  *exec.Cmd
	addr string
}

func startExport(t *testing.T, bin, listen, state string, gens map[uint64]string) (*exportProc, error) {
	args := []string{"-listen", listen, "-state", state}
	for id, dir := range gens {
		args = append(args, "-gen", fmt.Sprintf("%d=%s", id, dir))
	}
	cmd := exec.Command(bin, args...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	addr, ok := strings.CutPrefix(strings.TrimSpace(line), "LISTEN ")
	if err != nil || !ok {
		cmd.Process.Kill()
		cmd.Wait()
		return nil, fmt.Errorf("start export: %q %v %s", line, err, stderr.String())
	}
	p := &exportProc{cmd: cmd, addr: addr}
	t.Cleanup(func() { p.kill() })
	return p, nil
}

func (p *exportProc) kill() {
	if p.cmd.ProcessState == nil {
		p.cmd.Process.Signal(syscall.SIGKILL)
		p.cmd.Wait()
	}
}

var progressRE = regexp.MustCompile(`^readloop: reads=(\d+) failures=(\d+)$`)

// TestServerRestart reads files through a guest's NFS mount (6.12 and 6.1) in a loop
// (through fds held open across the restart, with their page cache dropped,
// and through fresh opens after dropping all caches) while the host kills
// the export with SIGKILL and starts it again on the same port and state
// dir: no read may fail (no ESTALE), and reads must resume within seconds
// of the restart.
func TestServerRestart(t *testing.T) {
	store := btrfsGeneration(t, func(store string) { testTree(t, store, false) })
	want := writeManifest(t, store)
	vmtool := buildStatic(t, "github.com/strata-nix/strata/vm/internal/vmtool")
	server := buildStatic(t, "github.com/strata-nix/strata/vm/internal/nfsserve")
	for _, k := range []Kernel{Kernel612, Kernel61} {
		t.Run(k.String(), func(t *testing.T) { serverRestart(t, k, store, want, vmtool, server) })
	}
}

func serverRestart(t *testing.T, k Kernel, store string, want []byte, vmtool, server string) {
	state := t.TempDir()
	gens := map[uint64]string{1: store}
	first, err := startExport(t, server, "127.0.0.1:0", state, gens)
	if err != nil {
		t.Fatal(err)
	}
	_, port, _ := strings.Cut(first.addr, ":")

	const downFor = 3 * time.Second
	var (
		mu                sync.Mutex
		killAt, restartAt time.Time
		readsAtRestart    = int64(-1)
		resumedAt         time.Time
		restartErr        error
		restarted         = make(chan struct{})
	)
	onLine := func(line string) {
		now := time.Now()
		if line == "PHASE readloop-started" {
			go func() {
				defer close(restarted)
				time.Sleep(4 * time.Second)
				mu.Lock()
				killAt = time.Now()
				mu.Unlock()
				first.kill()
				time.Sleep(downFor)
				_, err := startExport(t, server, first.addr, state, gens)
				mu.Lock()
				restartAt, restartErr = time.Now(), err
				mu.Unlock()
			}()
			return
		}
		m := progressRE.FindStringSubmatch(line)
		if m == nil {
			return
		}
		reads, _ := strconv.ParseInt(m[1], 10, 64)
		mu.Lock()
		defer mu.Unlock()
		switch {
		case restartAt.IsZero():
		case readsAtRestart < 0:
			readsAtRestart = reads
		case resumedAt.IsZero() && reads > readsAtRestart:
			resumedAt = now
		}
	}
	res := Boot(context.Background(), t, Guest{
		Kernel: k,
		Env:    map[string]string{"P": port},
		Files: []File{
			{Guest: "/bin/vmtool", Host: vmtool},
			{Guest: "/host.manifest", Data: want},
		},
		OnLine: onLine,
		Script: checkFuncs + `
mkdir -p /mnt/gen1
check "mount /gen/1" mount -t nfs -o "$(nfsopts $P 10.0.2.2)" 10.0.2.2:/gen/1 /mnt/gen1
vmtool readloop /host.manifest /mnt/gen1 /tmp/stop &
pid=$!
sleep 2
echo "PHASE readloop-started"
sleep 35
touch /tmp/stop
wait $pid
check "every read during the restart succeeded with the right content" [ $? -eq 0 ]
check "no stale handle or NFS error in dmesg" sh -c "! dmesg | grep -iE 'stale|nfs.*(error|fail)'"
dmesg | grep -i nfs
check "tree still equals the host snapshot" vmtool compare /host.manifest /mnt/gen1
`,
	})
	<-restarted
	mu.Lock()
	defer mu.Unlock()
	if restartErr != nil {
		t.Fatalf("restart export: %v", restartErr)
	}
	requireChecks(t, res, 4)
	m := regexp.MustCompile(`readloop: done reads=\d+ failures=0 maxgap=([0-9.]+)s`).FindStringSubmatch(res.Output)
	if m == nil {
		t.Fatalf("no readloop summary in the guest output")
	}
	maxGap, _ := strconv.ParseFloat(m[1], 64)
	if maxGap < 0.8*downFor.Seconds() {
		t.Fatalf("longest gap between successful reads was %.1fs, shorter than the %.0fs the server was down: the reads did not depend on the server", maxGap, downFor.Seconds())
	}
	if resumedAt.IsZero() {
		t.Fatalf("reads did not resume after the restart at %s", restartAt.Format(time.TimeOnly))
	}
	resume := resumedAt.Sub(restartAt)
	t.Logf("checked: server killed with SIGKILL for %.1fs; first progress after the restart %.1fs later; longest gap between successful reads %.1fs; 0 failed reads",
		restartAt.Sub(killAt).Seconds(), resume.Seconds(), maxGap)
	if resume > 15*time.Second {
		t.Errorf("reads resumed %.1fs after the restart, want within 15s", resume.Seconds())
	}
}
