package nixstore

import (
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// VerifyError lists what Verify found wrong. Each list is complete and
// sorted in the order of the registration; Error shows the first few.
type VerifyError struct {
	// Outside are registered paths not directly under the logical store
	// directory.
	Outside []string
	// Missing are registered paths with no entry in the physical store
	// directory.
	Missing []string
	// Unregistered are references (as "REF (referenced by PATH)") to paths
	// that are not registered: the closure is incomplete.
	Unregistered []string
}

// maxListed is how many items of each kind a VerifyError message shows.
const maxListed = 5

func (e *VerifyError) Error() string {
	var parts []string
	add := func(list []string, one, many string) {
		if len(list) == 0 {
			return
		}
		what := many
		if len(list) == 1 {
			what = one
		}
		shown := list[:min(len(list), maxListed)]
		s := fmt.Sprintf("%d %s: %s", len(list), what, strings.Join(shown, ", "))
		if len(list) > len(shown) {
			s += fmt.Sprintf(", … and %d more", len(list)-len(shown))
		}
		parts = append(parts, s)
	}
	add(e.Outside, "registered path outside the store directory", "registered paths outside the store directory")
	add(e.Missing, "registered path missing from snapshot", "registered paths missing from snapshot")
	add(e.Unregistered, "reference not registered", "references not registered")
	return "verify registration: " + strings.Join(parts, "; ")
}

// Verify checks that a registration describes the store it comes with:
// every path in infos is directly under logicalStoreDir (the store
// directory the paths are named in, e.g. /nix/store), exists in storeDir
// (the physical directory holding that store, e.g. SNAP/store; checked
// with lstat, never following a symlink), and every reference is itself
// registered, so the registration is closure-complete. Derivers need not be
// registered. It returns nil or a *VerifyError listing every problem; other
// errors (say, storeDir unreadable) are returned as they are.
func Verify(storeDir, logicalStoreDir string, infos []PathInfo) error {
	prefix := filepath.Clean(logicalStoreDir)
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	dirFD, err := unix.Open(storeDir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("verify registration: open store %s: %w", storeDir, err)
	}
	defer unix.Close(dirFD)

	ve := &VerifyError{}
	registered := make(map[string]struct{}, len(infos))
	inside := make([]bool, len(infos))
	for i := range infos {
		p := infos[i].Path
		registered[p] = struct{}{}
		base, ok := strings.CutPrefix(p, prefix)
		if ok && base != "" && base != "." && base != ".." && !strings.Contains(base, "/") {
			inside[i] = true
		} else {
			ve.Outside = append(ve.Outside, p)
		}
	}
	for i := range infos {
		for _, r := range infos[i].References {
			if _, ok := registered[r]; !ok {
				ve.Unregistered = append(ve.Unregistered, r+" (referenced by "+infos[i].Path+")")
			}
		}
	}

	missing, err := lstatAll(dirFD, len(prefix), infos, inside)
	if err != nil {
		return fmt.Errorf("verify registration: store %s: %w", storeDir, err)
	}
	ve.Missing = missing
	if len(ve.Outside)+len(ve.Missing)+len(ve.Unregistered) > 0 {
		return ve
	}
	return nil
}

// lstatAll stats the base names (path[skip:]) of infos relative to dirFD
// in parallel and returns the paths that do not exist, in input order.
// Errors other than ENOENT/ENOTDIR are returned.
func lstatAll(dirFD, skip int, infos []PathInfo, inside []bool) ([]string, error) {
	// Stat is cheap on a warm cache and slow on a cold or network one;
	// more workers than CPUs hide the latency of the second.
	workers := min(max(4*runtime.GOMAXPROCS(0), 8), 32)
	const chunk = 512
	absent := make([]bool, len(infos))
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
		next     = make(chan int)
	)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var st unix.Stat_t
			for start := range next {
				for i := start; i < min(start+chunk, len(infos)); i++ {
					if !inside[i] {
						continue
					}
					err := unix.Fstatat(dirFD, infos[i].Path[skip:], &st, unix.AT_SYMLINK_NOFOLLOW)
					switch {
					case err == nil:
					case errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR):
						absent[i] = true
					default:
						mu.Lock()
						if firstErr == nil {
							firstErr = fmt.Errorf("lstat %s: %w", infos[i].Path, err)
						}
						mu.Unlock()
					}
				}
			}
		}()
	}
	for start := 0; start < len(infos); start += chunk {
		next <- start
	}
	close(next)
	wg.Wait()
	if firstErr != nil {
		return nil, firstErr
	}
	var missing []string
	for i, a := range absent {
		if a {
			missing = append(missing, infos[i].Path)
		}
	}
	return missing, nil
}
