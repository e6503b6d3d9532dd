package nixstore

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"path"
	"slices"
	"strconv"
	"strings"
)

// The registration format is what `nix-store --dump-db` prints and what
// `nix-store --load-db` reads (Store::makeValidityRegistration with derivers
// and hashes, unchanged since Nix 2.3). Each valid path is a record of
// newline-terminated lines:
//
//	/nix/store/<hash>-<name>     the store path
//	<64 lowercase hex digits>    NAR hash, SHA-256, base16, no "sha256:" prefix
//	<decimal>                    NAR size in bytes
//	<store path or empty>        deriver
//	<decimal N>                  number of references
//	<store path> × N             references, sorted, self-reference included
//
// ParseRegistration is stricter than Nix's own reader: it accepts exactly
// the canonical text dump-db writes (base16 hashes only, numbers without
// sign or leading zeros, sorted references, every line terminated, all paths
// in one store directory), so that for any text it accepts,
// WriteRegistration reproduces that text byte for byte.

// maxLine bounds one line of a registration. A store path is at most a
// store directory plus 1+32+1+211 bytes; 64 KiB leaves room for any
// sensible store directory and stops a hostile input from growing a line
// without bound.
const maxLine = 64 << 10

// maxStoreName is the longest name part of a store path Nix accepts
// (StorePath::MaxPathLen).
const maxStoreName = 211

// nix32Alphabet is Nix's base-32 alphabet (no e, o, t, u).
const nix32Alphabet = "0123456789abcdfghijklmnpqrsvwxyz"

// SyntaxError is a malformed or truncated registration. Line is 1-based.
type SyntaxError struct {
	Line int
	Msg  string
}

func (e *SyntaxError) Error() string {
	return fmt.Sprintf("parse registration: line %d: %s", e.Line, e.Msg)
}

// Sort puts infos in the order dump-db prints them: by path, each with its
// references sorted. It sorts in place.
func Sort(infos []PathInfo) {
	slices.SortFunc(infos, func(a, b PathInfo) int { return strings.Compare(a.Path, b.Path) })
	for i := range infos {
		slices.Sort(infos[i].References)
	}
}

// WriteRegistration writes infos in the registration format, in the order
// given: exactly what `nix-store --dump-db PATH...` prints for them. It
// checks every record first (store paths in one store directory, base16
// hash, sorted references, no duplicate path) and writes nothing if one is
// invalid, so its output always parses with ParseRegistration.
func WriteRegistration(w io.Writer, infos []PathInfo) error {
	if err := CheckInfos(infos); err != nil {
		return fmt.Errorf("write registration: %w", err)
	}
	bw := bufio.NewWriterSize(w, 32<<10)
	var num [20]byte
	for i := range infos {
		in := &infos[i]
		bw.WriteString(in.Path)
		bw.WriteByte('\n')
		bw.WriteString(in.NarHash)
		bw.WriteByte('\n')
		bw.Write(strconv.AppendUint(num[:0], in.NarSize, 10))
		bw.WriteByte('\n')
		bw.WriteString(in.Deriver)
		bw.WriteByte('\n')
		bw.Write(strconv.AppendInt(num[:0], int64(len(in.References)), 10))
		bw.WriteByte('\n')
		for _, r := range in.References {
			bw.WriteString(r)
			bw.WriteByte('\n')
		}
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write registration: %w", err)
	}
	return nil
}

// CheckInfos reports the first record of infos that WriteRegistration could
// not write or ParseRegistration would reject: a path, deriver or reference
// that is not a store path in the store directory of the first path, a NAR
// hash that is not 64 lowercase hex digits, unsorted or repeated references,
// or a path listed twice.
func CheckInfos(infos []PathInfo) error {
	if len(infos) == 0 {
		return nil
	}
	dir := path.Dir(infos[0].Path)
	if err := checkStoreDir(infos[0].Path, dir); err != nil {
		return fmt.Errorf("record 1: path: %w", err)
	}
	seen := make(map[string]struct{}, len(infos))
	for i := range infos {
		in := &infos[i]
		if err := checkStorePath(in.Path, dir); err != nil {
			return fmt.Errorf("record %d: path: %w", i+1, err)
		}
		if _, dup := seen[in.Path]; dup {
			return fmt.Errorf("record %d: duplicate path %s", i+1, in.Path)
		}
		seen[in.Path] = struct{}{}
		if !isBase16SHA256(in.NarHash) {
			return fmt.Errorf("path %s: NAR hash %q is not 64 lowercase hex digits", in.Path, in.NarHash)
		}
		if in.Deriver != "" {
			if err := checkStorePath(in.Deriver, dir); err != nil {
				return fmt.Errorf("path %s: deriver: %w", in.Path, err)
			}
		}
		for j, r := range in.References {
			if err := checkStorePath(r, dir); err != nil {
				return fmt.Errorf("path %s: reference: %w", in.Path, err)
			}
			if j > 0 && in.References[j-1] >= r {
				return fmt.Errorf("path %s: references not sorted or repeated at %s", in.Path, r)
			}
		}
	}
	return nil
}

// ParseRegistration reads a registration in the canonical form dump-db
// writes and returns its records in input order. A truncated or malformed
// input gives a *SyntaxError naming the line and what was expected there,
// and no records.
func ParseRegistration(r io.Reader) ([]PathInfo, error) {
	p := parser{br: bufio.NewReaderSize(r, 16<<10), seen: map[string]int{}}
	var infos []PathInfo
	for {
		info, ok, err := p.record()
		if err != nil {
			return nil, err
		}
		if !ok {
			return infos, nil
		}
		infos = append(infos, info)
	}
}

type parser struct {
	br   *bufio.Reader
	line int            // number of the last line read
	dir  string         // store directory, from the first path
	seen map[string]int // path -> line it was registered on
}

// errEOF is returned by next at a clean end of input (no bytes left).
var errEOF = errors.New("end of input")

// next returns the next line without its newline. what names what the line
// should hold, for errors.
func (p *parser) next(what string) (string, error) {
	b, err := p.br.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		// A line longer than the buffer: gather it, up to maxLine.
		long := append([]byte(nil), b...)
		for errors.Is(err, bufio.ErrBufferFull) && len(long) <= maxLine {
			b, err = p.br.ReadSlice('\n')
			long = append(long, b...)
		}
		if len(long) > maxLine {
			return "", p.errorf(p.line+1, "line longer than %d bytes, expected %s", maxLine, what)
		}
		b = long
	}
	switch {
	case err == nil:
		p.line++
		return string(b[:len(b)-1]), nil
	case errors.Is(err, io.EOF) && len(b) == 0:
		return "", errEOF
	case errors.Is(err, io.EOF):
		return "", p.errorf(p.line+1, "missing newline at end of input (truncated?), expected %s", what)
	default:
		return "", fmt.Errorf("parse registration: line %d: %w", p.line+1, err)
	}
}

// need is next where end of input is an error.
func (p *parser) need(what string) (string, error) {
	s, err := p.next(what)
	if errors.Is(err, errEOF) {
		return "", p.errorf(p.line+1, "unexpected end of input, expected %s", what)
	}
	return s, err
}

func (p *parser) errorf(line int, format string, args ...any) error {
	return &SyntaxError{Line: line, Msg: fmt.Sprintf(format, args...)}
}

// storePath checks that line s is a store path; what() names what the line
// should hold (built only for an error message).
func (p *parser) storePath(s string, what func() string) error {
	if s == "" {
		return p.errorf(p.line, "empty line, expected %s", what())
	}
	if p.dir == "" {
		// The first path fixes the store directory for the rest.
		if !strings.HasPrefix(s, "/") {
			return p.errorf(p.line, "expected %s, got %q: not an absolute path", what(), clip(s))
		}
		if err := checkStoreDir(s, path.Dir(s)); err != nil {
			return p.errorf(p.line, "expected %s: %v", what(), err)
		}
		p.dir = path.Dir(s)
	}
	if err := checkStorePath(s, p.dir); err != nil {
		return p.errorf(p.line, "expected %s: %v", what(), err)
	}
	return nil
}

func is(what string) func() string { return func() string { return what } }

func (p *parser) number(what string) (uint64, error) {
	s, err := p.need(what)
	if err != nil {
		return 0, err
	}
	n, ok := parseCanonicalUint(s)
	if !ok {
		return 0, p.errorf(p.line, "expected %s (a decimal number), got %q", what, clip(s))
	}
	return n, nil
}

func (p *parser) record() (PathInfo, bool, error) {
	var in PathInfo
	s, err := p.next("store path")
	if errors.Is(err, errEOF) {
		return in, false, nil
	}
	if err != nil {
		return in, false, err
	}
	if err := p.storePath(s, is("store path")); err != nil {
		return in, false, err
	}
	if first, dup := p.seen[s]; dup {
		return in, false, p.errorf(p.line, "duplicate path %s (first registered on line %d)", s, first)
	}
	p.seen[s] = p.line
	in.Path = s

	if in.NarHash, err = p.need("NAR hash"); err != nil {
		return in, false, err
	}
	if !isBase16SHA256(in.NarHash) {
		return in, false, p.errorf(p.line, "expected NAR hash of %s (64 lowercase hex digits), got %q", s, clip(in.NarHash))
	}
	if in.NarSize, err = p.number("NAR size"); err != nil {
		return in, false, err
	}
	if in.Deriver, err = p.need("deriver (a store path or an empty line)"); err != nil {
		return in, false, err
	}
	if in.Deriver != "" {
		if err := p.storePath(in.Deriver, is("deriver of "+s+" (a store path or an empty line)")); err != nil {
			return in, false, err
		}
	}
	n, err := p.number("reference count")
	if err != nil {
		return in, false, err
	}
	countLine := p.line
	if n > 0 {
		in.References = make([]string, 0, min(n, 1024))
	}
	for i := uint64(0); i < n; i++ {
		r, err := p.next("reference")
		if errors.Is(err, errEOF) {
			return in, false, p.errorf(countLine, "reference count %d of %s is larger than what follows: input ends after %d references", n, s, i)
		}
		if err != nil {
			return in, false, err
		}
		if err := p.storePath(r, func() string { return fmt.Sprintf("reference %d of %d of %s", i+1, n, s) }); err != nil {
			return in, false, err
		}
		if i > 0 && in.References[i-1] >= r {
			return in, false, p.errorf(p.line, "reference %s of %s is not after %s: references must be sorted and distinct", r, s, in.References[i-1])
		}
		in.References = append(in.References, r)
	}
	return in, true, nil
}

// checkStoreDir checks a store directory taken from a path with path.Dir.
func checkStoreDir(p, dir string) error {
	if !strings.HasPrefix(dir, "/") {
		return fmt.Errorf("%q is not an absolute path", clip(p))
	}
	if dir == "/" || path.Clean(dir) != dir {
		return fmt.Errorf("%s: store directory %q is not supported", clip(p), dir)
	}
	return nil
}

// checkStorePath checks that p is dir/<32 nix32 chars>-<name> with a valid
// Nix store path name; dir has passed checkStoreDir.
func checkStorePath(p, dir string) error {
	if !strings.HasPrefix(p, "/") {
		return fmt.Errorf("%q is not an absolute path", clip(p))
	}
	if len(p) <= len(dir)+1 || p[:len(dir)] != dir || p[len(dir)] != '/' {
		return fmt.Errorf("%s is not in store directory %s", clip(p), dir)
	}
	// The base name is made of characters that exclude '/', and dir is
	// clean, so p is a clean path directly under dir.
	base := p[len(dir)+1:]
	if len(base) < 34 || base[32] != '-' {
		return fmt.Errorf("%s is not a store path (want %s/<32-char hash>-<name>)", clip(p), dir)
	}
	for i := 0; i < 32; i++ {
		if !nix32Char[base[i]] {
			return fmt.Errorf("%s is not a store path: hash part has %q", clip(p), base[i])
		}
	}
	name := base[33:]
	if len(name) > maxStoreName {
		return fmt.Errorf("%s is not a store path: name longer than %d bytes", clip(p), maxStoreName)
	}
	for i := 0; i < len(name); i++ {
		if !nameChar[name[i]] {
			return fmt.Errorf("%s is not a store path: name has %q", clip(p), name[i])
		}
	}
	return nil
}

// nix32Char and nameChar are the bytes allowed in a store path's hash part
// and name (Nix's checkName).
var nix32Char, nameChar = func() (h, n [256]bool) {
	for i := 0; i < len(nix32Alphabet); i++ {
		h[nix32Alphabet[i]] = true
	}
	for c := 0; c < 256; c++ {
		n[c] = '0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || strings.IndexByte("+-._?=", byte(c)) >= 0
	}
	return h, n
}()

func isBase16SHA256(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// parseCanonicalUint accepts a decimal uint64 with no sign and no leading
// zero (other than "0" itself), as Nix prints numbers.
func parseCanonicalUint(s string) (uint64, bool) {
	if s == "" || len(s) > 1 && s[0] == '0' {
		return 0, false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
	}
	n, err := strconv.ParseUint(s, 10, 64)
	return n, err == nil
}

// clip shortens s for an error message.
func clip(s string) string {
	const max = 120
	if len(s) <= max {
		return s
	}
	return s[:max] + "…"
}
