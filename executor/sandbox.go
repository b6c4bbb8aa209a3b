package executor

import (
	"context"
	"time"
)

// Sandbox runs one command in an isolated environment. The executor owns
// everything around the run (inputs, outputs, caching); a Sandbox only has to
// make the command see the prepared execroot, the selected runtime and
// nothing else, and to make sure nothing it started outlives Run.
type Sandbox interface {
	// Run executes spec.Args and returns once every process the command
	// started has exited. A non-nil error means the sandbox itself failed
	// (the command may not have run); the command's own failure is reported
	// in RunResult.
	Run(ctx context.Context, spec *RunSpec) (*RunResult, error)
	// Runtimes lists the runtime names Run accepts.
	Runtimes() []string
}

// User is a uid and gid an action runs as.
type User struct{ UID, GID int }

// UserSandbox is a Sandbox that runs each action as a user of its own, so
// that concurrent actions share no per-user kernel limits (inotify
// instances, RLIMIT_NPROC, pipe buffers) and cannot reach each other's
// files. The executor reserves the user before it stages the inputs, which
// may need to know it (StageOptions.User), passes it in RunSpec.User and
// releases it once the action's outputs are collected.
type UserSandbox interface {
	Sandbox
	// AcquireUser reserves a user for one action, waiting while all are
	// in use; release gives it back.
	AcquireUser(ctx context.Context) (u User, release func(), err error)
}

// RunSpec describes one command execution.
type RunSpec struct {
	// ExecRoot is the host directory holding the materialised input root.
	// The command sees it read-only at ExecRootMount (its working directory
	// is relative to it), except for WritableDirs.
	ExecRoot string
	// WorkingDirectory is relative to ExecRoot ("" means ExecRoot itself).
	WorkingDirectory string
	// WritableDirs are paths relative to ExecRoot that the command may write
	// (the directories that will hold outputs). They exist before Run.
	WritableDirs []string
	// WritableInputs makes the whole ExecRoot writable (mutates_inputs).
	WritableInputs bool
	// Args is argv; Args[0] is resolved against PATH from Env when it has no
	// slash, relative to the working directory when it has one.
	Args []string
	// Env is the complete environment, "KEY=value"; nothing else is added.
	Env []string
	// User, if set, is who the command runs as (from
	// UserSandbox.AcquireUser); nil lets the sandbox choose.
	User *User
	// Runtime names the root file system to run in ("host", "glibc2.36", ...).
	Runtime string
	// Limits come from platform properties; zero values mean unlimited.
	Limits Limits
	// Timeout kills the command (and everything it started) after this long;
	// zero means no timeout beyond ctx.
	Timeout time.Duration
	// StdoutPath and StderrPath are host files the command's output is
	// written to; the sandbox creates or truncates them.
	StdoutPath string
	StderrPath string
}

// Limits are per-action resource limits.
type Limits struct {
	MemoryBytes int64 // memory limit, bytes
	CPUMillis   int64 // CPU quota in thousandths of a core (1000 = one core)
	Pids        int64 // maximum number of tasks
	// TmpBytes is the size of /tmp and of /dev/shm, each ("tmp_size");
	// zero: the sandbox's default. A sandbox refuses more than its own
	// limit with an InvalidInputError.
	TmpBytes int64
}

// RunResult is what happened to the command.
type RunResult struct {
	// ExitCode is the command's exit status, or 128+N when killed by signal N.
	ExitCode int
	// TimedOut is true when Timeout (not ctx) ended the command.
	TimedOut bool
	// OOMKilled is true when the memory limit killed the command.
	OOMKilled bool
	// Enforced lists the limits that were actually enforced and how
	// (e.g. "memory=64MiB via cgroup v1"), for the server logs.
	Enforced []string
	// Message explains an abnormal end in words a user can act on.
	Message string
	// Wall is the time the command ran.
	Wall time.Duration
}

// ExecRootMount is where the command sees ExecRoot inside the sandbox.
const ExecRootMount = "/execroot"

// UnknownRuntimeError is returned by a Sandbox asked for a runtime it does not have.
type UnknownRuntimeError struct {
	Name      string
	Available []string
}

func (e *UnknownRuntimeError) Error() string {
	return "unknown runtime " + quote(e.Name) + "; available: " + joinQuoted(e.Available)
}
