// Package nixstore reads and writes Nix's store metadata: the registration
// format of `nix-store --dump-db`/`--load-db`, the SQLite database of a store
// (read from a snapshot without running Nix), deltas between generations,
// closure verification, and calls to the nix-store command.
package nixstore

// PathInfo is one valid store path as the registration format carries it.
type PathInfo struct {
	// Path is the absolute store path, e.g. /nix/store/<hash>-<name>.
	Path string
	// NarHash is the SHA-256 of the path's NAR serialisation, lowercase
	// base16, 64 characters, without a "sha256:" prefix.
	NarHash string
	// NarSize is the size of the NAR serialisation in bytes.
	NarSize uint64
	// Deriver is the store path of the .drv that built Path, or "".
	Deriver string
	// References are the store paths Path refers to (itself included when
	// it refers to itself), sorted.
	References []string
}
