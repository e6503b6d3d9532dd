package nixstore

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
)

// CLI runs the nix-store command. The zero value runs "nix-store" from PATH
// on the system's default store.
type CLI struct {
	// Bin is the nix-store executable; "" means "nix-store" from PATH.
	Bin string
	// Args come before every operation, e.g. {"--store", ROOT} for a chroot
	// store or {"--option", "build-users-group", ""}.
	Args []string
	// Env is added to the process environment (later entries win).
	Env []string
}

// ExecError is a failed nix-store run; Stderr is what it printed.
type ExecError struct {
	Args   []string
	Err    error
	Stderr string
}

func (e *ExecError) Error() string {
	msg := strings.TrimSpace(e.Stderr)
	if len(msg) > 4000 {
		msg = "…" + msg[len(msg)-4000:]
	}
	return fmt.Sprintf("%s: %v: %s", strings.Join(e.Args, " "), e.Err, msg)
}

func (e *ExecError) Unwrap() error { return e.Err }

// maxArgBytes bounds the bytes of store paths passed in one command line,
// well under Linux's ARG_MAX (2 MiB for arguments and environment). A
// variable so tests can make batches small.
var maxArgBytes = 256 << 10

func (c CLI) run(ctx context.Context, stdin io.Reader, args ...string) ([]byte, error) {
	bin := c.Bin
	if bin == "" {
		bin = "nix-store"
	}
	all := append(append([]string{}, c.Args...), args...)
	cmd := exec.CommandContext(ctx, bin, all...)
	cmd.Env = append(os.Environ(), c.Env...)
	cmd.Stdin = stdin
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		shown := append([]string{bin}, all...)
		if len(shown) > 12 {
			shown = append(shown[:12:12], fmt.Sprintf("…(%d more)", len(shown)-12))
		}
		return nil, &ExecError{Args: shown, Err: err, Stderr: stderr.String()}
	}
	return stdout.Bytes(), nil
}

// Valid returns those of paths that are valid in the store, in input order.
// It asks `nix-store --check-validity --print-invalid` in batches that fit a
// command line.
func (c CLI) Valid(ctx context.Context, paths []string) ([]string, error) {
	invalid := make(map[string]bool)
	for start := 0; start < len(paths); {
		end, size := start, 0
		for end < len(paths) && (end == start || size+len(paths[end])+1 <= maxArgBytes) {
			size += len(paths[end]) + 1
			end++
		}
		args := append([]string{"--check-validity", "--print-invalid"}, paths[start:end]...)
		out, err := c.run(ctx, nil, args...)
		if err != nil {
			return nil, fmt.Errorf("check validity: %w", err)
		}
		for _, p := range strings.Split(string(out), "\n") {
			if p != "" {
				invalid[p] = true
			}
		}
		start = end
	}
	valid := make([]string, 0, len(paths))
	for _, p := range paths {
		if !invalid[p] {
			valid = append(valid, p)
		}
	}
	return valid, nil
}

// LoadDB registers the paths of infos that are not valid yet with
// `nix-store --load-db`, in one transaction. Paths already valid are left
// alone: re-registering one would reset its registration time and wipe its
// signatures and content-address. Every reference must be valid or among
// infos, and a .drv path's file must be readable in the store, since Nix
// parses derivations while registering them. It returns how many paths it
// registered.
func (c CLI) LoadDB(ctx context.Context, infos []PathInfo) (int, error) {
	paths := make([]string, len(infos))
	for i := range infos {
		paths[i] = infos[i].Path
	}
	valid, err := c.Valid(ctx, paths)
	if err != nil {
		return 0, fmt.Errorf("load db: %w", err)
	}
	skip := make(map[string]bool, len(valid))
	for _, p := range valid {
		skip[p] = true
	}
	fresh := make([]PathInfo, 0, len(infos)-len(valid))
	for i := range infos {
		if !skip[infos[i].Path] {
			fresh = append(fresh, infos[i])
		}
	}
	if len(fresh) == 0 {
		return 0, nil
	}
	var reg bytes.Buffer
	if err := WriteRegistration(&reg, fresh); err != nil {
		return 0, fmt.Errorf("load db: %w", err)
	}
	if _, err := c.run(ctx, &reg, "--load-db"); err != nil {
		return 0, fmt.Errorf("load db: %w", err)
	}
	return len(fresh), nil
}

// Init makes Nix create the store's directories and database if they do
// not exist yet (a query on an empty store does), with its own schema.
func (c CLI) Init(ctx context.Context) error {
	if _, err := c.run(ctx, nil, "--dump-db"); err != nil {
		return fmt.Errorf("initialise nix store: %w", err)
	}
	return nil
}

// DumpDB returns every valid path of the store, as `nix-store --dump-db`
// prints them (sorted by path).
func (c CLI) DumpDB(ctx context.Context) ([]PathInfo, error) {
	out, err := c.run(ctx, nil, "--dump-db")
	if err != nil {
		return nil, fmt.Errorf("dump db: %w", err)
	}
	infos, err := ParseRegistration(bytes.NewReader(out))
	if err != nil {
		return nil, fmt.Errorf("dump db: %w", err)
	}
	return infos, nil
}
