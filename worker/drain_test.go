package worker_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/executor"
	rwpb "github.com/actiond/actiond/proto/buildbarn/remoteworker"
	"github.com/actiond/actiond/worker"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
)

// heldExecutor is a worker.Executor whose executions report each stage and
// finish when release is closed: what surrounds an execution, without a
// sandbox.
type heldExecutor struct {
	release chan struct{}
	once    sync.Once
	started chan struct{}
}

func (h *heldExecutor) Execute(ctx context.Context, req executor.Request) *repb.ExecuteResponse {
	for _, s := range []executor.Stage{executor.StageFetchingInputs, executor.StageRunning} {
		req.Progress(s)
	}
	h.once.Do(func() { close(h.started) })
	select {
	case <-h.release:
	case <-ctx.Done():
	}
	return &repb.ExecuteResponse{Result: &repb.ActionResult{}}
}

// TestDrainWithTheSchedulerGone: after SIGTERM, with the scheduler gone,
// `actiond worker` kept retrying to report a finished action for as long
// as it ran (over 30 s, until a second signal). Reports during a drain
// are now given up after DrainReportTimeout, and Run returns.
func TestDrainWithTheSchedulerGone(t *testing.T) {
	sched := newScheduler(t)
	conn, err := grpc.NewClient(sched.addr, worker.DialOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ex := &heldExecutor{release: make(chan struct{}), started: make(chan struct{})}
	w, err := worker.New(worker.Options{
		Scheduler:          rwpb.NewOperationQueueClient(conn),
		Executor:           ex,
		WorkerID:           map[string]string{"hostname": "test"},
		Concurrency:        2,
		MinBackoff:         20 * time.Millisecond,
		MaxBackoff:         200 * time.Millisecond,
		DrainReportTimeout: 500 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, drain := context.WithCancel(context.Background())
	ended := make(chan error, 1)
	go func() { ended <- w.Run(ctx) }()
	d := cas.DigestOf([]byte("an action"))
	sched.queue <- &rwpb.DesiredState_Executing{ActionDigest: d.Proto(), DigestFunction: repb.DigestFunction_SHA256}
	<-ex.started
	sched.waitState(t, d, "running")
	sched.stop() // the scheduler goes away...
	drain()      // ...and the worker is told to stop
	close(ex.release)
	select {
	case err := <-ended:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the worker was still trying to reach the gone scheduler 30 s after it was told to stop, with nothing running")
	}
}
