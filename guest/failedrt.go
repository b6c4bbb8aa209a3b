//go:build linux

package guest

import (
	"context"
	"maps"
	"slices"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/sandbox"
)

// failedRuntimes is the executor's sandbox in a guest where some runtimes
// of the disk could not be prepared: it lists them with the working ones,
// so that an action naming one is not told "unknown runtime" (or run
// elsewhere) but gets FAILED_PRECONDITION with the reason.
type failedRuntimes struct {
	sb     *sandbox.Sandbox // nil when no runtime works
	failed map[string]string
	names  []string
}

// withFailedRuntimes wraps sb (which may be nil when every runtime failed).
func withFailedRuntimes(sb *sandbox.Sandbox, failed map[string]string) executor.Sandbox {
	if len(failed) == 0 {
		return sb
	}
	f := &failedRuntimes{sb: sb, failed: failed}
	if sb != nil {
		f.names = sb.Runtimes()
	}
	f.names = append(f.names, slices.Collect(maps.Keys(failed))...)
	slices.Sort(f.names)
	return f
}

func (f *failedRuntimes) Runtimes() []string { return slices.Clone(f.names) }

func (f *failedRuntimes) Run(ctx context.Context, spec *executor.RunSpec) (*executor.RunResult, error) {
	if reason, ok := f.failed[spec.Runtime]; ok {
		return nil, &unavailableRuntimeError{msg: brokenRuntimeError(spec.Runtime, reason)}
	}
	if f.sb == nil {
		return nil, &executor.UnknownRuntimeError{Name: spec.Runtime, Available: f.names}
	}
	return f.sb.Run(ctx, spec)
}

// unavailableRuntimeError is FAILED_PRECONDITION with the reason; its text
// is the message alone, so that the executor's wrapping reads well.
type unavailableRuntimeError struct{ msg string }

func (e *unavailableRuntimeError) Error() string { return e.msg }

func (e *unavailableRuntimeError) GRPCStatus() *status.Status {
	return status.New(codes.FailedPrecondition, e.msg)
}
