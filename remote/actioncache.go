package remote

import (
	"context"
	"fmt"

	"github.com/actiond/actiond/actioncache"
	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ActionCache is an actioncache.Cache over a remote ActionCache service.
// The remote checks completeness of results itself.
type ActionCache struct {
	ac       repb.ActionCacheClient
	instance string
}

var _ actioncache.Cache = (*ActionCache)(nil)

// NewActionCache returns a Cache reaching the ActionCache over conn.
func NewActionCache(conn grpc.ClientConnInterface, instanceName string) *ActionCache {
	return &ActionCache{ac: repb.NewActionCacheClient(conn), instance: instanceName}
}

// Get implements actioncache.Cache; NOT_FOUND wraps actioncache.ErrNotFound.
func (c *ActionCache) Get(ctx context.Context, action cas.Digest) (*repb.ActionResult, error) {
	res, err := c.ac.GetActionResult(ctx, &repb.GetActionResultRequest{
		InstanceName:   c.instance,
		ActionDigest:   action.Proto(),
		DigestFunction: repb.DigestFunction_SHA256,
	})
	if status.Code(err) == codes.NotFound {
		return nil, fmt.Errorf("action %s: %w", action, actioncache.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("remote GetActionResult of %s: %w", action, err)
	}
	return res, nil
}

// Put implements actioncache.Cache.
func (c *ActionCache) Put(ctx context.Context, action cas.Digest, result *repb.ActionResult) error {
	_, err := c.ac.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{
		InstanceName:   c.instance,
		ActionDigest:   action.Proto(),
		ActionResult:   result,
		DigestFunction: repb.DigestFunction_SHA256,
	})
	if err != nil {
		return fmt.Errorf("remote UpdateActionResult of %s: %w", action, err)
	}
	return nil
}
