// Command vmtool runs inside VM-tier guests (built with CGO_ENABLED=0) to
// check what the guest's kernel serves against what the host has.
//
//	vmtool manifest DIR              print DIR's manifest (package manifest)
//	vmtool compare WANT DIR          compare DIR with the manifest file WANT;
//	                                 exit 1 and print differences if they differ
//	vmtool readloop WANT DIR STOP    read every non-empty file of WANT under DIR
//	                                 in a loop until the file STOP exists: each
//	                                 pass re-reads the files through fds opened
//	                                 once at start (page cache dropped for them,
//	                                 so the old file handles go to the server)
//	                                 and through fresh opens after dropping all
//	                                 caches. Prints progress every second and
//	                                 exits 1 after any failed or wrong read.
package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/strata-nix/strata/vm/internal/manifest"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "manifest":
		if len(os.Args) != 3 {
			usage()
		}
		var lines []string
		if lines, err = manifest.Make(os.Args[2]); err == nil {
			w := bufio.NewWriter(os.Stdout)
			for _, l := range lines {
				fmt.Fprintln(w, l)
			}
			err = w.Flush()
		}
	case "compare":
		if len(os.Args) != 4 {
			usage()
		}
		err = compare(os.Args[2], os.Args[3])
	case "readloop":
		if len(os.Args) != 5 {
			usage()
		}
		err = readloop(os.Args[2], os.Args[3], os.Args[4])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmtool:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: vmtool manifest DIR | compare WANT DIR | readloop WANT DIR STOP")
	os.Exit(2)
}

func readManifest(p string) ([]string, error) {
	data, err := os.ReadFile(p)
	if err != nil {
		return nil, err
	}
	return strings.Split(strings.TrimRight(string(data), "\n"), "\n"), nil
}

func compare(wantFile, dir string) error {
	want, err := readManifest(wantFile)
	if err != nil {
		return err
	}
	start := time.Now()
	got, err := manifest.Make(dir)
	if err != nil {
		return err
	}
	diffs, n := manifest.Diff(want, got, 20)
	if n > 0 {
		for _, d := range diffs {
			fmt.Println("compare:", d)
		}
		return fmt.Errorf("compare %s: %d of %d entries differ from %s", dir, n, len(want), wantFile)
	}
	fmt.Printf("compare: %s matches %s: %d entries (%.1fs)\n", dir, wantFile, len(got), time.Since(start).Seconds())
	return nil
}

type target struct {
	rel, sha string
	f        *os.File
}

func readloop(wantFile, dir, stop string) error {
	want, err := readManifest(wantFile)
	if err != nil {
		return err
	}
	var files []*target
	for _, l := range want {
		f := strings.SplitN(l, " ", 7)
		if len(f) != 7 || f[0] != "f" || f[4] == "0" {
			continue
		}
		t := &target{rel: f[6], sha: f[5]}
		if t.f, err = os.Open(filepath.Join(dir, t.rel)); err != nil {
			return err
		}
		files = append(files, t)
	}
	if len(files) == 0 {
		return fmt.Errorf("readloop: no non-empty files in %s", wantFile)
	}
	var reads, failures atomic.Int64
	var mu sync.Mutex
	lastOK := time.Now()
	var maxGap time.Duration
	ok := func() {
		mu.Lock()
		now := time.Now()
		if gap := now.Sub(lastOK); gap > maxGap {
			maxGap = gap
		}
		if gap := now.Sub(lastOK); gap > time.Second {
			fmt.Printf("readloop: reads resumed after a %.1fs stall\n", gap.Seconds())
		}
		lastOK = now
		mu.Unlock()
		reads.Add(1)
	}
	fail := func(how string, t *target, err error) {
		failures.Add(1)
		fmt.Printf("readloop: FAILED %s %s: %v\n", how, t.rel, err)
	}
	done := make(chan struct{})
	go func() {
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				fmt.Printf("readloop: reads=%d failures=%d\n", reads.Load(), failures.Load())
			}
		}
	}()
	fmt.Printf("readloop: reading %d files under %s\n", len(files), dir)
	for pass := 0; ; pass++ {
		if _, err := os.Stat(stop); err == nil {
			break
		}
		for _, t := range files {
			_ = unix.Fadvise(int(t.f.Fd()), 0, 0, unix.FADV_DONTNEED)
			if sum, err := hashFrom(io.NewSectionReader(t.f, 0, 1<<40)); err != nil {
				fail("held fd", t, err)
			} else if sum != t.sha {
				fail("held fd", t, fmt.Errorf("sha256 %s, want %s", sum, t.sha))
			} else {
				ok()
			}
		}
		_ = os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
		for _, t := range files {
			if sum, err := manifest.FileSHA(filepath.Join(dir, t.rel)); err != nil {
				fail("open", t, err)
			} else if sum != t.sha {
				fail("open", t, fmt.Errorf("sha256 %s, want %s", sum, t.sha))
			} else {
				ok()
			}
		}
	}
	close(done)
	mu.Lock()
	gap := maxGap
	mu.Unlock()
	fmt.Printf("readloop: done reads=%d failures=%d maxgap=%ss\n", reads.Load(), failures.Load(), strconv.FormatFloat(gap.Seconds(), 'f', 2, 64))
	if failures.Load() > 0 {
		return fmt.Errorf("readloop: %d failed reads", failures.Load())
	}
	return nil
}

func hashFrom(r io.Reader) (string, error) {
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
