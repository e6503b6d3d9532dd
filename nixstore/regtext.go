package nixstore

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
)

// Registration texts as byte slices: a delta between two registrations and
// its application, by framing alone. Both work on texts that
// WriteRegistration wrote from sorted records (a server's own stored
// registrations, a delta's added records), and compare whole records byte
// for byte, which for canonical text is comparing every field: no record is
// decoded, so they cost a scan of the text (tens of milliseconds for
// 100,000 paths, against a parse's hundreds). They check the framing (five
// lines and the references a record announces, paths in strictly ascending
// order) and nothing in the fields: callers compare the result's sha256
// with a manifest, or fall back to parsing (ParseRegistration, Delta) when
// these fail.

// errFraming marks a text these functions cannot work on.
var errFraming = errors.New("registration text")

// record returns the path and the length of the record at the start of b.
func record(b []byte) (path []byte, n int, err error) {
	for line := 0; line < 5; line++ {
		i := bytes.IndexByte(b[n:], '\n')
		if i < 0 {
			return nil, 0, fmt.Errorf("%w: record cut short", errFraming)
		}
		switch line {
		case 0:
			path = b[:i]
			if len(path) == 0 {
				return nil, 0, fmt.Errorf("%w: empty path", errFraming)
			}
		case 4:
			refs, err := strconv.Atoi(string(b[n : n+i]))
			if err != nil || refs < 0 {
				return nil, 0, fmt.Errorf("%w: record of %s: reference count %q", errFraming, path, b[n:n+i])
			}
			n += i + 1
			for ; refs > 0; refs-- {
				j := bytes.IndexByte(b[n:], '\n')
				if j < 0 {
					return nil, 0, fmt.Errorf("%w: record of %s cut short", errFraming, path)
				}
				n += j + 1
			}
			return path, n, nil
		}
		n += i + 1
	}
	panic("unreachable")
}

// RegistrationPaths returns the paths of a registration text's records, in
// their order, and the sum of their NAR sizes.
func RegistrationPaths(reg []byte) (paths []string, narBytes uint64, err error) {
	err = records(reg, func(p []byte, size uint64) {
		paths = append(paths, string(p))
		narBytes += size
	})
	if err != nil {
		return nil, 0, err
	}
	return paths, narBytes, nil
}

// RegistrationCount is RegistrationPaths without the paths: the number of
// a registration text's records and the sum of their NAR sizes.
func RegistrationCount(reg []byte) (n int, narBytes uint64, err error) {
	err = records(reg, func(_ []byte, size uint64) {
		n++
		narBytes += size
	})
	if err != nil {
		return 0, 0, err
	}
	return n, narBytes, nil
}

// records calls fn with each record's path and NAR size, in order.
func records(reg []byte, fn func(path []byte, narSize uint64)) error {
	for len(reg) > 0 {
		p, n, err := record(reg)
		if err != nil {
			return err
		}
		rest := reg[len(p)+1:]
		rest = rest[bytes.IndexByte(rest, '\n')+1:] // past the hash
		field := rest[:bytes.IndexByte(rest, '\n')]
		size, ok := uint64(0), len(field) > 0 && len(field) <= 19
		for _, c := range field {
			if c < '0' || c > '9' {
				ok = false
				break
			}
			size = size*10 + uint64(c-'0')
		}
		if !ok { // not a short decimal number: as strconv sees it
			v, err := strconv.ParseUint(string(field), 10, 64)
			if err != nil {
				return fmt.Errorf("%w: record of %s: NAR size: %w", errFraming, p, err)
			}
			size = v
		}
		fn(p, size)
		reg = reg[n:]
	}
	return nil
}

// DeltaText is Delta on registration texts sorted by path: added holds the
// records of to (as text) whose path is not in from or whose record
// differs, removed the paths of from that are not in to. It fails on a text
// that is not framed as records or not sorted.
func DeltaText(from, to []byte) (added []byte, removed []string, err error) {
	var a, b []byte // the previous paths, for the order check
	var ra, rb []byte
	var na, nb int
	next := func(text *[]byte, prev *[]byte, rec *[]byte, n *int) error {
		if len(*text) == 0 {
			*rec = nil
			return nil
		}
		p, l, err := record(*text)
		if err != nil {
			return err
		}
		if *prev != nil && bytes.Compare(*prev, p) >= 0 {
			return fmt.Errorf("%w: %s after %s: not sorted", errFraming, p, *prev)
		}
		*prev, *rec, *n = p, (*text)[:l], len(p)
		*text = (*text)[l:]
		return nil
	}
	if err := next(&from, &a, &ra, &na); err != nil {
		return nil, nil, err
	}
	if err := next(&to, &b, &rb, &nb); err != nil {
		return nil, nil, err
	}
	var out bytes.Buffer
	for ra != nil || rb != nil {
		var c int
		switch {
		case ra == nil:
			c = 1
		case rb == nil:
			c = -1
		default:
			c = bytes.Compare(ra[:na], rb[:nb])
		}
		switch {
		case c < 0:
			removed = append(removed, string(ra[:na]))
			err = next(&from, &a, &ra, &na)
		case c > 0:
			out.Write(rb)
			err = next(&to, &b, &rb, &nb)
		default:
			if !bytes.Equal(ra, rb) {
				out.Write(rb)
			}
			if err = next(&from, &a, &ra, &na); err == nil {
				err = next(&to, &b, &rb, &nb)
			}
		}
		if err != nil {
			return nil, nil, err
		}
	}
	return out.Bytes(), removed, nil
}

// ApplyDelta returns base with a delta applied: the records of base whose
// path is in removed or in added dropped, the records of added merged in
// by path. base and added must be sorted by path, removed too. A delta
// that does not fit base (a removed path base lacks, a path both added and
// removed) fails, as does a text that is not framed as records or sorted.
// Runs of base records the delta leaves alone are copied in one piece.
func ApplyDelta(base, added []byte, removed []string) ([]byte, error) {
	out := make([]byte, 0, len(base)+len(added))
	var prevBase, prevAdd []byte
	run := 0 // start of the base records not yet copied
	b, a := 0, 0
	for b < len(base) || a < len(added) {
		var pb, pa []byte
		var nb, na int
		var err error
		if b < len(base) {
			if pb, nb, err = record(base[b:]); err != nil {
				return nil, err
			}
			if prevBase != nil && bytes.Compare(prevBase, pb) >= 0 {
				return nil, fmt.Errorf("%w: base: %s after %s: not sorted", errFraming, pb, prevBase)
			}
		}
		if a < len(added) {
			if pa, na, err = record(added[a:]); err != nil {
				return nil, err
			}
			if prevAdd != nil && bytes.Compare(prevAdd, pa) >= 0 {
				return nil, fmt.Errorf("%w: delta: %s after %s: not sorted", errFraming, pa, prevAdd)
			}
		}
		c := 0
		switch {
		case pb == nil:
			c = 1
		case pa == nil:
			c = -1
		default:
			c = bytes.Compare(pb, pa)
		}
		if c > 0 { // an added record comes first
			if len(removed) > 0 && removed[0] == string(pa) {
				return nil, fmt.Errorf("%w: delta adds and removes %s", errFraming, pa)
			}
			out = append(append(out, base[run:b]...), added[a:a+na]...)
			run = b
			prevAdd, a = pa, a+na
			continue
		}
		// The base record: dropped when removed or replaced.
		if len(removed) > 0 && removed[0] < string(pb) {
			return nil, fmt.Errorf("%w: delta removes %s, which the base does not have", errFraming, removed[0])
		}
		drop := len(removed) > 0 && removed[0] == string(pb)
		if drop {
			if len(removed) > 1 && removed[1] <= removed[0] {
				return nil, fmt.Errorf("%w: removed paths not sorted at %s", errFraming, removed[1])
			}
			removed = removed[1:]
		}
		switch {
		case c == 0 && drop:
			return nil, fmt.Errorf("%w: delta adds and removes %s", errFraming, pa)
		case c == 0:
			out = append(append(out, base[run:b]...), added[a:a+na]...)
			run = b + nb
			prevAdd, a = pa, a+na
		case drop:
			out = append(out, base[run:b]...)
			run = b + nb
		}
		prevBase, b = pb, b+nb
	}
	if len(removed) > 0 {
		return nil, fmt.Errorf("%w: delta removes %s, which the base does not have", errFraming, removed[0])
	}
	return append(out, base[run:]...), nil
}
