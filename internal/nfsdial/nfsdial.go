// Package nfsdial dials NFS servers with go-nfs-client for tests and
// benchmarks.
//
// go-nfs-client binds its local port itself (a random one in 49152-65535)
// and gives up on EADDRINUSE; on a machine that has just opened thousands of
// connections (attack tests, benchmarks) that port is often still in
// TIME_WAIT. Dial retries those collisions.
package nfsdial

import (
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/willscott/go-nfs-client/nfs/rpc"
)

// Dial connects to addr ("host:port") over TCP, retrying local port
// collisions for up to about two seconds.
func Dial(addr string) (*rpc.Client, error) {
	var err error
	for i := 0; i < 100; i++ {
		var c *rpc.Client
		c, err = rpc.DialTCP("tcp", addr, false)
		if err == nil {
			return c, nil
		}
		if !errors.Is(err, syscall.EADDRINUSE) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil, fmt.Errorf("dial nfs %s: %w", addr, err)
}
