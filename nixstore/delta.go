package nixstore

import "slices"

// Delta compares two registrations, each sorted by path (see Sort), in one
// linear merge. added holds the records of to whose path is not in from,
// and also those whose record changed (NAR hash, size, deriver or
// references: a path rebuilt after garbage collection), so that applying
// the delta to from gives exactly to. removed lists the paths of from that
// are not in to, sorted. Neither result shares memory with the inputs'
// slices, except for the References slices of added records.
func Delta(from, to []PathInfo) (added []PathInfo, removed []string) {
	i, j := 0, 0
	for i < len(from) && j < len(to) {
		a, b := &from[i], &to[j]
		switch {
		case a.Path < b.Path:
			removed = append(removed, a.Path)
			i++
		case a.Path > b.Path:
			added = append(added, *b)
			j++
		default:
			if !Equal(*a, *b) {
				added = append(added, *b)
			}
			i++
			j++
		}
	}
	for ; i < len(from); i++ {
		removed = append(removed, from[i].Path)
	}
	added = append(added, to[j:]...)
	return added, removed
}

// Equal reports whether two records are the same in every field.
func Equal(a, b PathInfo) bool {
	return a.Path == b.Path && a.NarHash == b.NarHash && a.NarSize == b.NarSize &&
		a.Deriver == b.Deriver && slices.Equal(a.References, b.References)
}
