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
	"strings"
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

func (e *Executor) execute(ctx context.Context, req Request, md *repb.ExecutedActionMetadata, progress func(Stage)) (*repb.ExecuteResponse, error) {
	progress(StageCacheCheck)
	action := req.Action
	command := &repb.Command{}
	var missing []cas.Digest
	var loadErr error
	if action == nil {
		action = &repb.Action{}
		loadErr = e.loadProto(ctx, req.ActionDigest, action, "Action")
	}
	if loadErr != nil {
		if !errors.Is(loadErr, cas.ErrNotFound) {
			return nil, loadErr
		}
		missing = append(missing, req.ActionDigest)
	} else {
		cd, err := cas.FromProto(action.CommandDigest)
		if err != nil {
			return nil, invalidf("action %s: command_digest: %v", req.ActionDigest, err)
		}
		if err := e.loadProto(ctx, cd, command, "Command"); err != nil {
			if !errors.Is(err, cas.ErrNotFound) {
				return nil, err
			}
			missing = append(missing, cd)
		}
		if _, err := cas.FromProto(action.InputRootDigest); err != nil {
			return nil, invalidf("action %s: input_root_digest: %v", req.ActionDigest, err)
		}
	}
	if len(missing) > 0 {
		return nil, &MissingBlobsError{Digests: missing}
	}
	if len(command.Arguments) == 0 {
		return nil, invalidf("command of action %s has no arguments", req.ActionDigest)
	}

	if !req.SkipCacheLookup && !action.DoNotCache {
		if res, err := e.opts.Cache.Get(ctx, req.ActionDigest); err == nil {
			return &repb.ExecuteResponse{Result: res, CachedResult: true}, nil
		}
	}

	plat, err := ParsePlatform(action.Platform, command.Platform)
	if err != nil {
		return nil, err
	}
	if plat.Runtime == "" {
		plat.Runtime = e.opts.DefaultRuntime
	}
	if !slices.Contains(e.opts.Sandbox.Runtimes(), plat.Runtime) {
		return nil, &UnknownRuntimeError{Name: plat.Runtime, Available: e.opts.Sandbox.Runtimes()}
	}
	if req.obs != nil {
		req.obs.Command(command.Arguments, plat.Runtime)
	}
	outs, err := parseOutputs(command)
	if err != nil {
		return nil, err
	}
	wd := ""
	if command.WorkingDirectory != "" {
		if wd, err = cleanRelPath("working_directory", command.WorkingDirectory); err != nil {
			return nil, err
		}
	}

	timeout, err := e.timeout(action)
	if err != nil {
		return nil, err
	}

	// Inputs. The action's timeout runs from here: fetching and staging
	// its inputs are part of what it costs, and a hostile tree must not
	// keep a slot longer than the command itself could.
	progress(StageFetchingInputs)
	md.InputFetchStartTimestamp = timestamppb.Now()
	started := time.Now()
	stageCtx, cancelStage := context.WithDeadline(ctx, started.Add(timeout))
	defer cancelStage()
	rootDigest, _ := cas.FromProto(action.InputRootDigest)
	tree, err := e.trees.LoadInputTree(stageCtx, e.opts.Store, rootDigest)
	if err != nil {
		return nil, e.stageErr(ctx, err, timeout)
	}
	if err := tree.CheckLimits(e.opts.MaxInputEntries, e.opts.MaxInputBytes); err != nil {
		return nil, err
	}
	// Unmounting and removing the stage are not the client's wait: they
	// run after the response (see cleanUpLater), last added first.
	var cleanups []func()
	defer func() { e.cleanUpLater(cleanups) }()
	if pinner, ok := e.opts.Store.(cas.Pinner); ok {
		// Until the input root is gone.
		cleanups = append(cleanups, pinner.Pin(tree.Files))
	}
	if _, lazy := e.opts.InputRoot.(OptionsInputRoot); lazy {
		// A lazy root (actiondfs) reads blobs when the command opens
		// them: a blob evicted between LoadInputTree's check and the pin
		// would be an I/O error in the command, not MISSING for the
		// client to upload again. Eager roots find out while staging.
		m, err := e.opts.Store.FindMissing(ctx, tree.Files)
		if err != nil {
			return nil, fmt.Errorf("check pinned input blobs: %w", err)
		}
		if len(m) > 0 {
			return nil, &MissingBlobsError{Digests: m}
		}
	}
	if _, err := tree.lookupDir(wd); err != nil {
		return nil, err
	}
	// The user the command runs as, reserved until its outputs are
	// collected: staging may depend on it.
	var user *User
	if us, ok := e.opts.Sandbox.(UserSandbox); ok {
		u, release, err := us.AcquireUser(ctx)
		if err != nil {
			return nil, fmt.Errorf("sandbox user: %w", err)
		}
		defer release()
		user = &u
	}
	stage, err := os.MkdirTemp(e.opts.StageDir, "a-")
	if err != nil {
		return nil, fmt.Errorf("create stage directory: %w", err)
	}
	cleanups = append(cleanups, func() {
		if err := os.RemoveAll(stage); err != nil {
			e.log.Warn("remove stage directory", "dir", stage, "err", err)
		}
	})
	execRoot := filepath.Join(stage, "root")
	inputRoot := e.opts.InputRoot
	staged, err := stageInputs(stageCtx, inputRoot, e.opts.Store, tree, execRoot, StageOptions{MutatesInputs: plat.MutatesInputs, User: user})
	if err != nil {
		return nil, e.stageErr(ctx, fmt.Errorf("stage input root %s (%s): %w", rootDigest, inputRoot.Name(), err), timeout)
	}
	if staged.Dir != "" {
		execRoot = staged.Dir
	}
	cleanups = append(cleanups, func() {
		if err := staged.Cleanup(); err != nil {
			e.log.Warn("clean up input root", "dir", execRoot, "err", err)
		}
	})
	if plat.MutatesInputs && !staged.SelfProtected {
		if err := makeWritable(execRoot); err != nil {
			return nil, err
		}
	}
	writable, err := prepareOutputDirs(execRoot, wd, outs, tree)
	if err != nil {
		return nil, err
	}
	if staged.SelfProtected {
		// The root refuses what the command may not do itself, and it can
		// only see (and report) attempts that reach it.
		writable = append([]string{"."}, writable...)
	}
	md.InputFetchCompletedTimestamp = timestamppb.Now()

	// Run, for what is left of the timeout.
	progress(StageRunning)
	remaining := time.Until(started.Add(timeout))
	if remaining <= 0 || stageCtx.Err() != nil {
		return nil, e.stageErr(ctx, context.DeadlineExceeded, timeout)
	}
	spec := &RunSpec{
		ExecRoot:         execRoot,
		WorkingDirectory: wd,
		WritableDirs:     writable,
		WritableInputs:   plat.MutatesInputs && !staged.SelfProtected,
		Args:             command.Arguments,
		Env:              envList(command.EnvironmentVariables),
		Runtime:          plat.Runtime,
		Limits:           plat.Limits,
		Timeout:          remaining,
		StdoutPath:       filepath.Join(stage, "stdout"),
		StderrPath:       filepath.Join(stage, "stderr"),
		User:             user,
	}
	md.ExecutionStartTimestamp = timestamppb.Now()
	run, err := e.opts.Sandbox.Run(ctx, spec)
	md.ExecutionCompletedTimestamp = timestamppb.Now()
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("sandbox: %w", err)
	}

	// Outputs.
	progress(StageUploadingOutputs)
	md.OutputUploadStartTimestamp = timestamppb.Now()
	result := &repb.ActionResult{ExitCode: int32(run.ExitCode), ExecutionMetadata: md}
	var outDigests []cas.Digest
	var refused []string
	if staged.Report != nil {
		refused = staged.Report()
	}
	if len(refused) > 0 && run.ExitCode != 0 {
		appendLines(spec.StderrPath, refused)
	}
	collectErr := e.collectOutputs(ctx, execRoot, wd, outs, staged.OutputPath, result, &outDigests)
	for _, s := range []struct {
		path string
		set  func(*repb.Digest)
	}{
		{spec.StdoutPath, func(d *repb.Digest) { result.StdoutDigest = d }},
		{spec.StderrPath, func(d *repb.Digest) { result.StderrDigest = d }},
	} {
		if _, err := os.Stat(s.path); err != nil {
			continue
		}
		d, err := e.opts.Store.PutFile(ctx, s.path)
		if err != nil {
			return nil, fmt.Errorf("store output stream: %w", err)
		}
		outDigests = append(outDigests, d)
		s.set(d.Proto())
	}
	if pinner, ok := e.opts.Store.(cas.Pinner); ok {
		defer pinner.Pin(outDigests)()
	}
	md.OutputUploadCompletedTimestamp = timestamppb.Now()
	md.WorkerCompletedTimestamp = timestamppb.Now()

	resp := &repb.ExecuteResponse{Result: result}
	logText := e.serverLog(req, plat, inputRoot.Name(), tree, run)
	if len(refused) > 0 {
		logText += strings.Join(refused, "\n") + "\n"
	}
	if d, err := e.putBytes(ctx, []byte(logText)); err == nil {
		resp.ServerLogs = map[string]*repb.LogFile{"sandbox": {Digest: d.Proto(), HumanReadable: true}}
	}
	if run.Message != "" {
		resp.Message = run.Message
	}
	if len(refused) > 0 {
		resp.Message = strings.TrimSpace(resp.Message + "\n" + strings.Join(refused, "\n"))
		e.log.Info("action was refused input changes", "action", req.ActionDigest.String(), "refused", refused)
	}
	if collectErr != nil {
		return resp, collectErr
	}
	if run.TimedOut {
		msg := fmt.Sprintf("action timed out after %s", timeout)
		resp.Status = status.New(codes.DeadlineExceeded, msg).Proto()
		resp.Message = msg
		return resp, nil
	}
	if run.ExitCode == 0 && !action.DoNotCache {
		if err := e.opts.Cache.Put(ctx, req.ActionDigest, result); err != nil {
			e.log.Warn("store action result", "action", req.ActionDigest.String(), "err", err)
		}
	}
	e.log.Debug("action done", "action", req.ActionDigest.String(), "exit", run.ExitCode,
		"runtime", plat.Runtime, "inputs", tree.FileCount, "wall", run.Wall)
	return resp, nil
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

// timeout is how long action may take, inputs included: its own timeout,
// or the default, capped by MaxTimeout. It is never zero: "no timeout"
// is a very long one.
func (e *Executor) timeout(action *repb.Action) (time.Duration, error) {
	timeout := action.Timeout.AsDuration()
	if action.Timeout != nil && timeout < 0 {
		return 0, invalidf("action timeout %s is negative", timeout)
	}
	if timeout == 0 {
		timeout = e.opts.DefaultTimeout
	}
	if e.opts.MaxTimeout > 0 && (timeout <= 0 || timeout > e.opts.MaxTimeout) {
		timeout = e.opts.MaxTimeout
	}
	if timeout <= 0 {
		timeout = 100 * 365 * 24 * time.Hour
	}
	return timeout, nil
}

// stageErr reports a failure to fetch or stage inputs; when the action's
// own timeout (not the client) ended it, that is DEADLINE_EXCEEDED naming
// the timeout.
func (e *Executor) stageErr(ctx context.Context, err error, timeout time.Duration) error {
	if ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
		return status.Errorf(codes.DeadlineExceeded, "action timed out after %s while fetching and staging its inputs (the timeout counts from the start of input staging)", timeout)
	}
	return err
}

func (e *Executor) serverLog(req Request, plat Platform, inputRoot string, tree *InputTree, run *RunResult) string {
	var b strings.Builder
	fmt.Fprintf(&b, "worker: %s\naction: %s\nruntime: %s\ninput root: %s (%d files)\n", e.opts.Worker, req.ActionDigest, plat.Runtime, inputRoot, tree.FileCount)
	if len(run.Enforced) > 0 {
		fmt.Fprintf(&b, "limits enforced: %s\n", strings.Join(run.Enforced, "; "))
	}
	if len(plat.Ignored) > 0 {
		slices.Sort(plat.Ignored)
		fmt.Fprintf(&b, "platform properties ignored: %s\n", strings.Join(plat.Ignored, ", "))
	}
	if run.Message != "" {
		fmt.Fprintf(&b, "%s\n", run.Message)
	}
	fmt.Fprintf(&b, "exit code: %d, wall time: %s\n", run.ExitCode, run.Wall.Round(time.Millisecond))
	return b.String()
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

func envList(vars []*repb.Command_EnvironmentVariable) []string {
	env := make([]string, 0, len(vars))
	for _, v := range vars {
		env = append(env, v.Name+"="+v.Value)
	}
	return env
}

// stageInputs stages tree at execRoot through ir, with the options when ir
// takes them; otherwise mutates_inputs gets a private copy of the inputs.
func stageInputs(ctx context.Context, ir InputRoot, store cas.Store, tree *InputTree, execRoot string, opts StageOptions) (*StagedRoot, error) {
	if oir, ok := ir.(OptionsInputRoot); ok {
		return oir.StageWithOptions(ctx, tree, execRoot, opts)
	}
	if opts.MutatesInputs {
		ir = CopyInputRoot{Store: store}
	}
	cleanup, err := ir.Stage(ctx, tree, execRoot)
	if err != nil {
		return nil, err
	}
	return &StagedRoot{Cleanup: cleanup}, nil
}

// appendLines adds lines to the end of a host file (the command's stderr),
// best effort.
func appendLines(path string, lines []string) {
	if path == "" {
		return
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	f.WriteString(strings.Join(lines, "\n") + "\n")
}

// makeWritable opens a copied input tree to the sandbox user (mutates_inputs).
func makeWritable(root string) error {
	return filepath.Walk(root, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		switch {
		case info.Mode()&os.ModeSymlink != 0:
			return nil
		case info.IsDir():
			return os.Chmod(p, 0o777)
		default:
			return os.Chmod(p, info.Mode().Perm()|0o666)
		}
	})
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
