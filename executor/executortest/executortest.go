// Package executortest has test doubles for code built on package
// executor: a Sandbox that runs no command, for tests of what surrounds a
// run (queueing, deduplication, cancellation, missing inputs, shutdown),
// which then need neither root nor the real sandbox.
package executortest

import (
	"context"
	"net"
	"os"
	"sync"
	"testing"

	"github.com/actiond/actiond/executor"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"
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

// Dial serves what register adds on an in-process (bufconn) gRPC server and
// returns a client connection to it; both are closed when t ends.
func Dial(t testing.TB, register func(grpc.ServiceRegistrar)) *grpc.ClientConn {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	g := grpc.NewServer()
	register(g)
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}
