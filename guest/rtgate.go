//go:build linux

package guest

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/sandbox"
)

// runtimeGate is the executor's sandbox in a guest whose runtimes are not
// all usable: runtimes that could not be prepared are listed with the
// working ones, so that an action naming one is not told "unknown runtime"
// (or run elsewhere) but gets FAILED_PRECONDITION with the reason; and an
// action naming a runtime still being prepared (first boot) waits until it
// is ready or has failed, or until the action's own deadline.
type runtimeGate struct {
	sb    *sandbox.Sandbox // nil when no runtime works
	names []string
	log   *slog.Logger

	mu      sync.Mutex
	failed  map[string]string
	pending map[string]chan struct{} // closed when the runtime is ready or failed
	info    map[string]any           // per runtime, for the guest Info call
}

// withFailedRuntimes wraps sb (which may be nil when every runtime failed).
func withFailedRuntimes(sb *sandbox.Sandbox, failed map[string]string) executor.Sandbox {
	if len(failed) == 0 {
		return sb
	}
	return newRuntimeGate(sb, failed, nil, nil)
}

// newRuntimeGate wraps sb, whose runtimes include the pending ones (their
// roots are sealed when ready: see resolve).
func newRuntimeGate(sb *sandbox.Sandbox, failed map[string]string, pending []string, log *slog.Logger) *runtimeGate {
	if log == nil {
		log = slog.Default()
	}
	g := &runtimeGate{sb: sb, log: log, failed: maps.Clone(failed), pending: map[string]chan struct{}{}, info: map[string]any{}}
	if g.failed == nil {
		g.failed = map[string]string{}
	}
	if sb != nil {
		g.names = sb.Runtimes()
	}
	for name := range failed {
		if !slices.Contains(g.names, name) {
			g.names = append(g.names, name)
		}
	}
	for _, name := range pending {
		g.pending[name] = make(chan struct{})
		g.info[name] = map[string]any{"state": "pending"}
	}
	slices.Sort(g.names)
	return g
}

// resolve records that the pending runtime name is ready (err nil, info
// describing it) or failed.
func (g *runtimeGate) resolve(name string, info map[string]any, err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if err != nil {
		g.failed[name] = err.Error()
		info = map[string]any{"failed": err.Error()}
	}
	g.info[name] = info
	if ch, ok := g.pending[name]; ok {
		close(ch)
		delete(g.pending, name)
	}
}

// runtimesInfo returns the live state of the runtimes this gate prepared.
func (g *runtimeGate) runtimesInfo() map[string]any {
	g.mu.Lock()
	defer g.mu.Unlock()
	return maps.Clone(g.info)
}

func (g *runtimeGate) Runtimes() []string { return slices.Clone(g.names) }

func (g *runtimeGate) Run(ctx context.Context, spec *executor.RunSpec) (*executor.RunResult, error) {
	g.mu.Lock()
	wait := g.pending[spec.Runtime]
	g.mu.Unlock()
	if wait != nil {
		g.log.Info("action waits for its runtime, being prepared on this first boot with it", "runtime", spec.Runtime)
		select {
		case <-wait:
		case <-ctx.Done():
			return nil, fmt.Errorf("runtime %s is still being prepared (first boot with this payload: the runtime is extracted and configured once, then kept on the CAS disk): %w",
				strconv.Quote(spec.Runtime), context.Cause(ctx))
		}
	}
	g.mu.Lock()
	reason, bad := g.failed[spec.Runtime]
	g.mu.Unlock()
	if bad {
		return nil, &unavailableRuntimeError{msg: brokenRuntimeError(spec.Runtime, reason)}
	}
	if g.sb == nil {
		return nil, &executor.UnknownRuntimeError{Name: spec.Runtime, Available: g.names}
	}
	return g.sb.Run(ctx, spec)
}

// unavailableRuntimeError is FAILED_PRECONDITION with the reason; its text
// is the message alone, so that the executor's wrapping reads well.
type unavailableRuntimeError struct{ msg string }

func (e *unavailableRuntimeError) Error() string { return e.msg }

func (e *unavailableRuntimeError) GRPCStatus() *status.Status {
	return status.New(codes.FailedPrecondition, e.msg)
}
