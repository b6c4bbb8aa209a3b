package actiond_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/cas/castest"
	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/executor/executortest"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// fakeServer is an actiond.Server over root whose sandbox is sb (no
// command runs, no root needed), with its services on bufconn.
func fakeServer(t *testing.T, root string, sb *executortest.Sandbox, drain time.Duration) (*actiond.Server, repb.ExecutionClient) {
	t.Helper()
	srv, err := actiond.New(actiond.Options{Root: root, Sandbox: sb, InputRootKind: "hardlink", NoFsync: true, DrainTimeout: drain})
	if err != nil {
		t.Fatal(err)
	}
	conn := executortest.Dial(t, srv.Register)
	return srv, repb.NewExecutionClient(conn)
}

// trivialAction stores an Action with an empty input root in store.
func trivialAction(t *testing.T, store cas.Store, arg string) cas.Digest {
	t.Helper()
	put := func(m proto.Message) cas.Digest { return castest.PutProto(t, store, m) }
	cmd := put(&repb.Command{Arguments: []string{"/bin/echo", arg}})
	return put(&repb.Action{CommandDigest: cmd.Proto(), InputRootDigest: put(&repb.Directory{}).Proto()})
}

// TestCloseWaitsForRunningActions: Close used to return while actions
// still ran: the executor then wrote their results to a closed bbolt, with
// the root's lock already released to the next server. Now the result of
// an action running at Close is in the ActionCache the next server opens.
func TestCloseWaitsForRunningActions(t *testing.T) {
	root := t.TempDir()
	release := make(chan struct{})
	sb := &executortest.Sandbox{Func: executortest.Block(release)}
	srv, exec := fakeServer(t, root, sb, time.Minute)
	d := trivialAction(t, srv.Store, "running at Close")
	started := sb.NextRun()
	stream, err := exec.Execute(context.Background(), &repb.ExecuteRequest{ActionDigest: d.Proto()})
	if err != nil {
		t.Fatal(err)
	}
	<-started
	closed := make(chan error, 1)
	go func() { closed <- srv.Close() }()
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) while an action was running", err)
	case <-time.After(300 * time.Millisecond):
	}
	close(release)
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	for {
		op, err := stream.Recv()
		if err != nil {
			t.Fatalf("the client lost its action to the shutdown: %v", err)
		}
		if op.Done {
			break
		}
	}
	next, err := actiond.New(actiond.Options{Root: root})
	if err != nil {
		t.Fatal(err)
	}
	defer next.Close()
	if _, err := next.Cache.Get(context.Background(), d); err != nil {
		t.Fatalf("the result of the action running at Close is not in the ActionCache: %v", err)
	}
}

// TestCloseCancelsActionsAfterTheDrainTimeout: an action that does not
// finish within DrainTimeout is cancelled, and Close returns only once it
// has ended (nothing of it outlives Close), without caching it.
func TestCloseCancelsActionsAfterTheDrainTimeout(t *testing.T) {
	root := t.TempDir()
	var ended atomic.Bool
	sb := &executortest.Sandbox{Func: func(ctx context.Context, _ *executor.RunSpec) (*executor.RunResult, error) {
		<-ctx.Done()
		time.Sleep(100 * time.Millisecond) // a sandbox takes a moment to kill
		ended.Store(true)
		return nil, ctx.Err()
	}}
	srv, exec := fakeServer(t, root, sb, 50*time.Millisecond)
	d := trivialAction(t, srv.Store, "never finishes")
	started := sb.NextRun()
	if _, err := exec.Execute(context.Background(), &repb.ExecuteRequest{ActionDigest: d.Proto()}); err != nil {
		t.Fatal(err)
	}
	<-started
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if !ended.Load() {
		t.Fatal("Close returned before the cancelled action had ended")
	}
	next, err := actiond.New(actiond.Options{Root: root})
	if err != nil {
		t.Fatal(err)
	}
	defer next.Close()
	if _, err := next.Cache.Get(context.Background(), d); err == nil {
		t.Fatal("a cancelled action was cached")
	}
}

// TestStopRefusesNewExecutions: while the server drains, new executions
// get UNAVAILABLE (the client retries elsewhere) instead of starting work
// that Close would cut off.
func TestStopRefusesNewExecutions(t *testing.T) {
	sb := &executortest.Sandbox{}
	srv, exec := fakeServer(t, t.TempDir(), sb, time.Minute)
	defer srv.Close()
	srv.Stop(context.Background())
	d := trivialAction(t, srv.Store, "after stop")
	stream, err := exec.Execute(context.Background(), &repb.ExecuteRequest{ActionDigest: d.Proto()})
	if err == nil {
		_, err = stream.Recv()
	}
	if status.Code(err) != codes.Unavailable || sb.Runs() != 0 {
		t.Fatalf("Execute after Stop: %v, %d runs; want UNAVAILABLE and none", err, sb.Runs())
	}
}
