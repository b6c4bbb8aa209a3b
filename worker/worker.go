// Package worker runs actiond's executor as a worker of a Buildbarn build
// farm: each runner calls the scheduler's OperationQueue.Synchronize
// (buildbarn.remoteworker), long-polls for an action while idle, executes it
// with the same executor as `actiond serve` and reports each stage
// (started, fetching_inputs, running, uploading_outputs, completed). The
// executor's Store and Cache are the farm's (package remote), so outputs
// and the ActionCache entry are written by the worker itself, as Buildbarn
// expects.
package worker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"strconv"
	"sync"
	"time"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/executor"
	rwpb "github.com/actiond/actiond/proto/buildbarn/remoteworker"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"
)

// Executor runs one action; *executor.Executor implements it.
type Executor interface {
	Execute(ctx context.Context, req executor.Request) *repb.ExecuteResponse
}

// Options configure a Worker.
type Options struct {
	// Scheduler is the farm's OperationQueue client.
	Scheduler rwpb.OperationQueueClient
	// Executor runs the actions; its Store and Cache should be the farm's.
	Executor Executor
	// Store, if set, receives the Action the scheduler sends along, so the
	// executor finds it without a round trip (it must be the executor's).
	Store cas.Store
	// WorkerID identifies this worker; each runner adds "thread": its index.
	WorkerID map[string]string
	// InstanceNamePrefix is the instance name (prefix) the worker serves.
	InstanceNamePrefix string
	// Platform is what the worker offers; the scheduler matches actions'
	// platform properties against it exactly.
	Platform *repb.Platform
	// SizeClass is the worker's size class (0: size classes unused).
	SizeClass uint32
	// Concurrency is the number of runners, each executing one action at a
	// time (default 1).
	Concurrency int
	// MinBackoff and MaxBackoff bound the wait between failed
	// synchronizations (defaults 100ms and 10s).
	MinBackoff, MaxBackoff time.Duration
	// MaxIdleWait caps how long an idle runner waits before synchronizing
	// again when the scheduler returned no work (default 1 minute).
	MaxIdleWait time.Duration
	// DrainReportTimeout bounds, once Run's context is done, how long a
	// runner keeps retrying a report the scheduler does not take: with
	// the scheduler gone, a drained worker stops instead of retrying
	// forever (default 10s). Outputs and the ActionCache entry are
	// written before the report, so a result given up on is not lost.
	DrainReportTimeout time.Duration
	Logger             *slog.Logger
}

// Worker is a set of runners synchronizing with one scheduler.
type Worker struct {
	opts Options
	log  *slog.Logger
}

// New checks opts and returns a Worker.
func New(opts Options) (*Worker, error) {
	if opts.Scheduler == nil || opts.Executor == nil {
		return nil, errors.New("worker: Scheduler and Executor are required")
	}
	if opts.Concurrency <= 0 {
		opts.Concurrency = 1
	}
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = 100 * time.Millisecond
	}
	if opts.MaxBackoff < opts.MinBackoff {
		opts.MaxBackoff = max(10*time.Second, opts.MinBackoff)
	}
	if opts.MaxIdleWait <= 0 {
		opts.MaxIdleWait = time.Minute
	}
	if opts.DrainReportTimeout <= 0 {
		opts.DrainReportTimeout = 10 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Platform == nil {
		opts.Platform = &repb.Platform{}
	}
	return &Worker{opts: opts, log: opts.Logger}, nil
}

// Run runs the runners until ctx is done, then drains: idle runners tell
// the scheduler they prefer being idle and stop, executing runners finish
// their action, report it and stop. Run returns when every runner has.
// Abandon a drain that takes too long by exiting the process.
func (w *Worker) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	for i := range w.opts.Concurrency {
		id := maps.Clone(w.opts.WorkerID)
		if id == nil {
			id = map[string]string{}
		}
		id["thread"] = strconv.Itoa(i)
		r := &runner{w: w, id: id, log: w.log.With("thread", i)}
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.run(ctx)
		}()
	}
	wg.Wait()
	return nil
}

// runner is one Synchronize loop executing one action at a time.
type runner struct {
	w       *Worker
	id      map[string]string
	log     *slog.Logger
	backoff time.Duration
}

var idleState = &rwpb.CurrentState{WorkerState: &rwpb.CurrentState_Idle{Idle: &emptypb.Empty{}}}

func (r *runner) request(state *rwpb.CurrentState, preferIdle bool) *rwpb.SynchronizeRequest {
	return &rwpb.SynchronizeRequest{
		WorkerId:           r.id,
		InstanceNamePrefix: r.w.opts.InstanceNamePrefix,
		Platform:           r.w.opts.Platform,
		CurrentState:       state,
		SizeClass:          r.w.opts.SizeClass,
		PreferBeingIdle:    preferIdle,
	}
}

// sync performs one Synchronize; on failure it sleeps the backoff (which
// doubles) unless ctx ends first.
func (r *runner) sync(ctx context.Context, req *rwpb.SynchronizeRequest) (*rwpb.SynchronizeResponse, error) {
	resp, err := r.w.opts.Scheduler.Synchronize(ctx, req)
	if err == nil {
		r.backoff = 0
		return resp, nil
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	if r.backoff == 0 {
		r.backoff = r.w.opts.MinBackoff
	} else {
		r.backoff = min(2*r.backoff, r.w.opts.MaxBackoff)
	}
	// Jitter keeps the runners of a worker (and the workers of a farm)
	// from reconnecting to a restarted scheduler in lockstep.
	wait := r.backoff/2 + rand.N(r.backoff/2+1)
	r.log.Warn("synchronize with scheduler failed; retrying", "err", err, "backoff", wait)
	sleep(ctx, wait)
	return nil, fmt.Errorf("synchronize: %w", err)
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// run is the idle loop: long-poll for work until drain.
func (r *runner) run(drain context.Context) {
	var resp *rwpb.SynchronizeResponse
	for {
		if resp == nil {
			if drain.Err() != nil {
				r.leave()
				return
			}
			var err error
			if resp, err = r.sync(drain, r.request(idleState, false)); err != nil {
				resp = nil
				continue
			}
		}
		if ex := resp.GetDesiredState().GetExecuting(); ex != nil {
			resp = r.execute(drain, ex)
			continue
		}
		// No work: wait until the scheduler wants to hear from us again.
		if at := resp.GetNextSynchronizationAt(); at != nil && drain.Err() == nil {
			sleep(drain, min(time.Until(at.AsTime()), r.w.opts.MaxIdleWait))
		}
		resp = nil
	}
}

// leave tells the scheduler, best effort, that this idle runner is going.
func (r *runner) leave() {
	ctx, cancel := context.WithTimeout(context.Background(), min(5*time.Second, r.w.opts.DrainReportTimeout))
	defer cancel()
	if _, err := r.w.opts.Scheduler.Synchronize(ctx, r.request(idleState, true)); err != nil {
		r.log.Info("could not tell the scheduler this runner is leaving", "err", err)
	}
	r.log.Info("runner drained")
}

func executingState(d *repb.Digest, stage executor.Stage) *rwpb.CurrentState {
	ex := &rwpb.CurrentState_Executing{ActionDigest: d}
	e := &emptypb.Empty{}
	switch stage {
	case executor.StageFetchingInputs:
		ex.ExecutionState = &rwpb.CurrentState_Executing_FetchingInputs{FetchingInputs: e}
	case executor.StageRunning:
		ex.ExecutionState = &rwpb.CurrentState_Executing_Running{Running: e}
	case executor.StageUploadingOutputs:
		ex.ExecutionState = &rwpb.CurrentState_Executing_UploadingOutputs{UploadingOutputs: e}
	default:
		ex.ExecutionState = &rwpb.CurrentState_Executing_Started{Started: e}
	}
	return &rwpb.CurrentState{WorkerState: &rwpb.CurrentState_Executing_{Executing: ex}}
}

func completedState(d *repb.Digest, resp *repb.ExecuteResponse) *rwpb.CurrentState {
	return &rwpb.CurrentState{WorkerState: &rwpb.CurrentState_Executing_{Executing: &rwpb.CurrentState_Executing{
		ActionDigest:   d,
		ExecutionState: &rwpb.CurrentState_Executing_Completed{Completed: resp},
	}}}
}

// execute runs one action, reporting every stage in order and
// resynchronizing at next_synchronization_at. It returns the scheduler's
// answer to the completed state (which may carry the next action), or nil
// when the action was cancelled.
func (r *runner) execute(drain context.Context, desired *rwpb.DesiredState_Executing) *rwpb.SynchronizeResponse {
	pd := desired.GetActionDigest()
	log := r.log.With("action", fmt.Sprintf("%s/%d", pd.GetHash(), pd.GetSizeBytes()))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	stages := make(chan executor.Stage, 8)
	done := make(chan *repb.ExecuteResponse, 1)
	if d, err := r.check(ctx, desired); err != nil {
		done <- &repb.ExecuteResponse{Status: executor.StatusProto(err)}
	} else {
		log.Info("executing")
		go func() {
			var queued time.Time
			if desired.QueuedTimestamp != nil {
				queued = desired.QueuedTimestamp.AsTime()
			}
			resp := r.w.opts.Executor.Execute(ctx, executor.Request{
				ActionDigest: d,
				// The scheduler's copy wins: it may carry the timeout
				// the scheduler settled on.
				Action: desired.GetAction(),
				// Buildbarn workers always execute: the client and the
				// frontend have looked at the ActionCache already.
				SkipCacheLookup: true,
				Queued:          queued,
				Progress: func(s executor.Stage) {
					if s != executor.StageCacheCheck {
						stages <- s
					}
				},
			})
			if md := resp.GetResult().GetExecutionMetadata(); md != nil {
				md.AuxiliaryMetadata = append(md.AuxiliaryMetadata, desired.AuxiliaryMetadata...)
			}
			done <- resp
		}()
	}

	pending := []*rwpb.CurrentState{executingState(pd, executor.StageCacheCheck)}
	current := pending[0]
	var next time.Time
	var failingSince time.Time // draining: when reports began to go unanswered
	var result *repb.ExecuteResponse
	for {
		if len(pending) == 0 {
			var timer <-chan time.Time
			var t *time.Timer
			if !next.IsZero() {
				t = time.NewTimer(time.Until(next))
				timer = t.C
			}
			select {
			case s := <-stages:
				pending = append(pending, executingState(pd, s))
			case res := <-done:
				// Stages reported before the end come first.
				for len(stages) > 0 {
					pending = append(pending, executingState(pd, <-stages))
				}
				result = res
				pending = append(pending, completedState(pd, res))
			case <-timer:
				pending = append(pending, current)
			}
			if t != nil {
				t.Stop()
			}
			continue
		}
		state := pending[0]
		completed := state.GetExecuting().GetCompleted() != nil
		// Retry until the scheduler hears us; a drain does not stop the
		// reporting of an action already running. But once draining, a
		// scheduler that does not answer for DrainReportTimeout is taken
		// as gone: the report is given up, so the worker can stop.
		rctx, rcancel := context.Background(), context.CancelFunc(func() {})
		draining := drain.Err() != nil
		if draining {
			if failingSince.IsZero() {
				failingSince = time.Now()
			}
			rctx, rcancel = context.WithDeadline(context.Background(), failingSince.Add(r.w.opts.DrainReportTimeout))
		}
		resp, err := r.sync(rctx, r.request(state, draining && completed))
		expired := rctx.Err() != nil
		rcancel()
		if err != nil {
			if !draining || !expired {
				continue
			}
			if completed {
				log.Warn("draining, and the scheduler has not answered for the drain report timeout: giving up reporting the result (outputs and the ActionCache entry are stored)",
					"timeout", r.w.opts.DrainReportTimeout, "err", err)
				return nil
			}
			// Skip this intermediate state; the result is reported
			// (or given up on) when the action ends.
			pending = pending[1:]
			next = time.Time{}
			continue
		}
		failingSince = time.Time{}
		pending = pending[1:]
		current = state
		next = time.Time{}
		if at := resp.GetNextSynchronizationAt(); at != nil {
			next = at.AsTime()
		}
		if completed {
			log.Info("action completed", "code", codes.Code(result.GetStatus().GetCode()), "exit_code", result.GetResult().GetExitCode())
			return resp
		}
		ds := resp.GetDesiredState()
		if ds == nil {
			continue
		}
		if ex := ds.GetExecuting(); ex != nil && proto.Equal(ex.GetActionDigest(), pd) {
			continue
		}
		// The scheduler wants something else: idle (the action was
		// cancelled, e.g. the client went away) or another action.
		log.Info("scheduler cancelled the action")
		cancel()
		<-done
		if ds.GetExecuting() != nil {
			return resp
		}
		return nil
	}
}

// check validates what the scheduler sent and seeds the Action into the
// store when it came along.
func (r *runner) check(ctx context.Context, desired *rwpb.DesiredState_Executing) (cas.Digest, error) {
	d, err := cas.FromProto(desired.GetActionDigest())
	if err != nil {
		return d, status.Errorf(codes.InvalidArgument, "action_digest: %v", err)
	}
	switch f := desired.GetDigestFunction(); f {
	case repb.DigestFunction_UNKNOWN, repb.DigestFunction_SHA256:
	default:
		return d, status.Errorf(codes.InvalidArgument, "digest function %s is not supported; this worker uses SHA256", f)
	}
	if desired.InstanceNameSuffix != "" {
		r.log.Warn("instance_name_suffix is not supported; using the worker's instance name", "suffix", desired.InstanceNameSuffix)
	}
	if a := desired.GetAction(); a != nil && r.w.opts.Store != nil {
		if data, err := proto.Marshal(a); err == nil && cas.DigestOf(data) == d {
			if err := r.w.opts.Store.Put(ctx, d, bytes.NewReader(data)); err != nil {
				r.log.Debug("could not seed the Action into the store", "err", err)
			}
		}
	}
	return d, nil
}
