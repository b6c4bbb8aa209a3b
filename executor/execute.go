// One execution, step by step: load the Action and Command, consult the
// ActionCache, validate, stage the input root, run the command, collect its
// outputs. Everything about a request that can be checked without its
// input root is checked before anything is staged.

package executor

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/actiond/actiond/actioncache"
	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// execution is one action on its way through execute's steps: the request,
// and what validate found in it.
type execution struct {
	req      Request
	md       *repb.ExecutedActionMetadata
	progress func(Stage)

	action  *repb.Action
	command *repb.Command
	plat    Platform
	outs    []output
	wd      string // the working directory, cleaned; "" is the execroot
	timeout time.Duration
}

// staging is an action's input root as stage prepared it. undo releases
// it when execute returns, whether staging finished or not.
type staging struct {
	tree     *InputTree
	dir      string // the action's directory under StageDir
	execRoot string
	root     *StagedRoot
	writable []string
	user     *User

	// The action's timeout counts from the start of staging: ctx ends at
	// deadline.
	ctx      context.Context
	cancel   context.CancelFunc
	deadline time.Time

	cleanups    []func() // after the response (cleanUpLater), last added first
	releaseUser func()
}

// undo releases what stage set up, in the reverse order: the user first,
// then (in the background) the input root and stage directory, and the
// staging deadline last.
func (e *Executor) undo(s *staging) {
	if s.releaseUser != nil {
		s.releaseUser()
	}
	e.cleanUpLater(s.cleanups)
	if s.cancel != nil {
		s.cancel()
	}
}

// execute is Execute's work: load → (ActionCache) → validate → stage →
// run → collect. The request (Action, Command, platform, outputs, working
// directory, timeout) is refused before anything is staged.
func (e *Executor) execute(ctx context.Context, req Request, md *repb.ExecutedActionMetadata, progress func(Stage)) (*repb.ExecuteResponse, error) {
	progress(StageCacheCheck)
	x := &execution{req: req, md: md, progress: progress}
	if err := e.load(ctx, x); err != nil {
		return nil, err
	}
	if !req.SkipCacheLookup && !x.action.DoNotCache {
		if res, err := e.opts.Cache.Get(ctx, req.ActionDigest); err == nil {
			return &repb.ExecuteResponse{Result: e.inlineStreams(ctx, res), CachedResult: true}, nil
		}
	}
	if err := e.validate(x); err != nil {
		return nil, err
	}
	s := &staging{}
	defer e.undo(s)
	if err := e.stage(ctx, x, s); err != nil {
		return nil, err
	}
	spec, run, err := e.run(ctx, x, s)
	if err != nil {
		return nil, err
	}
	return e.collect(ctx, x, s, spec, run)
}

// load reads the Action (unless the request carries one) and its Command.
// Blobs not in the CAS are a MissingBlobsError naming every one of them.
func (e *Executor) load(ctx context.Context, x *execution) error {
	req := x.req
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
			return loadErr
		}
		missing = append(missing, req.ActionDigest)
	} else {
		cd, err := cas.FromProto(action.CommandDigest)
		if err != nil {
			return invalidf("action %s: command_digest: %v", req.ActionDigest, err)
		}
		if err := e.loadProto(ctx, cd, command, "Command"); err != nil {
			if !errors.Is(err, cas.ErrNotFound) {
				return err
			}
			missing = append(missing, cd)
		}
		if _, err := cas.FromProto(action.InputRootDigest); err != nil {
			return invalidf("action %s: input_root_digest: %v", req.ActionDigest, err)
		}
	}
	if len(missing) > 0 {
		return &MissingBlobsError{Digests: missing}
	}
	if len(command.Arguments) == 0 {
		return invalidf("command of action %s has no arguments", req.ActionDigest)
	}
	x.action, x.command = action, command
	return nil
}

// validate checks what load could not: platform properties and runtime,
// outputs, working directory and timeout. It tells the observer what will
// run as soon as the runtime is known.
func (e *Executor) validate(x *execution) error {
	plat, err := ParsePlatform(x.action.Platform, x.command.Platform)
	if err != nil {
		return err
	}
	if plat.Runtime == "" {
		plat.Runtime = e.opts.DefaultRuntime
	}
	if !slices.Contains(e.opts.Sandbox.Runtimes(), plat.Runtime) {
		return &UnknownRuntimeError{Name: plat.Runtime, Available: e.opts.Sandbox.Runtimes()}
	}
	x.plat = plat
	if x.req.obs != nil {
		x.req.obs.Command(x.command.Arguments, plat.Runtime)
	}
	if x.outs, err = parseOutputs(x.command); err != nil {
		return err
	}
	if x.command.WorkingDirectory != "" {
		if x.wd, err = cleanRelPath("working_directory", x.command.WorkingDirectory); err != nil {
			return err
		}
	}
	x.timeout, err = e.timeout(x.action)
	return err
}

// stage loads the input tree and makes it the execroot, with the output
// directories in place. The action's timeout runs from here: fetching and
// staging its inputs are part of what it costs, and a hostile tree must
// not keep a slot longer than the command itself could.
func (e *Executor) stage(ctx context.Context, x *execution, s *staging) error {
	x.progress(StageFetchingInputs)
	x.md.InputFetchStartTimestamp = timestamppb.Now()
	s.deadline = time.Now().Add(x.timeout)
	s.ctx, s.cancel = context.WithDeadline(ctx, s.deadline)
	if err := e.loadTree(ctx, x, s); err != nil {
		return err
	}
	// The user the command runs as, reserved until its outputs are
	// collected: staging may depend on it.
	if us, ok := e.opts.Sandbox.(UserSandbox); ok {
		u, release, err := us.AcquireUser(ctx)
		if err != nil {
			return fmt.Errorf("sandbox user: %w", err)
		}
		s.releaseUser = release
		s.user = &u
	}
	if err := e.stageRoot(ctx, x, s); err != nil {
		return err
	}
	x.md.InputFetchCompletedTimestamp = timestamppb.Now()
	return nil
}

// loadTree loads the input tree, checks it against the input limits and
// the working directory, and pins its files until the input root is gone.
func (e *Executor) loadTree(ctx context.Context, x *execution, s *staging) error {
	rootDigest, _ := cas.FromProto(x.action.InputRootDigest)
	tree, err := e.trees.LoadInputTree(s.ctx, e.opts.Store, rootDigest)
	if err != nil {
		return e.stageErr(ctx, err, x.timeout)
	}
	if err := tree.CheckLimits(e.opts.MaxInputEntries, e.opts.MaxInputBytes); err != nil {
		return err
	}
	s.tree = tree
	if pinner, ok := e.opts.Store.(cas.Pinner); ok {
		// Until the input root is gone.
		s.cleanups = append(s.cleanups, pinner.Pin(tree.Files))
	}
	if _, lazy := e.opts.InputRoot.(OptionsInputRoot); lazy {
		// A lazy root (actiondfs) reads blobs when the command opens
		// them: a blob evicted between LoadInputTree's check and the pin
		// would be an I/O error in the command, not MISSING for the
		// client to upload again. Eager roots find out while staging.
		m, err := e.opts.Store.FindMissing(ctx, tree.Files)
		if err != nil {
			return fmt.Errorf("check pinned input blobs: %w", err)
		}
		if len(m) > 0 {
			return &MissingBlobsError{Digests: m}
		}
	}
	_, err = tree.lookupDir(x.wd)
	return err
}

// stageRoot makes the loaded tree the execroot in a new stage directory
// through the InputRoot, and creates the output directories.
func (e *Executor) stageRoot(ctx context.Context, x *execution, s *staging) error {
	dir, err := os.MkdirTemp(e.opts.StageDir, "a-")
	if err != nil {
		return fmt.Errorf("create stage directory: %w", err)
	}
	s.dir = dir
	s.cleanups = append(s.cleanups, func() {
		if err := removeStage(dir); err != nil {
			e.log.Warn("remove stage directory", "dir", dir, "err", err)
		}
	})
	execRoot := filepath.Join(dir, stageRootName)
	inputRoot := e.opts.InputRoot
	staged, err := stageInputs(s.ctx, inputRoot, e.opts.Store, s.tree, execRoot, StageOptions{MutatesInputs: x.plat.MutatesInputs, User: s.user})
	if err != nil {
		rootDigest, _ := cas.FromProto(x.action.InputRootDigest)
		return e.stageErr(ctx, fmt.Errorf("stage input root %s (%s): %w", rootDigest, inputRoot.Name(), err), x.timeout)
	}
	if staged.Dir != "" {
		execRoot = staged.Dir
	}
	s.root, s.execRoot = staged, execRoot
	s.cleanups = append(s.cleanups, func() {
		if err := staged.Cleanup(); err != nil {
			e.log.Warn("clean up input root", "dir", execRoot, "err", err)
		}
	})
	if x.plat.MutatesInputs && !staged.SelfProtected {
		if err := makeWritable(execRoot); err != nil {
			return err
		}
	}
	writable, err := prepareOutputDirs(execRoot, x.wd, x.outs, s.tree)
	if err != nil {
		return err
	}
	if staged.SelfProtected {
		// The root refuses what the command may not do itself, and it can
		// only see (and report) attempts that reach it.
		writable = append([]string{"."}, writable...)
	}
	s.writable = writable
	return nil
}

// run runs the command in the staged root for what is left of the timeout.
func (e *Executor) run(ctx context.Context, x *execution, s *staging) (*RunSpec, *RunResult, error) {
	x.progress(StageRunning)
	remaining := time.Until(s.deadline)
	if remaining <= 0 || s.ctx.Err() != nil {
		return nil, nil, e.stageErr(ctx, context.DeadlineExceeded, x.timeout)
	}
	spec := &RunSpec{
		ExecRoot:         s.execRoot,
		WorkingDirectory: x.wd,
		WritableDirs:     s.writable,
		WritableInputs:   x.plat.MutatesInputs && !s.root.SelfProtected,
		Args:             x.command.Arguments,
		Env:              envList(x.command.EnvironmentVariables),
		Runtime:          x.plat.Runtime,
		Limits:           x.plat.Limits,
		Timeout:          remaining,
		StdoutPath:       filepath.Join(s.dir, stageStdoutName),
		StderrPath:       filepath.Join(s.dir, stageStderrName),
		User:             s.user,
	}
	x.md.ExecutionStartTimestamp = timestamppb.Now()
	run, err := e.opts.Sandbox.Run(ctx, spec)
	x.md.ExecutionCompletedTimestamp = timestamppb.Now()
	if err != nil {
		if ctx.Err() != nil {
			return nil, nil, ctx.Err()
		}
		return nil, nil, fmt.Errorf("sandbox: %w", err)
	}
	return spec, run, nil
}

// collect moves the outputs and the command's stdout and stderr into the
// CAS, keeping them pinned until the response is made.
func (e *Executor) collect(ctx context.Context, x *execution, s *staging, spec *RunSpec, run *RunResult) (*repb.ExecuteResponse, error) {
	x.progress(StageUploadingOutputs)
	md := x.md
	md.OutputUploadStartTimestamp = timestamppb.Now()
	result := &repb.ActionResult{ExitCode: int32(run.ExitCode), ExecutionMetadata: md}
	var outDigests []cas.Digest
	var refused []string
	if s.root.Report != nil {
		refused = s.root.Report()
	}
	if len(refused) > 0 && run.ExitCode != 0 {
		appendLines(spec.StderrPath, refused)
	}
	collectErr := e.collectOutputs(ctx, s.execRoot, x.wd, x.outs, s.root.OutputPath, result, &outDigests)
	if err := e.storeStreams(ctx, spec, result, &outDigests); err != nil {
		return nil, err
	}
	if pinner, ok := e.opts.Store.(cas.Pinner); ok {
		defer pinner.Pin(outDigests)()
	}
	md.OutputUploadCompletedTimestamp = timestamppb.Now()
	md.WorkerCompletedTimestamp = timestamppb.Now()
	return e.respond(ctx, x, s, run, result, refused, collectErr)
}

// storeStreams moves the command's stdout and stderr files, where they
// exist, into the CAS and names them in result.
func (e *Executor) storeStreams(ctx context.Context, spec *RunSpec, result *repb.ActionResult, digests *[]cas.Digest) error {
	for _, st := range []struct {
		path string
		set  func(*repb.Digest)
	}{
		{spec.StdoutPath, func(d *repb.Digest) { result.StdoutDigest = d }},
		{spec.StderrPath, func(d *repb.Digest) { result.StderrDigest = d }},
	} {
		fi, err := os.Stat(st.path)
		if err != nil {
			continue
		}
		if fi.Mode().IsRegular() && fi.Size() == 0 {
			// The usual case: nothing to hash or move (every process
			// that could write to it has ended).
			st.set(cas.EmptyDigest.Proto())
			continue
		}
		d, err := e.opts.Store.PutFile(ctx, st.path)
		if err != nil {
			return fmt.Errorf("store output stream: %w", err)
		}
		*digests = append(*digests, d)
		st.set(d.Proto())
	}
	return nil
}

// respond makes the response to a command that ran: the server log, the
// messages, the timeout status, and for a successful, cacheable result
// the ActionCache entry. collectErr, from collecting the outputs, fails
// the execution after the log is stored.
func (e *Executor) respond(ctx context.Context, x *execution, s *staging, run *RunResult, result *repb.ActionResult, refused []string, collectErr error) (*repb.ExecuteResponse, error) {
	resp := &repb.ExecuteResponse{Result: result}
	// A server log only where it says something the result does not: a
	// plain success would cost a blob write per action (and a client that
	// fetches logs, a read) to repeat the exit code and the timestamps.
	if run.ExitCode != 0 || run.TimedOut || run.Message != "" || len(refused) > 0 || len(run.Enforced) > 0 || len(x.plat.Ignored) > 0 || collectErr != nil {
		logText := e.serverLog(x.req, x.plat, e.opts.InputRoot.Name(), s.tree, run)
		if len(refused) > 0 {
			logText += strings.Join(refused, "\n") + "\n"
		}
		if d, err := e.putBytes(ctx, []byte(logText)); err == nil {
			resp.ServerLogs = map[string]*repb.LogFile{"sandbox": {Digest: d.Proto(), HumanReadable: true}}
		}
	}
	if run.Message != "" {
		resp.Message = run.Message
	}
	if len(refused) > 0 {
		resp.Message = strings.TrimSpace(resp.Message + "\n" + strings.Join(refused, "\n"))
		e.log.Info("action was refused input changes", "action", x.req.ActionDigest.String(), "refused", refused)
	}
	if collectErr != nil {
		return resp, collectErr
	}
	if run.TimedOut {
		msg := fmt.Sprintf("action timed out after %s", x.timeout)
		resp.Status = status.New(codes.DeadlineExceeded, msg).Proto()
		resp.Message = msg
		return resp, nil
	}
	if run.ExitCode == 0 && !x.action.DoNotCache {
		e.storeResult(ctx, x.req.ActionDigest, result)
	}
	resp.Result = e.inlineStreams(ctx, result)
	e.log.Debug("action done", "action", x.req.ActionDigest.String(), "exit", run.ExitCode,
		"runtime", x.plat.Runtime, "inputs", s.tree.FileCount, "wall", run.Wall)
	return resp, nil
}

// MaxInlineStream bounds a stdout or stderr that an Execute response
// carries itself (stdout_raw, stderr_raw). Bazel writes those out instead
// of downloading the streams by digest: one ByteStream Read fewer per
// non-empty stream, on every action that prints (a compiler's warnings).
const MaxInlineStream = 64 << 10

// inlineStreams returns res with its small stdout and stderr inlined, as
// a copy: the ActionCache keeps results without them, since the REAPI
// inlines into GetActionResult only on request. A stream that cannot be
// read stays a digest alone.
func (e *Executor) inlineStreams(ctx context.Context, res *repb.ActionResult) *repb.ActionResult {
	small := func(d *repb.Digest) bool { return d != nil && d.SizeBytes > 0 && d.SizeBytes <= MaxInlineStream }
	if !small(res.StdoutDigest) && !small(res.StderrDigest) {
		return res
	}
	out := proto.Clone(res).(*repb.ActionResult)
	read := func(pd *repb.Digest) []byte {
		if !small(pd) {
			return nil
		}
		d, err := cas.FromProto(pd)
		if err != nil {
			return nil
		}
		b, err := cas.ReadAll(ctx, e.opts.Store, d)
		if err != nil {
			return nil
		}
		return b
	}
	out.StdoutRaw, out.StderrRaw = read(res.StdoutDigest), read(res.StderrDigest)
	return out
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

// The entries of a stage directory: the input root (which cleans up
// after itself) and the command's output files.
const (
	stageRootName   = "root"
	stageStdoutName = "stdout"
	stageStderrName = "stderr"
)

// removeStage removes a stage directory, its usual entries by name first:
// a generic os.RemoveAll costs a dozen more system calls per action
// (failed unlink and rmdir attempts, opens, directory reads). Anything else
// left (a root that could not clean up after itself) goes the generic way.
func removeStage(dir string) error {
	for _, name := range []string{stageStdoutName, stageStderrName, stageRootName, ""} {
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return os.RemoveAll(dir)
		}
	}
	return nil
}

// storeResult records the result of an action that ran in the
// ActionCache, behind the response where the cache can (see
// actioncache.WriteBehind). A failure only costs a later cache miss.
func (e *Executor) storeResult(ctx context.Context, action cas.Digest, result *repb.ActionResult) {
	warn := func(err error) { e.log.Warn("store action result", "action", action.String(), "err", err) }
	var err error
	if wb, ok := e.opts.Cache.(actioncache.WriteBehind); ok {
		err = wb.PutBehind(action, result, warn)
	} else {
		err = e.opts.Cache.Put(ctx, action, result)
	}
	if err != nil {
		warn(err)
	}
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
