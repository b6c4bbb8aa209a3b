// Package executortest has test doubles for code built on package
// executor: a Sandbox that runs no command, for tests of what surrounds a
// run (queueing, deduplication, cancellation, missing inputs, validation,
// shutdown), which then need neither root nor the real sandbox; an
// InputRoot that counts what it stages; and an in-process gRPC server.
package executortest

import (
	"context"
	"os"
	"sync"
	"testing"

	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/internal/grpctest"
	"google.golang.org/grpc"
)

// Sandbox is an executor.Sandbox that runs nothing. Each Run calls Func
// (nil: exit 0 at once) and is counted; the command's stdout is Stdout.
type Sandbox struct {
	// Func decides what a run does; it must return when ctx ends.
	Func func(ctx context.Context, spec *executor.RunSpec) (*executor.RunResult, error)
	// Stdout is written to the run's stdout file.
	Stdout string

	mu      sync.Mutex
	runs    int
	started chan struct{}
}

var _ executor.Sandbox = (*Sandbox)(nil)

// Runtimes implements executor.Sandbox: only "host".
func (s *Sandbox) Runtimes() []string { return []string{"host"} }

// Run implements executor.Sandbox.
func (s *Sandbox) Run(ctx context.Context, spec *executor.RunSpec) (*executor.RunResult, error) {
	s.mu.Lock()
	s.runs++
	if s.started != nil {
		close(s.started)
		s.started = nil
	}
	s.mu.Unlock()
	if spec.StdoutPath != "" {
		if err := os.WriteFile(spec.StdoutPath, []byte(s.Stdout), 0o644); err != nil {
			return nil, err
		}
	}
	if s.Func == nil {
		return &executor.RunResult{}, nil
	}
	return s.Func(ctx, spec)
}

// Runs is how many times Run was called.
func (s *Sandbox) Runs() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.runs
}

// NextRun returns a channel closed when Run is next called.
func (s *Sandbox) NextRun() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started == nil {
		s.started = make(chan struct{})
	}
	return s.started
}

// Block returns a Func that waits until release is closed (exit 0) or ctx
// ends (the error a cancelled sandbox returns).
func Block(release <-chan struct{}) func(context.Context, *executor.RunSpec) (*executor.RunResult, error) {
	return func(ctx context.Context, _ *executor.RunSpec) (*executor.RunResult, error) {
		select {
		case <-release:
			return &executor.RunResult{}, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// InputRoot is an executor.InputRoot that counts the roots it is asked
// to stage, for tests of what happens before staging. Each Stage goes to
// Root, or with a nil Root only creates the empty directory.
//
// It takes no StageOptions, so the executor stages the private copy of a
// mutates_inputs action itself, without calling this Stage.
type InputRoot struct {
	Root executor.InputRoot

	mu     sync.Mutex
	stages int
}

var _ executor.InputRoot = (*InputRoot)(nil)

// Name implements executor.InputRoot.
func (r *InputRoot) Name() string {
	if r.Root != nil {
		return r.Root.Name()
	}
	return "executortest"
}

// Stage implements executor.InputRoot.
func (r *InputRoot) Stage(ctx context.Context, tree *executor.InputTree, dir string) (func() error, error) {
	r.mu.Lock()
	r.stages++
	r.mu.Unlock()
	if r.Root != nil {
		return r.Root.Stage(ctx, tree, dir)
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		return nil, err
	}
	return func() error { return nil }, nil
}

// Stages is how many times Stage was called.
func (r *InputRoot) Stages() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.stages
}

// Dial serves what register adds on an in-process (bufconn) gRPC server and
// returns a client connection to it; both are closed when t ends.
func Dial(t testing.TB, register func(grpc.ServiceRegistrar)) *grpc.ClientConn {
	t.Helper()
	g := grpc.NewServer()
	register(g)
	t.Cleanup(g.Stop)
	conn := grpctest.Dial(t, g, grpctest.BufSize)
	t.Cleanup(func() { conn.Close() })
	return conn
}
