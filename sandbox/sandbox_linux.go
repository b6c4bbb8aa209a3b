package sandbox

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/sandbox/internal/sandboxinit"
)

// Sandbox runs commands in per-action namespaces, roots and cgroups. It is
// safe for concurrent use by many Runs; Close must not overlap with Run.
type Sandbox struct {
	log      *slog.Logger
	users    *userPool
	tmpSize  int64 // of /tmp and /dev/shm; <= 0: the kernel's default
	runtimes map[string]Runtime
	names    []string
	state    string // private scratch directory, removed by Close
	rootDir  string // mount point of every action's root, each in its own mount namespace
	cgroups  *cgroupManager

	etcMu   sync.Mutex
	etcDirs map[executor.User]string // generated hosts, passwd and group, per user

	// openTree: the execroot goes to helpers as an open_tree(2) descriptor
	// (Linux 5.2), which prestarted helpers need.
	openTree bool
	spares   chan *helper // idle helpers, prestarted or kept from earlier actions
	prestart int          // how many idle helpers to keep started ahead
	running  atomic.Int64 // runs holding a helper
	peak     atomic.Int64 // the most runs that held helpers at once
	nice     int          // this process's nice value, which commands get
	spareMu  sync.Mutex   // serialises filling spares against Close
	retiring sync.WaitGroup
	closed   bool
}

var _ executor.UserSandbox = (*Sandbox)(nil)

// New checks cfg, prepares the state directory and probes the host's cgroup
// setup. It mounts nothing; see LoadRuntimes for SquashFS runtimes.
func New(cfg Config) (*Sandbox, error) {
	s := &Sandbox{
		log:      cfg.Logger,
		tmpSize:  cfg.TmpSize,
		runtimes: make(map[string]Runtime, len(cfg.Runtimes)),
		etcDirs:  make(map[executor.User]string),
	}
	if s.tmpSize == 0 {
		s.tmpSize = DefaultTmpSize
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	users, err := newUserPool(cfg)
	if err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	s.users = users
	if users.fixed == nil {
		if found := overlaps(users.ids, os.ReadFile); len(found) > 0 {
			s.log.Warn("sandbox: host users, groups or subordinate id ranges have ids that actions run as; choose another range (--action-uids)",
				"range", users.ids.String(), "found", found)
		}
	}
	if len(cfg.Runtimes) == 0 {
		return nil, errors.New("sandbox: no runtimes configured")
	}
	for _, rt := range cfg.Runtimes {
		if err := checkRuntime(rt); err != nil {
			return nil, fmt.Errorf("sandbox: %w", err)
		}
		if _, dup := s.runtimes[rt.Name]; dup {
			return nil, fmt.Errorf("sandbox: runtime %q configured twice", rt.Name)
		}
		s.runtimes[rt.Name] = rt
		s.names = append(s.names, rt.Name)
	}
	slices.Sort(s.names)
	if err := sandboxinit.Supported(); err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}

	base := cfg.StateDir
	if base == "" {
		base = os.TempDir()
	}
	// Private (MkdirTemp makes it 0700): actions see their roots and
	// /etc files through mounts in their own namespaces, never through
	// these paths, and other local users have nothing to do here.
	if err := os.MkdirAll(base, 0o700); err != nil {
		return nil, fmt.Errorf("sandbox: state dir: %w", err)
	}
	state, err := os.MkdirTemp(base, "sandbox-")
	if err != nil {
		return nil, fmt.Errorf("sandbox: state dir: %w", err)
	}
	s.state = state
	s.rootDir = filepath.Join(state, "root")
	if err := os.Mkdir(s.rootDir, 0o755); err != nil {
		os.RemoveAll(state)
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	s.cgroups = newCgroupManager(s.log)
	if fd, err := unix.OpenTree(unix.AT_FDCWD, state, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC); err == nil {
		unix.Close(fd)
		s.openTree = true
	}
	n := cfg.PrestartedHelpers
	if n == 0 {
		n = DefaultPrestartedHelpers
	}
	if !s.openTree {
		n = 0
	}
	s.prestart = max(n, 0)
	idle := 0
	if s.openTree {
		idle = max(s.prestart, maxIdleHelpers)
	}
	s.spares = make(chan *helper, idle)
	for range s.prestart {
		go s.addSpare()
	}
	// getpriority(2) returns 20 - nice.
	if prio, err := unix.Getpriority(unix.PRIO_PROCESS, 0); err == nil {
		s.nice = 20 - prio
	}
	s.log.Debug("sandbox ready", "runtimes", s.names, "users", s.users.String(),
		"state", state, "cgroups", s.cgroups.String())
	return s, nil
}

func checkRuntime(rt Runtime) error {
	if rt.Name == "" {
		return errors.New("runtime without a name")
	}
	if rt.Host {
		return nil
	}
	if !filepath.IsAbs(rt.Root) {
		return fmt.Errorf("runtime %q: root %q is not an absolute path", rt.Name, rt.Root)
	}
	fi, err := os.Stat(rt.Root)
	if err != nil {
		return fmt.Errorf("runtime %q: %w", rt.Name, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("runtime %q: root %s is not a directory", rt.Name, rt.Root)
	}
	return nil
}

// etcDir returns the directory of generated /etc files for actions run
// as u, writing it on first use.
func (s *Sandbox) etcDir(u executor.User) (string, error) {
	s.etcMu.Lock()
	defer s.etcMu.Unlock()
	if d, ok := s.etcDirs[u]; ok {
		return d, nil
	}
	d := filepath.Join(s.state, fmt.Sprintf("etc-%d-%d", u.UID, u.GID))
	if err := os.Mkdir(d, 0o755); err != nil {
		return "", fmt.Errorf("generated /etc: %w", err)
	}
	for name, content := range generatedEtc(u.UID, u.GID) {
		if err := os.WriteFile(filepath.Join(d, name), []byte(content), 0o644); err != nil {
			return "", fmt.Errorf("generated /etc: %w", err)
		}
	}
	s.etcDirs[u] = d
	return d, nil
}

// generatedEtc returns the files that replace the runtime's /etc/hosts,
// /etc/passwd and /etc/group in every action.
func generatedEtc(uid, gid int) map[string]string {
	passwd := "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
	group := "root:x:0:\nnogroup:x:65534:\n"
	// The action's own ids get a name, so that getpwuid, whoami and
	// tools that want a user name work.
	if uid != DefaultID {
		passwd += fmt.Sprintf("actiond:x:%d:%d:actiond action:/tmp:/usr/sbin/nologin\n", uid, gid)
	}
	if gid != DefaultID {
		group += fmt.Sprintf("actiond:x:%d:\n", gid)
	}
	return map[string]string{
		"hosts":  "127.0.0.1\tlocalhost\n::1\tlocalhost\n",
		"passwd": passwd,
		"group":  group,
	}
}

// Runtimes lists the runtime names Run accepts, sorted.
func (s *Sandbox) Runtimes() []string { return slices.Clone(s.names) }

// AcquireUser implements executor.UserSandbox: the lowest id of the range
// not in use by another action (every time the same one with fixed
// Config.UID/GID).
func (s *Sandbox) AcquireUser(ctx context.Context) (executor.User, func(), error) {
	return s.users.acquire(ctx)
}

// Close unmounts the runtimes that LoadRuntimes mounted and removes the
// state directory. Runs must have finished.
func (s *Sandbox) Close() error {
	s.spareMu.Lock()
	s.closed = true
	s.spareMu.Unlock()
	for {
		select {
		case h := <-s.spares:
			h.kill()
			continue
		default:
		}
		break
	}
	s.retiring.Wait()
	var errs []error
	for _, name := range s.names {
		if rt := s.runtimes[name]; rt.Image != "" {
			if err := unmount(rt.Root); err != nil {
				errs = append(errs, fmt.Errorf("unmount runtime %q: %w", name, err))
			}
		}
	}
	if err := os.RemoveAll(s.state); err != nil {
		errs = append(errs, fmt.Errorf("remove state dir: %w", err))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("sandbox: close: %w", err)
	}
	return nil
}

// Run executes spec in a fresh sandbox, as spec.User (or a user Run
// acquires for itself), and returns once every process it started is gone.
//
// Before starting, Run gives each of spec.WritableDirs (the directory
// itself, not its contents) to the action's group, mode 1770, keeping its
// owner: the action can create its outputs there but, thanks to the
// sticky bit, cannot remove or rename the root-owned input files that may
// share the directory, and no other user can enter it. With
// spec.WritableInputs it gives every directory under ExecRoot to the
// action's uid/gid instead (mode 0755). Files are never chowned or
// chmodded: input files stay root-owned and read-only, so an action that
// "mutates" an input can only replace it, never change a shared CAS blob
// in place.
func (s *Sandbox) Run(ctx context.Context, spec *executor.RunSpec) (*executor.RunResult, error) {
	rt, ok := s.runtimes[spec.Runtime]
	if !ok {
		return nil, &executor.UnknownRuntimeError{Name: spec.Runtime, Available: s.Runtimes()}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	tmpSize := s.tmpSize
	if n := spec.Limits.TmpBytes; n > 0 {
		if s.tmpSize > 0 && n > s.tmpSize {
			return nil, &executor.InvalidInputError{Msg: fmt.Sprintf("platform property tmp_size: %d bytes is over this server's limit of %d bytes (--sandbox-tmp-size)", n, s.tmpSize)}
		}
		tmpSize = n
	}
	var user executor.User
	if spec.User != nil {
		user = *spec.User
	} else {
		u, release, err := s.users.acquire(ctx)
		if err != nil {
			return nil, fmt.Errorf("sandbox: %w", err)
		}
		defer release()
		user = u
	}
	if user.UID <= 0 || user.GID <= 0 {
		return nil, fmt.Errorf("sandbox: refusing to run as uid %d, gid %d", user.UID, user.GID)
	}
	etcDir, err := s.etcDir(user)
	if err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	writable, err := s.prepareExecRoot(spec, user)
	if err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	hs := &sandboxinit.Spec{
		RootDir:          s.rootDir,
		EtcDir:           etcDir,
		Runtime:          sandboxinit.Runtime{Name: rt.Name, Root: rt.Root, Host: rt.Host},
		ExecRoot:         spec.ExecRoot,
		ExecRootMount:    executor.ExecRootMount,
		WorkingDirectory: spec.WorkingDirectory,
		WritableDirs:     writable,
		WritableInputs:   spec.WritableInputs,
		Args:             spec.Args,
		Env:              spec.Env,
		UID:              user.UID,
		GID:              user.GID,
		TmpSize:          tmpSize,
		MaxProcs:         maxProcs(spec.Limits.Pids),
		Nice:             s.nice,
	}

	stdout, stderr, err := openOutputs(spec.StdoutPath, spec.StderrPath)
	if err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	defer stdout.Close()
	defer stderr.Close()

	return s.run(ctx, spec, hs, stdout, stderr)
}

func (s *Sandbox) run(ctx context.Context, spec *executor.RunSpec, hs *sandboxinit.Spec, stdout, stderr *os.File) (*executor.RunResult, error) {
	// Trees of the execroot's and the runtime's mounts, for the helper to
	// move into its root: a prestarted helper's namespace cannot see mounts
	// made after it was cloned (actiondfs mounts the execroot per action;
	// LoadRuntimes may mount a rebuilt image).
	treeFD, runtimeFD := -1, -1
	if s.openTree {
		fd, err := unix.OpenTree(unix.AT_FDCWD, spec.ExecRoot, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC|unix.AT_RECURSIVE)
		if err != nil {
			return nil, fmt.Errorf("sandbox: execroot %s: open_tree: %w", spec.ExecRoot, err)
		}
		treeFD = fd
		defer unix.Close(treeFD)
	}
	if s.openTree && !hs.Runtime.Host {
		fd, err := unix.OpenTree(unix.AT_FDCWD, hs.Runtime.Root, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC|unix.AT_RECURSIVE)
		if err != nil {
			return nil, fmt.Errorf("sandbox: runtime %q: open_tree %s: %w", hs.Runtime.Name, hs.Runtime.Root, err)
		}
		runtimeFD = fd
		defer unix.Close(runtimeFD)
	}
	h := s.takeHelper()
	// Earlier actions' files stay charged to a kept helper's cgroup as page
	// cache. Setting a memory limit below that makes the kernel reclaim it
	// on the spot, and fail (v1) or OOM-kill (v2) where it cannot: give an
	// action with a memory limit a fresh helper instead of a heavy one.
	if h != nil && spec.Limits.MemoryBytes > 0 && s.cgroups.memoryUsage(h.cg) > spec.Limits.MemoryBytes/4 {
		h.kill()
		h = nil
	}
	if h == nil {
		var err error
		if h, err = s.startHelper(false); err != nil {
			return nil, err
		}
	}
	for n := s.running.Add(1); ; {
		p := s.peak.Load()
		if n <= p || s.peak.CompareAndSwap(p, n) {
			break
		}
	}
	defer s.running.Add(-1)
	cg := h.cg
	keep := false // the helper ran the action cleanly; it can run another
	defer func() {
		if keep {
			if err := cg.unlimit(); err != nil {
				s.log.Warn("sandbox: lifting an action's limits", "cgroup", cg.name, "err", err)
				keep = false
			}
		}
		if keep {
			s.putHelper(h)
		} else {
			h.kill()
		}
	}()
	kill := func() {
		_ = h.cmd.Process.Kill()
		cg.kill()
	}

	// The helper waits for its spec before doing anything for the action,
	// so it is under every limit before the command can start.
	if err := s.cgroups.limit(cg, spec.Limits); err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	fds := []int{int(stdout.Fd()), int(stderr.Fd())}
	hs.Files = []string{sandboxinit.FileStdout, sandboxinit.FileStderr}
	if treeFD >= 0 {
		fds = append(fds, treeFD)
		hs.Files = append(hs.Files, sandboxinit.FileExecRoot)
	}
	if runtimeFD >= 0 {
		fds = append(fds, runtimeFD)
		hs.Files = append(hs.Files, sandboxinit.FileRuntime)
	}
	if err := h.send(hs, fds); err != nil {
		s.log.Debug("sandbox: writing spec to helper", "err", err) // the helper died; its status says why
	}
	start := time.Now()

	var timeout <-chan time.Time
	if spec.Timeout > 0 {
		t := time.NewTimer(spec.Timeout)
		defer t.Stop()
		timeout = t.C
	}
	var st *sandboxinit.Status
	var waitErr error
	timedOut := false
	select {
	case st = <-h.statuses:
		if st == nil { // the helper ended without a status: say how
			waitErr = <-h.done
			h.done <- waitErr // for the deferred kill
		}
	case waitErr = <-h.done:
		h.done <- waitErr // for the deferred kill
		st = <-h.statuses // written just before it exited, if at all
	case <-timeout:
		timedOut = true
		kill()
		waitErr = <-h.done
		h.done <- waitErr // for the deferred kill
		st = <-h.statuses // the command may have ended just as the timer fired
	case <-ctx.Done():
		kill()
		return nil, fmt.Errorf("sandbox: %w", ctx.Err())
	}
	wall := time.Since(start)

	res := &executor.RunResult{Enforced: cg.enforced, Wall: wall}
	if st != nil && st.WallNS > 0 {
		res.Wall = time.Duration(st.WallNS)
	}
	oom := cg.oomKilled()
	switch {
	case timedOut && (st == nil || !st.Done):
		res.TimedOut = true
		res.ExitCode = 128 + int(unix.SIGKILL)
		res.Message = fmt.Sprintf("killed: timed out after %s", spec.Timeout)
		return res, nil
	case st != nil && st.Error != "":
		return nil, fmt.Errorf("sandbox: setting up: %s", st.Error)
	case st != nil && st.Done: // possibly just as the timer fired
		res.ExitCode = st.Code()
		res.Message = st.Message
		if st.Signal != 0 && res.Message == "" {
			res.Message = "killed by signal " + unix.SignalName(syscall.Signal(st.Signal))
		}
	case oom:
		// The OOM killer chose the helper itself; everything died with it.
		res.ExitCode = 128 + int(unix.SIGKILL)
	default:
		return nil, fmt.Errorf("sandbox: helper ended without a status: %v", waitErr)
	}
	// The helper killed and reaped everything the command left.
	keep = st != nil && st.Done && !timedOut
	// A process killed for memory that the command survived (exit 0) does
	// not make the action fail.
	if oom && res.ExitCode != 0 {
		res.OOMKilled = true
		res.Message = "killed: exceeded memory limit of " + formatBytes(spec.Limits.MemoryBytes)
	}
	s.log.Debug("sandbox: ran", "argv0", spec.Args[0], "runtime", spec.Runtime, "exit", res.ExitCode,
		"wall", res.Wall, "oom", res.OOMKilled, "enforced", res.Enforced)
	return res, nil
}

// openOutputs creates (or truncates) the files that receive the command's
// stdout and stderr; an empty path discards the stream.
func openOutputs(stdoutPath, stderrPath string) (stdout, stderr *os.File, err error) {
	open := func(path string) (*os.File, error) {
		if path == "" {
			return os.OpenFile(os.DevNull, os.O_WRONLY, 0)
		}
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
		if err != nil {
			return nil, fmt.Errorf("output file: %w", err)
		}
		return f, nil
	}
	if stdout, err = open(stdoutPath); err != nil {
		return nil, nil, err
	}
	if stderrPath != "" && stderrPath == stdoutPath {
		// One open file description, so the streams interleave instead of
		// overwriting each other.
		fd, err := unix.FcntlInt(stdout.Fd(), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			stdout.Close()
			return nil, nil, fmt.Errorf("output file: %w", err)
		}
		return stdout, os.NewFile(uintptr(fd), stderrPath), nil
	}
	if stderr, err = open(stderrPath); err != nil {
		stdout.Close()
		return nil, nil, err
	}
	return stdout, stderr, nil
}

// formatBytes renders n as "64 MiB", "1.5 GiB" or "1000 bytes".
func formatBytes(n int64) string {
	units := []string{"KiB", "MiB", "GiB", "TiB"}
	if n < 1024 {
		return strconv.FormatInt(n, 10) + " bytes"
	}
	v, unit := float64(n), ""
	for _, u := range units {
		if v < 1024 {
			break
		}
		v /= 1024
		unit = u
	}
	return strconv.FormatFloat(math.Round(v*100)/100, 'f', -1, 64) + " " + unit
}
