package builder

import (
	"context"
	"fmt"
	"time"

	"github.com/strata-nix/strata/api"
)

// AskServer is `strata builder --check-config`'s look at server.api,
// changing nothing (two GETs, 5 s at most): whether it answers, with
// generations of this builder's store.dir, and whether its nfs.allow
// admits this host as the server sees it. Each line is one finding; a
// WARNING is something a start goes ahead with and then waits on
// (retrying, store.dir left alone). Nothing is asked when server.api is
// empty (the server is found by gossip).
func AskServer(ctx context.Context, cfg Config) []string {
	if cfg.ServerAPI == "" {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c := api.NewClient(cfg.ServerAPI, "")
	list, err := c.Generations(ctx)
	if err != nil {
		return []string{fmt.Sprintf("WARNING: server.api %s does not answer now (%v): a start waits for it, retrying, and leaves store.dir alone", cfg.ServerAPI, err)}
	}
	newest := "none yet"
	if n := len(list.Generations); n > 0 {
		newest = fmt.Sprint(list.Generations[n-1].ID)
	}
	out := []string{fmt.Sprintf("server %s answers: %d live generations, newest %s", cfg.ServerAPI, len(list.Generations), newest)}
	if list.StoreDir != "" && list.StoreDir != cfg.StoreDir {
		out = append(out, fmt.Sprintf("WARNING: server %s serves generations of store dir %s, but this builder's store.dir is %s: nothing is mounted until they agree", cfg.ServerAPI, list.StoreDir, cfg.StoreDir))
	}
	acc, err := c.NFSAccess(ctx)
	switch {
	case err != nil:
		out = append(out, fmt.Sprintf("WARNING: could not ask server %s whether its nfs.allow admits this host: %v", cfg.ServerAPI, err))
	case acc.NFS == "":
		out = append(out, fmt.Sprintf("WARNING: server %s has no NFS export (nfs.listen is empty): nothing can be mounted", cfg.ServerAPI))
	case !acc.Allowed:
		out = append(out, fmt.Sprintf("WARNING: server %s refuses NFS connections from this host: it sees this host as %s, which is not in its nfs.allow %v; nothing is mounted until it is", cfg.ServerAPI, acc.Address, acc.Allow))
	default:
		out = append(out, fmt.Sprintf("server %s's nfs.allow %v admits this host (%s)", cfg.ServerAPI, acc.Allow, acc.Address))
	}
	return out
}
