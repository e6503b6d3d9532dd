package replica

import (
	"errors"
	"fmt"
	"syscall"
	"testing"
)

// The receive errors of a full replica filesystem, as btrfs receive, zfs
// receive and Go report them, end the attempts of a sync; other failures
// do not.
func TestNoSpace(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{errors.New("btrfs receive -e /r/gens: exit status 1: ERROR: writing to store/x failed: No space left on device"), true},
		{errors.New("zfs receive -s tank/r/strata-2: exit status 1: cannot receive incremental stream: out of space"), true},
		{fmt.Errorf("write /r/state/replica-receiving: %w", syscall.ENOSPC), true},
		{errors.New("btrfs receive -e /r/gens: exit status 1: ERROR: cannot find parent subvolume"), false},
		{errors.New("read stream: connection reset by peer"), false},
	} {
		if got := noSpace(c.err); got != c.want {
			t.Errorf("noSpace(%q) = %v, want %v", c.err, got, c.want)
		}
	}
}
