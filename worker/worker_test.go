package worker_test

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/cas/castest"
	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/internal/actiondtest"
	"github.com/actiond/actiond/internal/testutil"
	rwpb "github.com/actiond/actiond/proto/buildbarn/remoteworker"
	"github.com/actiond/actiond/remote"
	"github.com/actiond/actiond/sandbox"
	"github.com/actiond/actiond/worker"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// scheduler is a minimal OperationQueue for the tests: it hands out queued
// actions to idle runners (long-polling briefly), asks executing runners
// to resynchronize every 50ms, records every state it is told about and
// cancels the actions in its cancel set.
type scheduler struct {
	rwpb.UnimplementedOperationQueueServer
	queue chan *rwpb.DesiredState_Executing
	done  chan string

	mu         sync.Mutex
	states     map[string][]string // action hash → state transitions
	syncs      map[string]int      // action hash → executing synchronizations
	results    map[string]*repb.ExecuteResponse
	cancel     map[string]bool
	left       map[string]bool // worker ids that asked to be idle while idle
	drainedRes map[string]bool // action hashes completed with prefer_being_idle
	threads    map[string]bool

	srv  *grpc.Server
	addr string
}

func newScheduler(t *testing.T) *scheduler {
	s := &scheduler{
		queue:      make(chan *rwpb.DesiredState_Executing, 16),
		done:       make(chan string, 16),
		states:     map[string][]string{},
		syncs:      map[string]int{},
		results:    map[string]*repb.ExecuteResponse{},
		cancel:     map[string]bool{},
		left:       map[string]bool{},
		drainedRes: map[string]bool{},
		threads:    map[string]bool{},
	}
	s.start(t, "127.0.0.1:0")
	t.Cleanup(s.stop)
	return s
}

// start serves on addr (a restart reuses the previous address).
func (s *scheduler) start(t *testing.T, addr string) {
	t.Helper()
	var l net.Listener
	var err error
	for range 50 {
		if l, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	s.addr = l.Addr().String()
	s.srv = grpc.NewServer()
	rwpb.RegisterOperationQueueServer(s.srv, s)
	go s.srv.Serve(l)
}

func (s *scheduler) stop() { s.srv.Stop() }

func stateName(ex *rwpb.CurrentState_Executing) string {
	switch ex.ExecutionState.(type) {
	case *rwpb.CurrentState_Executing_Started:
		return "started"
	case *rwpb.CurrentState_Executing_FetchingInputs:
		return "fetching_inputs"
	case *rwpb.CurrentState_Executing_Running:
		return "running"
	case *rwpb.CurrentState_Executing_UploadingOutputs:
		return "uploading_outputs"
	case *rwpb.CurrentState_Executing_Completed:
		return "completed"
	}
	return "?"
}

func (s *scheduler) Synchronize(ctx context.Context, req *rwpb.SynchronizeRequest) (*rwpb.SynchronizeResponse, error) {
	s.mu.Lock()
	s.threads[req.WorkerId["thread"]] = true
	if ex := req.CurrentState.GetExecuting(); ex != nil {
		h := ex.ActionDigest.GetHash()
		name := stateName(ex)
		if st := s.states[h]; len(st) == 0 || st[len(st)-1] != name {
			s.states[h] = append(st, name)
		}
		s.syncs[h]++
		if c := ex.GetCompleted(); c != nil {
			s.results[h] = c
			if req.PreferBeingIdle {
				s.drainedRes[h] = true
			}
			s.mu.Unlock()
			s.done <- h
			return &rwpb.SynchronizeResponse{NextSynchronizationAt: timestamppb.Now()}, nil
		}
		cancel := s.cancel[h]
		s.mu.Unlock()
		if cancel {
			return &rwpb.SynchronizeResponse{DesiredState: &rwpb.DesiredState{WorkerState: &rwpb.DesiredState_Idle{Idle: &emptypb.Empty{}}}}, nil
		}
		return &rwpb.SynchronizeResponse{NextSynchronizationAt: timestamppb.New(time.Now().Add(50 * time.Millisecond))}, nil
	}
	if req.PreferBeingIdle {
		s.left[fmt.Sprint(req.WorkerId)] = true
		s.mu.Unlock()
		return &rwpb.SynchronizeResponse{}, nil
	}
	s.mu.Unlock()
	select {
	case a := <-s.queue:
		return &rwpb.SynchronizeResponse{
			NextSynchronizationAt: timestamppb.Now(),
			DesiredState:          &rwpb.DesiredState{WorkerState: &rwpb.DesiredState_Executing_{Executing: a}},
		}, nil
	case <-time.After(200 * time.Millisecond):
		return &rwpb.SynchronizeResponse{NextSynchronizationAt: timestamppb.Now()}, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (s *scheduler) statesOf(d cas.Digest) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.states[d.Hash])
}

func (s *scheduler) waitState(t *testing.T, d cas.Digest, name string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !slices.Contains(s.statesOf(d), name) {
		if time.Now().After(deadline) {
			t.Fatalf("action never reached %s; states %v", name, s.statesOf(d))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (s *scheduler) waitDone(t *testing.T, d cas.Digest) *repb.ExecuteResponse {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case h := <-s.done:
			if h == d.Hash {
				s.mu.Lock()
				defer s.mu.Unlock()
				return s.results[h]
			}
		case <-timeout:
			t.Fatalf("action %s never completed; states %v", d, s.statesOf(d))
		}
	}
}

// env is a farm (actiond cache server on loopback), a test scheduler and a
// worker whose executor uses the farm's CAS and AC.
type env struct {
	t     *testing.T
	farm  *actiond.Server
	sched *scheduler
	stop  context.CancelFunc
	ended chan error
}

func newEnv(t *testing.T, concurrency int) *env {
	t.Helper()
	testutil.RequireRoot(t)
	farm, addr := actiondtest.TCP(t, actiond.Options{NoFsync: true})
	sched := newScheduler(t)

	root := t.TempDir()
	casConn, err := grpc.NewClient(addr, worker.DialOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { casConn.Close() })
	local, err := cas.NewDiskStore(filepath.Join(root, "cas"), cas.WithFsync(false))
	if err != nil {
		t.Fatal(err)
	}
	store := remote.NewCachedStore(casConn, local, remote.Options{})
	linkable, ok := cas.LocalFiles(store)
	if !ok {
		t.Fatal("the worker's read-through cache keeps no local files")
	}
	sb, err := sandbox.New(sandbox.Config{Runtimes: []sandbox.Runtime{sandbox.HostRuntime()}, StateDir: filepath.Join(root, "sandbox")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sb.Close() })
	ex, err := executor.New(executor.Options{
		Store:     store,
		Cache:     remote.NewActionCache(casConn, ""),
		Sandbox:   sb,
		StageDir:  filepath.Join(root, "cas", "stage"),
		Worker:    "test-worker",
		InputRoot: executor.LinkInputRoot{Store: linkable},
	})
	if err != nil {
		t.Fatal(err)
	}
	schedConn, err := grpc.NewClient(sched.addr, worker.DialOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { schedConn.Close() })
	w, err := worker.New(worker.Options{
		Scheduler:   rwpb.NewOperationQueueClient(schedConn),
		Executor:    ex,
		Store:       store,
		WorkerID:    map[string]string{"hostname": "test"},
		Platform:    &repb.Platform{Properties: []*repb.Platform_Property{{Name: "OSFamily", Value: "linux"}}},
		Concurrency: concurrency,
		MinBackoff:  20 * time.Millisecond,
		MaxBackoff:  200 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	e := &env{t: t, farm: farm, sched: sched, stop: cancel, ended: make(chan error, 1)}
	go func() { e.ended <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-e.ended:
		case <-time.After(30 * time.Second):
			t.Error("worker did not stop")
		}
	})
	return e
}

func (e *env) put(data []byte) cas.Digest {
	e.t.Helper()
	return castest.Put(e.t, e.farm.Store, data)
}

func (e *env) putProto(m proto.Message) cas.Digest {
	e.t.Helper()
	return castest.PutProto(e.t, e.farm.Store, m)
}

// submit stores a shell action in the farm's CAS and queues it.
func (e *env) submit(script string, inputs *repb.Directory, outs ...string) cas.Digest {
	e.t.Helper()
	if inputs == nil {
		inputs = &repb.Directory{}
	}
	cmd := &repb.Command{
		Arguments:            []string{"/bin/sh", "-c", script},
		EnvironmentVariables: []*repb.Command_EnvironmentVariable{{Name: "PATH", Value: "/usr/bin:/bin"}},
		OutputPaths:          outs,
	}
	action := &repb.Action{CommandDigest: e.putProto(cmd).Proto(), InputRootDigest: e.putProto(inputs).Proto()}
	d := e.putProto(action)
	e.sched.queue <- &rwpb.DesiredState_Executing{
		ActionDigest:    d.Proto(),
		Action:          action,
		QueuedTimestamp: timestamppb.Now(),
		DigestFunction:  repb.DigestFunction_SHA256,
	}
	return d
}

func (e *env) read(pd *repb.Digest) string {
	e.t.Helper()
	return castest.ReadString(e.t, e.farm.Store, pd)
}

var allStates = []string{"started", "fetching_inputs", "running", "uploading_outputs", "completed"}

func TestExecuteReportsStatesUploadsOutputsAndWritesAC(t *testing.T) {
	e := newEnv(t, 2)
	in := e.put([]byte("input from the farm\n"))
	d := e.submit("cat in.txt > out.txt && echo to-stdout && sleep 0.2",
		&repb.Directory{Files: []*repb.FileNode{{Name: "in.txt", Digest: in.Proto()}}}, "out.txt")
	resp := e.sched.waitDone(t, d)
	if resp.GetStatus().GetCode() != 0 || resp.Result.GetExitCode() != 0 {
		t.Fatalf("status %v, exit %d: %s", resp.Status, resp.Result.GetExitCode(), resp.Message)
	}
	if got := e.sched.statesOf(d); !slices.Equal(got, allStates) {
		t.Fatalf("states %v, want %v", got, allStates)
	}
	if len(resp.Result.OutputFiles) != 1 || e.read(resp.Result.OutputFiles[0].Digest) != "input from the farm\n" {
		t.Fatalf("outputs %v", resp.Result.OutputFiles)
	}
	if got := e.read(resp.Result.StdoutDigest); got != "to-stdout\n" {
		t.Fatalf("stdout %q", got)
	}
	res, err := e.farm.Cache.Get(context.Background(), d)
	if err != nil {
		t.Fatalf("farm ActionCache: %v", err)
	}
	if res.ExecutionMetadata.GetWorker() != "test-worker" {
		t.Fatalf("AC result from worker %q", res.ExecutionMetadata.GetWorker())
	}
	// A second action runs too; both runners synchronize.
	d2 := e.submit("echo again > out.txt", nil, "out.txt")
	if r := e.sched.waitDone(t, d2); r.Result.GetExitCode() != 0 {
		t.Fatalf("second action: %v", r)
	}
	e.sched.mu.Lock()
	threads := len(e.sched.threads)
	e.sched.mu.Unlock()
	if threads != 2 {
		t.Fatalf("%d runners synchronized, want 2", threads)
	}
}

func TestFailedActionIsReported(t *testing.T) {
	e := newEnv(t, 1)
	d := e.submit("echo bad >&2; exit 3", nil)
	resp := e.sched.waitDone(t, d)
	if resp.Result.GetExitCode() != 3 || e.read(resp.Result.StderrDigest) != "bad\n" {
		t.Fatalf("result %v", resp.Result)
	}
	if _, err := e.farm.Cache.Get(context.Background(), d); err == nil {
		t.Fatal("failed action was cached")
	}
}

func TestSchedulerCancels(t *testing.T) {
	e := newEnv(t, 1)
	d := e.submit("sleep 30", nil)
	e.sched.waitState(t, d, "running")
	start := time.Now()
	e.sched.mu.Lock()
	e.sched.cancel[d.Hash] = true
	e.sched.mu.Unlock()
	// The only runner is free again: the next action runs.
	d2 := e.submit("true", nil)
	if r := e.sched.waitDone(t, d2); r.Result.GetExitCode() != 0 {
		t.Fatalf("action after cancel: %v", r)
	}
	if el := time.Since(start); el > 15*time.Second {
		t.Fatalf("cancellation took %s", el)
	}
	if st := e.sched.statesOf(d); slices.Contains(st, "completed") {
		t.Fatalf("cancelled action reported %v", st)
	}
}

func TestSchedulerRestart(t *testing.T) {
	e := newEnv(t, 1)
	d := e.submit("sleep 1 && echo done > out.txt", nil, "out.txt")
	e.sched.waitState(t, d, "running")
	addr := e.sched.addr
	e.sched.stop()
	time.Sleep(500 * time.Millisecond)
	e.sched.start(t, addr)
	resp := e.sched.waitDone(t, d)
	if resp.Result.GetExitCode() != 0 || len(resp.Result.OutputFiles) != 1 {
		t.Fatalf("result after restart %v", resp)
	}
	if got := e.sched.statesOf(d); !slices.Equal(got, allStates) {
		t.Fatalf("states %v, want %v", got, allStates)
	}
	// Idle long-polls reach the restarted scheduler too.
	e.sched.stop()
	time.Sleep(300 * time.Millisecond)
	e.sched.start(t, addr)
	d2 := e.submit("true", nil)
	if r := e.sched.waitDone(t, d2); r.Result.GetExitCode() != 0 {
		t.Fatalf("action after second restart: %v", r)
	}
}

func TestDrain(t *testing.T) {
	e := newEnv(t, 2)
	d := e.submit("sleep 1 && echo done > out.txt", nil, "out.txt")
	e.sched.waitState(t, d, "running")
	e.stop()
	select {
	case err := <-e.ended:
		e.ended <- err // for the cleanup
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("worker did not drain")
	}
	e.sched.mu.Lock()
	defer e.sched.mu.Unlock()
	res := e.sched.results[d.Hash]
	if res == nil || res.Result.GetExitCode() != 0 {
		t.Fatalf("running action was not finished before exit: %v (states %v)", res, e.sched.states[d.Hash])
	}
	if !e.sched.drainedRes[d.Hash] {
		t.Error("completion during drain did not set prefer_being_idle")
	}
	if len(e.sched.left) != 2 {
		t.Errorf("%d runners said goodbye, want 2", len(e.sched.left))
	}
}

// TestSchedulerActionWins: Buildbarn's scheduler sends the Action with the
// timeout it settled on under the client's digest; the worker runs that
// Action, not the stored one.
func TestSchedulerActionWins(t *testing.T) {
	e := newEnv(t, 1)
	cmd := &repb.Command{Arguments: []string{"/bin/sh", "-c", "sleep 30"}}
	stored := &repb.Action{CommandDigest: e.putProto(cmd).Proto(), InputRootDigest: e.putProto(&repb.Directory{}).Proto()}
	d := e.putProto(stored)
	capped := proto.Clone(stored).(*repb.Action)
	capped.Timeout = durationpb.New(500 * time.Millisecond)
	start := time.Now()
	e.sched.queue <- &rwpb.DesiredState_Executing{ActionDigest: d.Proto(), Action: capped, DigestFunction: repb.DigestFunction_SHA256}
	resp := e.sched.waitDone(t, d)
	if codes.Code(resp.GetStatus().GetCode()) != codes.DeadlineExceeded {
		t.Fatalf("status %v, want DEADLINE_EXCEEDED from the scheduler's 500ms timeout (the stored Action has none)", resp.GetStatus())
	}
	if took := time.Since(start); took > 20*time.Second {
		t.Errorf("the action ran %s: the scheduler's timeout was not applied", took)
	}
}
