package replica

// NoSpace reports whether err says the replica's filesystem is full, as a
// receive reports it (btrfs receive, zfs receive, ENOSPC from Go): the
// daemon counts such failures as one problem, whichever file they name.
func NoSpace(err error) bool { return noSpace(err) }
