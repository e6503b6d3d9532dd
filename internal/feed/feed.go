// Package feed runs a command whose standard input is a stream the caller
// reads from the network (snapshot receives), so that a stalled or broken
// stream neither hangs the caller nor passes for a whole one.
package feed

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
)

// Run starts cmd (made with exec.CommandContext) with r copied to its
// standard input by a goroutine of its own, and waits for the command.
// When the command fails or ctx ends, Run returns without waiting for a
// Read of r that may never end: the caller owns r and closes it, which ends
// the copy. When the command succeeds, Run waits for the copy and fails if
// reading r failed (the command may have taken an early end of its input
// for the stream's end). The command's combined output is put into errors.
func Run(ctx context.Context, cmd *exec.Cmd, r io.Reader) error {
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		stdin.Close()
		return err
	}
	copied := make(chan error, 1)
	go func() {
		_, err := io.Copy(stdin, r)
		copied <- err // before the close: a command failing on the early end finds it
		stdin.Close()
	}()
	err = cmd.Wait()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err != nil {
		// Reading the stream failed first (a stall, a reset): that is the
		// cause, the command's failure on a short input its consequence.
		select {
		case rerr := <-copied:
			if rerr != nil && !errors.Is(rerr, syscall.EPIPE) && !errors.Is(rerr, os.ErrClosed) {
				return fmt.Errorf("%s: read stream: %w (%v: %s)", strings.Join(cmd.Args, " "), rerr, err, strings.TrimSpace(out.String()))
			}
		default:
		}
		return fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args, " "), err, strings.TrimSpace(out.String()))
	}
	// The command read its stream to its end; the copy ends now (the pipe
	// is closed: EPIPE, or r is at its end).
	if err := <-copied; err != nil && !errors.Is(err, syscall.EPIPE) && !errors.Is(err, os.ErrClosed) {
		return fmt.Errorf("%s: read stream: %w", strings.Join(cmd.Args, " "), err)
	}
	return nil
}
