package executor

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"runtime"
	"sort"
	"sync"
	"time"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
)

// ServiceOptions configure the Execution service.
type ServiceOptions struct {
	// Concurrency is how many actions run at once (default: number of CPUs).
	Concurrency int
	// MaxQueue bounds actions waiting to run; beyond it Execute fails with
	// RESOURCE_EXHAUSTED (default 10000).
	MaxQueue int
	// CancelGrace is how long an operation nobody watches keeps running
	// before it is cancelled, so a client can reconnect with WaitExecution
	// (default 10s).
	CancelGrace time.Duration
	// Retain is how long finished operations stay available to
	// WaitExecution (default 1 minute).
	Retain time.Duration
}

// Service implements the REAPI Execution service over an Executor.
type Service struct {
	repb.UnimplementedExecutionServer
	ex   *Executor
	opts ServiceOptions
	sem  chan struct{}

	mu       sync.Mutex
	ops      map[string]*operation // by name
	inflight map[cas.Digest]*operation
	queued   int
	running  int
	draining bool // Drain or Stop was called: no new operations

	// runs counts the goroutines executing operations, so that shutdown
	// can wait for them before the stores they write to are closed.
	runs sync.WaitGroup
}

// NewService returns the Execution service.
func NewService(ex *Executor, opts ServiceOptions) *Service {
	if opts.Concurrency <= 0 {
		opts.Concurrency = runtime.NumCPU()
	}
	if opts.MaxQueue <= 0 {
		opts.MaxQueue = 10000
	}
	if opts.CancelGrace <= 0 {
		opts.CancelGrace = 10 * time.Second
	}
	if opts.Retain <= 0 {
		opts.Retain = time.Minute
	}
	return &Service{
		ex:       ex,
		opts:     opts,
		sem:      make(chan struct{}, opts.Concurrency),
		ops:      make(map[string]*operation),
		inflight: make(map[cas.Digest]*operation),
	}
}

// Concurrency is the configured number of parallel actions.
func (s *Service) Concurrency() int { return s.opts.Concurrency }

// Load reports actions waiting and running.
func (s *Service) Load() (queued, running int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.queued, s.running
}

// OperationInfo describes one operation, for status pages.
type OperationInfo struct {
	Name   string
	Action cas.Digest
	Stage  repb.ExecutionStage_Value
	Queued time.Time // when it was accepted
}

// Operations lists the operations not yet completed, oldest first.
func (s *Service) Operations() []OperationInfo {
	s.mu.Lock()
	ops := make([]*operation, 0, len(s.ops))
	for _, op := range s.ops {
		ops = append(ops, op)
	}
	s.mu.Unlock()
	var out []OperationInfo
	for _, op := range ops {
		op.mu.Lock()
		if op.resp == nil {
			out = append(out, OperationInfo{Name: op.name, Action: op.action, Stage: op.stage, Queued: op.queuedAt})
		}
		op.mu.Unlock()
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Queued.Before(out[j].Queued) })
	return out
}

// operation is one execution that any number of clients may watch.
type operation struct {
	name   string
	action cas.Digest
	cancel context.CancelFunc

	mu       sync.Mutex
	stage    repb.ExecutionStage_Value
	resp     *repb.ExecuteResponse // set when done
	changed  chan struct{}         // closed and replaced on every change
	watchers int
	idleT    *time.Timer
	queuedAt time.Time
}

func (op *operation) snapshot() (*longrunningpb.Operation, <-chan struct{}, bool) {
	op.mu.Lock()
	defer op.mu.Unlock()
	md, _ := anypb.New(&repb.ExecuteOperationMetadata{Stage: op.stage, ActionDigest: op.action.Proto()})
	lro := &longrunningpb.Operation{Name: op.name, Metadata: md}
	if op.resp != nil {
		lro.Done = true
		r, _ := anypb.New(op.resp)
		lro.Result = &longrunningpb.Operation_Response{Response: r}
	}
	return lro, op.changed, op.resp != nil
}

func (op *operation) set(stage repb.ExecutionStage_Value, resp *repb.ExecuteResponse) {
	op.mu.Lock()
	defer op.mu.Unlock()
	op.stage = stage
	if resp != nil {
		op.resp = resp
	}
	close(op.changed)
	op.changed = make(chan struct{})
}

func newOperationName() string {
	var b [16]byte
	rand.Read(b[:])
	return "operations/" + hex.EncodeToString(b[:])
}

// Execute implements the REAPI method.
func (s *Service) Execute(req *repb.ExecuteRequest, stream repb.Execution_ExecuteServer) error {
	if err := cas.CheckDigestFunction(req.DigestFunction); err != nil {
		return err
	}
	d, err := cas.FromProto(req.ActionDigest)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "action_digest: %v", err)
	}
	// REAPI: the in-flight executions of a do_not_cache Action "may not
	// be merged"; skip_cache_lookup asks for a fresh execution too.
	merge := !req.SkipCacheLookup && !s.ex.doNotCache(stream.Context(), d)
	op, err := s.start(d, req.SkipCacheLookup, merge)
	if err != nil {
		return err
	}
	return s.watch(op, stream, true)
}

// WaitExecution implements the REAPI method.
func (s *Service) WaitExecution(req *repb.WaitExecutionRequest, stream repb.Execution_WaitExecutionServer) error {
	s.mu.Lock()
	op := s.ops[req.Name]
	s.mu.Unlock()
	if op == nil {
		return status.Errorf(codes.NotFound, "operation %q is not known (finished operations are kept for %s)", req.Name, s.opts.Retain)
	}
	return s.watch(op, stream, false)
}

type opStream interface {
	Send(*longrunningpb.Operation) error
	Context() context.Context
}

// start returns the operation running d, joining an identical one in
// flight when merge is set. The caller is counted as a watcher of the
// operation already, so an idle timer cannot cancel it between start and
// watch.
func (s *Service) start(d cas.Digest, skipCache, merge bool) (*operation, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining {
		return nil, status.Error(codes.Unavailable, "the server is shutting down; retry on another server or after it restarts")
	}
	if merge {
		if op := s.inflight[d]; op != nil {
			op.mu.Lock()
			op.addWatcherLocked()
			op.mu.Unlock()
			return op, nil
		}
	}
	if s.queued >= s.opts.MaxQueue {
		return nil, status.Errorf(codes.ResourceExhausted, "%d actions are already queued (limit %d); retry later", s.queued, s.opts.MaxQueue)
	}
	ctx, cancel := context.WithCancel(context.Background())
	op := &operation{name: newOperationName(), action: d, cancel: cancel, stage: repb.ExecutionStage_QUEUED, changed: make(chan struct{}), queuedAt: time.Now(), watchers: 1}
	s.ops[op.name] = op
	if merge {
		s.inflight[d] = op
	}
	s.queued++
	queuedAt := time.Now()
	s.runs.Add(1)
	go func() {
		defer s.runs.Done()
		s.run(ctx, op, skipCache, queuedAt)
	}()
	return op, nil
}

func (op *operation) addWatcherLocked() {
	op.watchers++
	if op.idleT != nil {
		op.idleT.Stop()
		op.idleT = nil
	}
}

func (s *Service) run(ctx context.Context, op *operation, skipCache bool, queuedAt time.Time) {
	defer op.cancel()
	var resp *repb.ExecuteResponse
	select {
	case s.sem <- struct{}{}:
		s.mu.Lock()
		s.queued--
		s.running++
		s.mu.Unlock()
		op.set(repb.ExecutionStage_EXECUTING, nil)
		resp = s.ex.Execute(ctx, Request{
			ActionDigest: op.action, SkipCacheLookup: skipCache, Queued: queuedAt,
			Progress: func(st Stage) {
				if st == StageCacheCheck {
					op.set(repb.ExecutionStage_CACHE_CHECK, nil)
				} else {
					op.set(repb.ExecutionStage_EXECUTING, nil)
				}
			},
		})
		<-s.sem
		s.mu.Lock()
		s.running--
		s.mu.Unlock()
	case <-ctx.Done():
		s.mu.Lock()
		s.queued--
		s.mu.Unlock()
		resp = &repb.ExecuteResponse{Status: StatusProto(ctx.Err())}
	}
	s.mu.Lock()
	if s.inflight[op.action] == op {
		delete(s.inflight, op.action)
	}
	s.mu.Unlock()
	op.set(repb.ExecutionStage_COMPLETED, resp)
	time.AfterFunc(s.opts.Retain, func() {
		s.mu.Lock()
		delete(s.ops, op.name)
		s.mu.Unlock()
	})
}

// watch streams op's updates until it is done or the client goes away. An
// operation nobody watches for CancelGrace is cancelled. counted says the
// caller is already counted as a watcher (start did it).
func (s *Service) watch(op *operation, stream opStream, counted bool) error {
	if !counted {
		op.mu.Lock()
		op.addWatcherLocked()
		op.mu.Unlock()
	}
	defer func() {
		op.mu.Lock()
		op.watchers--
		if op.watchers == 0 && op.resp == nil {
			op.idleT = time.AfterFunc(s.opts.CancelGrace, func() { s.cancelIfIdle(op) })
		}
		op.mu.Unlock()
	}()
	// Keep-alive updates stop idle connections from being cut while long
	// actions run.
	tick := time.NewTicker(30 * time.Second)
	defer tick.Stop()
	for {
		lro, changed, done := op.snapshot()
		if err := stream.Send(lro); err != nil {
			return err
		}
		if done {
			return nil
		}
		select {
		case <-changed:
		case <-tick.C:
		case <-stream.Context().Done():
			return status.FromContextError(stream.Context().Err()).Err()
		}
	}
}

// cancelIfIdle cancels op if still nobody watches it. It takes it out of
// inflight in the same step, under both locks, so an Execute arriving
// meanwhile either joins it before (and keeps it alive) or starts a new
// operation: it never joins an operation that is being cancelled.
func (s *Service) cancelIfIdle(op *operation) {
	s.mu.Lock()
	defer s.mu.Unlock()
	op.mu.Lock()
	idle := op.watchers == 0 && op.resp == nil
	op.mu.Unlock()
	if !idle {
		return
	}
	if s.inflight[op.action] == op {
		delete(s.inflight, op.action)
	}
	op.cancel()
}

// Drain refuses new executions (UNAVAILABLE) and waits until the running
// and queued ones have finished or ctx ends; it reports whether they all
// finished.
func (s *Service) Drain(ctx context.Context) bool {
	s.mu.Lock()
	s.draining = true
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.runs.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-ctx.Done():
		return false
	}
}

// Stop refuses new executions, cancels every operation and returns once
// their goroutines have ended (the sandbox kills a cancelled command), so
// nothing writes to the stores after Stop.
func (s *Service) Stop() {
	s.mu.Lock()
	s.draining = true
	for _, op := range s.ops {
		op.cancel()
	}
	s.mu.Unlock()
	s.runs.Wait()
}
