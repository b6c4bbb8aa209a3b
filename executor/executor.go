// Package executor runs REAPI actions end to end: it loads the Action and
// Command, consults the ActionCache, materialises the input root through an
// InputRoot, runs the command through a Sandbox, moves outputs into the CAS
// and records the result. It also serves the Execution gRPC service (queue,
// deduplication of identical in-flight actions, WaitExecution). Sandboxes
// and input roots are interfaces owned here, so the same executor runs on a
// Linux host, inside the VM guest and as a farm worker.
package executor

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/actiond/actiond/actioncache"
	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Options configure an Executor.
type Options struct {
	Store cas.Store
	Cache actioncache.Cache
	// Sandbox runs commands.
	Sandbox Sandbox
	// InputRoot materialises input trees. Default: hardlinks when Store
	// keeps local files (cas.IsLocal), copies otherwise.
	InputRoot InputRoot
	// StageDir holds per-action directories; it must be on the same file
	// system as the CAS so outputs move in by rename.
	StageDir string
	// DefaultRuntime is used when an action names no "libc".
	DefaultRuntime string
	// Worker names this machine in ExecutedActionMetadata.
	Worker string
	// MaxTimeout caps Action.timeout; actions without one get it too.
	// Zero: no cap.
	MaxTimeout time.Duration
	// DefaultTimeout is the timeout of actions that set none (Bazel sets
	// one only for tests), so a hung command cannot hold a slot forever.
	// Zero: DefaultActionTimeout; negative: none.
	DefaultTimeout time.Duration
	// MaxInputEntries and MaxInputBytes bound an input root as staging
	// expands it (see InputTree.Entries); larger roots are refused with
	// INVALID_ARGUMENT before anything is staged. Zero: the defaults
	// (DefaultMaxInputEntries, DefaultMaxInputBytes); negative: no limit.
	MaxInputEntries int64
	MaxInputBytes   int64
	Logger          *slog.Logger
	// Observer, if set, sees each action run (metrics, status pages).
	Observer Observer
}

// Executor runs actions. It is safe for concurrent use.
type Executor struct {
	opts  Options
	log   *slog.Logger
	trees *TreeCache

	cleaning     sync.WaitGroup
	cleanupSlots chan struct{}
}

// New checks opts and returns an Executor.
func New(opts Options) (*Executor, error) {
	if opts.Store == nil || opts.Cache == nil || opts.Sandbox == nil {
		return nil, errors.New("executor: Store, Cache and Sandbox are required")
	}
	if opts.StageDir == "" {
		return nil, errors.New("executor: StageDir is required")
	}
	// Stages hold actions' trees and outputs, which other local users
	// must not reach: the sandbox shows a command its execroot through a
	// mount, not through this path.
	if err := os.MkdirAll(opts.StageDir, 0o700); err != nil {
		return nil, fmt.Errorf("create stage dir: %w", err)
	}
	if err := os.Chmod(opts.StageDir, 0o700); err != nil {
		return nil, fmt.Errorf("stage dir: %w", err)
	}
	// Leftovers of a crashed run.
	if ents, err := os.ReadDir(opts.StageDir); err == nil {
		for _, e := range ents {
			os.RemoveAll(filepath.Join(opts.StageDir, e.Name()))
		}
	}
	if opts.InputRoot == nil {
		if ls, ok := cas.LocalFiles(opts.Store); ok {
			opts.InputRoot = LinkInputRoot{Store: ls}
		} else {
			opts.InputRoot = CopyInputRoot{Store: opts.Store}
		}
	}
	if opts.DefaultRuntime == "" {
		opts.DefaultRuntime = "host"
	}
	if opts.DefaultTimeout == 0 {
		opts.DefaultTimeout = DefaultActionTimeout
	}
	if opts.MaxInputEntries == 0 {
		opts.MaxInputEntries = DefaultMaxInputEntries
	}
	if opts.MaxInputBytes == 0 {
		opts.MaxInputBytes = DefaultMaxInputBytes
	}
	if opts.Worker == "" {
		opts.Worker, _ = os.Hostname()
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if !slices.Contains(opts.Sandbox.Runtimes(), opts.DefaultRuntime) {
		return nil, fmt.Errorf("default runtime %q is not available; available: %s", opts.DefaultRuntime, joinQuoted(opts.Sandbox.Runtimes()))
	}
	trees := NewTreeCache(DefaultTreeCacheDirBytes, DefaultTreeCacheFiles)
	return &Executor{opts: opts, log: opts.Logger, trees: trees, cleanupSlots: make(chan struct{}, maxPendingCleanups)}, nil
}

// DefaultActionTimeout is Options.DefaultTimeout's default: long enough for
// the slowest real compile or link, short enough that a hung action frees
// its slot the same day.
const DefaultActionTimeout = time.Hour

// maxPendingCleanups bounds the stages being removed in the background;
// beyond it an execution cleans up before returning, so a slow disk
// cannot pile up stages.
const maxPendingCleanups = 16

// cleanUpLater runs fns, last first, in the background.
func (e *Executor) cleanUpLater(fns []func()) {
	if len(fns) == 0 {
		return
	}
	run := func() {
		for i := len(fns) - 1; i >= 0; i-- {
			fns[i]()
		}
	}
	select {
	case e.cleanupSlots <- struct{}{}:
	default:
		run()
		return
	}
	e.cleaning.Add(1)
	go func() {
		defer e.cleaning.Done()
		defer func() { <-e.cleanupSlots }()
		run()
	}()
}

// Wait returns when the cleanup of finished executions (unmounting input
// roots, removing stage directories) is done. Call it before closing the
// InputRoot or the Store.
func (e *Executor) Wait() { e.cleaning.Wait() }

// InputRootName is the input root strategy in use.
func (e *Executor) InputRootName() string { return e.opts.InputRoot.Name() }

// Stage is a step of one execution, reported through Request.Progress.
type Stage int

// Stages in order.
const (
	StageCacheCheck Stage = iota
	StageFetchingInputs
	StageRunning
	StageUploadingOutputs
)

// Request is one action to run.
type Request struct {
	ActionDigest cas.Digest
	// Action, if set, is run instead of the Action stored under
	// ActionDigest: a scheduler may hand a worker the client's Action with
	// fields it changed (Buildbarn's applies its default and maximum
	// timeouts) under the client's digest, which the result is reported
	// and cached under.
	Action          *repb.Action
	SkipCacheLookup bool
	// Queued is when the request arrived (for ExecutedActionMetadata).
	Queued time.Time
	// Progress, if set, is called as the execution moves between stages.
	Progress func(Stage)

	obs ActionObserver // from Options.Observer
}

// Execute runs one action and always returns a response; failures are in
// its Status. A command that ran and failed is not an error: its exit code
// is in the result.
func (e *Executor) Execute(ctx context.Context, req Request) *repb.ExecuteResponse {
	if req.Queued.IsZero() {
		req.Queued = time.Now()
	}
	md := &repb.ExecutedActionMetadata{
		Worker:               e.opts.Worker,
		QueuedTimestamp:      timestamppb.New(req.Queued),
		WorkerStartTimestamp: timestamppb.Now(),
	}
	if e.opts.Observer != nil {
		req.obs = e.opts.Observer.ActionStarted(req.ActionDigest, req.Queued)
	}
	progress := func(s Stage) {
		if req.obs != nil {
			req.obs.Stage(s)
		}
		if req.Progress != nil {
			req.Progress(s)
		}
	}
	resp, err := e.execute(ctx, req, md, progress)
	if err != nil {
		if resp == nil {
			resp = &repb.ExecuteResponse{}
		}
		resp.Status = StatusProto(err)
		e.log.Info("action failed", "action", req.ActionDigest.String(), "err", err)
	}
	if req.obs != nil {
		req.obs.Finished(resp)
	}
	return resp
}

// doNotCache reports whether the Action stored under d says do_not_cache.
// An Action that cannot be read says nothing: its execution fails the
// same way for every client.
func (e *Executor) doNotCache(ctx context.Context, d cas.Digest) bool {
	a := &repb.Action{}
	if err := e.loadProto(ctx, d, a, "Action"); err != nil {
		return false
	}
	return a.DoNotCache
}

func (e *Executor) putBytes(ctx context.Context, b []byte) (cas.Digest, error) {
	d := cas.DigestOf(b)
	return d, e.opts.Store.Put(ctx, d, bytes.NewReader(b))
}

// MaxMessageSize bounds the Action, Command and Directory blobs the
// executor reads into memory; a client naming a huge blob as one of them
// gets INVALID_ARGUMENT instead of making the server allocate it.
const MaxMessageSize = 64 << 20

func (e *Executor) loadProto(ctx context.Context, d cas.Digest, m proto.Message, what string) error {
	if d.Size > MaxMessageSize {
		return invalidf("%s %s is %d bytes; at most %d bytes are accepted", what, d, d.Size, MaxMessageSize)
	}
	data, err := cas.ReadAll(ctx, e.opts.Store, d)
	if err != nil {
		return err
	}
	if err := proto.Unmarshal(data, m); err != nil {
		return invalidf("blob %s is not a valid %s message: %v", d, what, err)
	}
	return nil
}

// StatusProto translates an execution error into the status of an
// ExecuteResponse; the one place the executor does so.
func StatusProto(err error) *rpcstatus.Status {
	return status.Convert(ToStatus(err)).Proto()
}

// ToStatus translates an execution error into a gRPC status error.
func ToStatus(err error) error {
	var missing *MissingBlobsError
	var invalid *InvalidInputError
	var unknownRuntime *UnknownRuntimeError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &missing):
		st := status.New(codes.FailedPrecondition, missing.Error())
		pf := &errdetails.PreconditionFailure{}
		for _, d := range missing.Digests {
			pf.Violations = append(pf.Violations, &errdetails.PreconditionFailure_Violation{
				Type: "MISSING", Subject: "blobs/" + d.String(), Description: "blob is not in the CAS; upload it and retry",
			})
		}
		if wd, err := st.WithDetails(pf); err == nil {
			st = wd
		}
		return st.Err()
	case errors.As(err, &invalid):
		return status.Error(codes.InvalidArgument, invalid.Msg)
	case errors.As(err, &unknownRuntime):
		return status.Error(codes.InvalidArgument, "platform property libc: "+unknownRuntime.Error())
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, "execution cancelled")
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, err.Error())
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	return cas.ToStatus(err)
}
