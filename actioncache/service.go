package actioncache

import (
	"context"
	"errors"
	"fmt"

	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// maxInline bounds the bytes inlined into one GetActionResult response.
const maxInline = 1 << 20

// Service implements the REAPI ActionCache service.
type Service struct {
	repb.UnimplementedActionCacheServer
	cache    Cache
	store    cas.Store
	readOnly bool
	// limits refuse results at UpdateActionResult that would be costly to
	// check at every GetActionResult (DefaultLimits unless set).
	limits Limits
}

// SetLimits changes the limits UpdateActionResult enforces after
// construction (see ServiceOptions.Limits); use the same
// as the cache's (BoltCache.SetLimits).
func (s *Service) SetLimits(l Limits) { s.limits = l }

// ServiceOptions configure a Service; a zero field is its default.
type ServiceOptions struct {
	// ReadOnly refuses UpdateActionResult, for servers where only
	// executions may populate the cache.
	ReadOnly bool
	// Limits refuse results at UpdateActionResult that would be costly to
	// check at every GetActionResult; a zero field is DefaultLimits'. Use
	// the same as the cache's (BoltCache.SetLimits).
	Limits Limits
}

// NewService serves cache; store is used to inline outputs.
func NewService(cache Cache, store cas.Store, o ServiceOptions) *Service {
	return &Service{cache: cache, store: store, readOnly: o.ReadOnly, limits: o.Limits.OrDefault()}
}

func toStatus(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, ErrNotFound):
		return status.Error(codes.NotFound, err.Error())
	}
	return cas.ToStatus(err)
}

// GetActionResult implements the REAPI method.
func (s *Service) GetActionResult(ctx context.Context, req *repb.GetActionResultRequest) (*repb.ActionResult, error) {
	if err := cas.CheckDigestFunction(req.DigestFunction); err != nil {
		return nil, err
	}
	d, err := cas.FromProto(req.ActionDigest)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "action_digest: %v", err)
	}
	res, err := s.cache.Get(ctx, d)
	if err != nil {
		return nil, toStatus(err)
	}
	budget := int64(maxInline)
	inline := func(pd *repb.Digest) []byte {
		dd, err := cas.FromProto(pd)
		if err != nil || dd.Size > budget {
			return nil
		}
		b, err := cas.ReadAll(ctx, s.store, dd)
		if err != nil {
			return nil
		}
		budget -= dd.Size
		return b
	}
	if req.InlineStdout && res.StdoutDigest != nil {
		res.StdoutRaw = inline(res.StdoutDigest)
	}
	if req.InlineStderr && res.StderrDigest != nil {
		res.StderrRaw = inline(res.StderrDigest)
	}
	if len(req.InlineOutputFiles) > 0 {
		want := make(map[string]bool, len(req.InlineOutputFiles))
		for _, p := range req.InlineOutputFiles {
			want[p] = true
		}
		for _, f := range res.OutputFiles {
			if want[f.Path] {
				f.Contents = inline(f.Digest)
			}
		}
	}
	return res, nil
}

// UpdateActionResult implements the REAPI method.
func (s *Service) UpdateActionResult(ctx context.Context, req *repb.UpdateActionResultRequest) (*repb.ActionResult, error) {
	if s.readOnly {
		return nil, status.Error(codes.PermissionDenied, "this server does not accept action results from clients")
	}
	if err := cas.CheckDigestFunction(req.DigestFunction); err != nil {
		return nil, err
	}
	d, err := cas.FromProto(req.ActionDigest)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "action_digest: %v", err)
	}
	if req.ActionResult == nil {
		return nil, status.Error(codes.InvalidArgument, "action_result is missing")
	}
	if err := Validate(req.ActionResult); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "action_result: %v", err)
	}
	if err := CheckLimits(ctx, s.store, req.ActionResult, s.limits); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "action_result: %v; a result this large would have to be re-checked at every lookup", err)
	}
	if err := s.cache.Put(ctx, d, req.ActionResult); err != nil {
		return nil, toStatus(err)
	}
	return req.ActionResult, nil
}

// Validate checks the digests and paths of a result.
func Validate(res *repb.ActionResult) error {
	check := func(what string, pd *repb.Digest, required bool) error {
		if pd == nil {
			if required {
				return fmt.Errorf("%s: digest is missing", what)
			}
			return nil
		}
		if _, err := cas.FromProto(pd); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		return nil
	}
	for _, f := range res.OutputFiles {
		if err := check("output_files "+f.Path, f.Digest, true); err != nil {
			return err
		}
	}
	for _, d := range res.OutputDirectories {
		// REAPI 2.3 clients may send only the root Directory's digest.
		if err := check("output_directories "+d.Path+" tree_digest", d.TreeDigest, d.RootDirectoryDigest == nil); err != nil {
			return err
		}
		if err := check("output_directories "+d.Path+" root_directory_digest", d.RootDirectoryDigest, false); err != nil {
			return err
		}
	}
	if err := check("stdout_digest", res.StdoutDigest, false); err != nil {
		return err
	}
	return check("stderr_digest", res.StderrDigest, false)
}
