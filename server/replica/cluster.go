package replica

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/strata-nix/strata/api"
	"github.com/strata-nix/strata/cluster"
)

// FromCluster is the primary that gossip names (replica.from_cluster):
// the one alive server member that is not itself a replica, asked anew at
// every sync. With none, or with more than one (two primaries: which one
// is meant?), a sync fails with an error that says so and receives
// nothing.
func FromCluster(servers func() []cluster.Server, token string) Primary {
	return &fromCluster{servers: servers, token: token}
}

type fromCluster struct {
	servers func() []cluster.Server

	mu    sync.Mutex
	token string
	url   string
	c     *api.Client
}

func (f *fromCluster) pick() (*api.Client, error) {
	var prim []cluster.Server
	for _, s := range f.servers() {
		if !s.Replica && s.API != "" {
			prim = append(prim, s)
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	switch len(prim) {
	case 0:
		return nil, errors.New("replica.from_cluster: no primary server among the cluster's alive members (every server is a replica, or none announced an API address)")
	case 1:
	default:
		var names []string
		for _, s := range prim {
			names = append(names, s.Name+" "+s.API)
		}
		return nil, fmt.Errorf("replica.from_cluster: %d primary servers in the cluster (%v): name one with replica.of", len(prim), names)
	}
	if prim[0].API != f.url {
		f.url, f.c = prim[0].API, api.NewClient(prim[0].API, f.token)
	}
	return f.c, nil
}

func (f *fromCluster) Generations(ctx context.Context) (api.GenerationList, error) {
	c, err := f.pick()
	if err != nil {
		return api.GenerationList{}, err
	}
	return c.Generations(ctx)
}

func (f *fromCluster) Stream(ctx context.Context, r api.StreamRequest) (*api.Stream, error) {
	f.mu.Lock()
	c := f.c
	f.mu.Unlock()
	if c == nil {
		return nil, errors.New("replica.from_cluster: no primary known yet")
	}
	return c.Stream(ctx, r)
}

func (f *fromCluster) Delta(ctx context.Context, from, to uint64) (api.Delta, error) {
	f.mu.Lock()
	c := f.c
	f.mu.Unlock()
	if c == nil {
		return api.Delta{}, errors.New("replica.from_cluster: no primary known yet")
	}
	return c.Delta(ctx, from, to)
}

func (f *fromCluster) CheckToken(ctx context.Context) error {
	f.mu.Lock()
	c := f.c
	f.mu.Unlock()
	if c == nil {
		return nil // no primary known yet: the sync says so
	}
	return c.CheckToken(ctx)
}

// SetToken makes every later request, to this primary or the next one
// gossip names, carry token.
func (f *fromCluster) SetToken(token string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.token = token
	if f.c != nil {
		f.c.SetToken(token)
	}
}

func (f *fromCluster) URL() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.url
}
