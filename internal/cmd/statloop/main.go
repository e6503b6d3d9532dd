// Command statloop checks that paths stay readable while mounts change under
// them (invariant 3: rotation is atomic to path lookups). It is a small
// static tool (CGO_ENABLED=0 go build) for tests on the host and in VMs.
//
// It loops as fast as it can: for every PATH, stat, open, read up to 64 KiB
// and close. Any error, or a read shorter than the file's size, is a
// failure. With -hold FILE it opens FILE once at start, remembers its first
// 64 KiB, and every 16 iterations reads them again through the same fd
// (pread at 0): a difference or error is a held failure. A process that had
// a file open before a swap must keep reading the same bytes.
//
// It stops when the -stop file exists (checked every 64 iterations) or
// after -duration, whichever comes first, and prints one line:
//
//	statloop iterations=N failures=M heldfail=K changes=C
//
// (changes counts how often the content read from the first PATH differed
// from the previous read; a rotation between two generations shows up
// there). The first few failures are printed to stderr as they happen. The
// exit status is 0 with no failures, 1 with failures, 2 for bad usage.
// With -ready FILE it creates FILE after the first iteration, so a test can
// wait for the loop to run before it changes mounts.
package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

const bufSize = 64 << 10

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

type stats struct {
	iterations, failures, heldFail, changes uint64
}

func run(args []string, stdout, stderr io.Writer) int {
	fl := flag.NewFlagSet("statloop", flag.ContinueOnError)
	fl.SetOutput(stderr)
	stop := fl.String("stop", "", "stop when this file exists")
	dur := fl.Duration("duration", 0, "stop after this long (0: only the stop file)")
	hold := fl.String("hold", "", "open this file at start and check it keeps reading the same bytes")
	ready := fl.String("ready", "", "create this file after the first iteration")
	maxReport := fl.Int("report", 10, "print at most this many failures to stderr")
	fl.Usage = func() {
		fmt.Fprintln(stderr, "usage: statloop [-stop FILE] [-duration D] [-hold FILE] [-ready FILE] PATH...")
		fl.PrintDefaults()
	}
	if err := fl.Parse(args); err != nil {
		return 2
	}
	paths := fl.Args()
	if len(paths) == 0 || (*stop == "" && *dur <= 0) {
		fl.Usage()
		return 2
	}

	var st stats
	reported := 0
	report := func(format string, a ...any) {
		if reported < *maxReport {
			fmt.Fprintf(stderr, "statloop: "+format+"\n", a...)
		}
		reported++
	}

	holdFd := -1
	var holdWant []byte
	if *hold != "" {
		fd, err := unix.Open(*hold, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			fmt.Fprintf(stderr, "statloop: open held file %s: %v\n", *hold, err)
			return 2
		}
		holdFd = fd
		holdWant = make([]byte, bufSize)
		n, err := unix.Pread(fd, holdWant, 0)
		if err != nil {
			fmt.Fprintf(stderr, "statloop: read held file %s: %v\n", *hold, err)
			return 2
		}
		holdWant = holdWant[:n]
	}

	buf := make([]byte, bufSize)
	holdBuf := make([]byte, bufSize)
	var last []byte
	var deadline time.Time
	if *dur > 0 {
		deadline = time.Now().Add(*dur)
	}
	for {
		for i, p := range paths {
			n, err := readOnce(p, buf)
			if err != nil {
				st.failures++
				report("iteration %d: %v", st.iterations, err)
				continue
			}
			if i == 0 {
				if last != nil && !bytes.Equal(last, buf[:n]) {
					st.changes++
				}
				last = append(last[:0], buf[:n]...)
			}
		}
		if holdFd >= 0 && st.iterations%16 == 0 {
			n, err := unix.Pread(holdFd, holdBuf, 0)
			switch {
			case err != nil:
				st.heldFail++
				report("iteration %d: held file %s: %v", st.iterations, *hold, err)
			case !bytes.Equal(holdBuf[:n], holdWant):
				st.heldFail++
				report("iteration %d: held file %s: read %q, want %q", st.iterations, *hold, trim(holdBuf[:n]), trim(holdWant))
			}
		}
		st.iterations++
		if st.iterations == 1 && *ready != "" {
			if err := os.WriteFile(*ready, nil, 0o644); err != nil {
				fmt.Fprintf(stderr, "statloop: create ready file: %v\n", err)
				return 2
			}
		}
		if st.iterations%64 == 0 {
			if *stop != "" {
				var sb unix.Stat_t
				if unix.Stat(*stop, &sb) == nil {
					break
				}
			}
			if !deadline.IsZero() && time.Now().After(deadline) {
				break
			}
		}
	}
	fmt.Fprintf(stdout, "statloop iterations=%d failures=%d heldfail=%d changes=%d\n",
		st.iterations, st.failures, st.heldFail, st.changes)
	if st.failures > 0 || st.heldFail > 0 {
		return 1
	}
	return 0
}

// readOnce stats, opens and reads p. A read shorter than the opened file's
// size (up to len(buf)) is an error.
func readOnce(p string, buf []byte) (int, error) {
	var sb unix.Stat_t
	if err := unix.Stat(p, &sb); err != nil {
		return 0, fmt.Errorf("stat %s: %w", p, err)
	}
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("open %s: %w", p, err)
	}
	defer unix.Close(fd)
	if sb.Mode&unix.S_IFMT == unix.S_IFDIR {
		// A directory: list it instead of reading.
		n, err := unix.Getdents(fd, buf)
		if err != nil {
			return 0, fmt.Errorf("getdents %s: %w", p, err)
		}
		if n == 0 {
			return 0, fmt.Errorf("getdents %s: no entries", p)
		}
		return 0, nil
	}
	if err := unix.Fstat(fd, &sb); err != nil {
		return 0, fmt.Errorf("fstat %s: %w", p, err)
	}
	want := min(int(sb.Size), len(buf))
	n, err := unix.Read(fd, buf)
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", p, err)
	}
	if n < want {
		return n, fmt.Errorf("read %s: %w: got %d bytes of %d", p, errShort, n, want)
	}
	return n, nil
}

var errShort = errors.New("short read")

func trim(b []byte) string {
	if len(b) > 40 {
		return string(b[:40]) + "..."
	}
	return string(b)
}
