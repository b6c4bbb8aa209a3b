package sandboxinit

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/actiond/actiond/internal/mountinfo"
)

// Argv0 is the argv[0] under which a binary linking this package acts as
// the sandbox's init process instead of running its main function.
const Argv0 = "actiond-sandbox-init"

// File descriptors the parent passes to the helper.
const (
	// SpecFD is a stream socket carrying one message per action: one byte
	// with SCM_RIGHTS file descriptors (Spec.Files says which), the length
	// of the Spec's JSON as a 4-byte big-endian number, then the JSON. The
	// parent sends a message only once the helper has reported the
	// previous action's Status and it has placed the helper in the new
	// action's cgroups. EOF ends the helper.
	SpecFD   = 3
	StatusFD = 4 // one Status as a JSON line per action
)

// PrestartEnv, set to 1 in the helper's environment, says the helper was
// started before its action was known and may run many actions: it drops
// its copies of actiondfs mounts (see prepare) and gets the execroot and a
// directory runtime as file descriptors, since mounts made later in the
// parent's namespace are not visible in its own.
const PrestartEnv = "ACTIOND_SANDBOX_PRESTARTED"

func init() {
	if len(os.Args) == 0 || os.Args[0] != Argv0 {
		return
	}
	os.Exit(helperMain())
}

// Runtime is the root file system to build the action's root from.
type Runtime struct {
	Name string
	Root string // directory tree; unused for the host runtime
	Host bool   // use the host's /usr, /bin, /lib*, /sbin
}

// Spec is what the parent tells the helper.
type Spec struct {
	RootDir          string   // where to build the action's root (in the new mount namespace)
	EtcDir           string   // files that replace the runtime's /etc entries of the same name
	Runtime          Runtime  // what the root is made of
	ExecRoot         string   // host directory of the input root
	ExecRootMount    string   // where the command sees ExecRoot
	WorkingDirectory string   // relative to ExecRootMount
	WritableDirs     []string // cleaned, relative to ExecRoot, parents first
	WritableInputs   bool     // the whole execroot is writable
	Args             []string // argv
	Env              []string // the complete environment
	UID, GID         int      // the command's ids
	TmpSize          int64    // bytes of /tmp and of /dev/shm; <= 0: the kernel's default
	MaxProcs         uint64   // RLIMIT_NPROC of the command (its uid's tasks); 0: the helper's own
	Nice             int      // the command's nice value (the server's own)
	// Files says what the descriptors sent with the spec are, in order:
	// FileExecRoot and FileRuntime (detached mount trees of the execroot
	// and of a directory runtime's root, from open_tree(2), used instead of
	// the paths, which a prestarted helper sees as they were when it was
	// cloned), FileStdout and
	// FileStderr (the command's output files; without them the helper's
	// own stdout and stderr are used).
	Files []string
}

// Names of the descriptors in Spec.Files.
const (
	FileExecRoot = "execroot"
	FileRuntime  = "runtime" // a detached mount tree of Runtime.Root
	FileStdout   = "stdout"
	FileStderr   = "stderr"
)

// Status is what the helper reports back.
type Status struct {
	Error    string `json:"error,omitempty"`   // the sandbox could not be set up
	Done     bool   `json:"done,omitempty"`    // the command ran (or failed to exec) and ended
	ExitCode int    `json:"exit_code"`         // its exit status, when it exited
	Signal   int    `json:"signal,omitempty"`  // the signal that killed it
	Message  string `json:"message,omitempty"` // why it could not start, if so
	WallNS   int64  `json:"wall_ns,omitempty"` // how long it ran
}

// Code is the command's exit code, 128+N for death by signal N.
func (st *Status) Code() int {
	if st.Signal != 0 {
		return 128 + st.Signal
	}
	return st.ExitCode
}

// helperMain runs actions until the parent closes the spec socket. Each
// action gets namespaces and a root of its own, made on a thread of its
// own (see startCommand); the helper itself stays in the namespaces it
// was cloned into, as PID 1 of the PID namespace its actions share one at
// a time, and kills whatever an action leaves behind before reporting.
func helperMain() int {
	if os.Getpid() != 1 {
		fmt.Fprintf(os.Stderr, "%s: internal helper of the actiond sandbox; not for direct use\n", Argv0)
		return 125
	}
	status := json.NewEncoder(os.NewFile(StatusFD, "status"))
	report := func(st *Status) int {
		if err := status.Encode(st); err != nil || st.Error != "" {
			return 125
		}
		return 0
	}
	// Nothing the helper holds may reach a command.
	if err := closeOnExec(); err != nil {
		return report(&Status{Error: err.Error()})
	}
	if os.Getenv(PrestartEnv) == "1" {
		if err := prepare(); err != nil {
			return report(&Status{Error: err.Error()})
		}
	}
	// A kept helper builds the part of its actions' roots they all share
	// once (see template); one started for a single action builds all of
	// its root in the action's namespace.
	var tpl *template
	if os.Getenv(PrestartEnv) == "1" {
		tpl = &template{}
	}
	var nproc unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NPROC, &nproc); err != nil {
		return report(&Status{Error: fmt.Sprintf("RLIMIT_NPROC: %v", err)})
	}
	spec := os.NewFile(SpecFD, "spec")
	for {
		s, files, err := readSpec(spec)
		if errors.Is(err, io.EOF) {
			return 0
		}
		if err != nil {
			return report(&Status{Error: fmt.Sprintf("reading spec: %v", err)})
		}
		if s.MaxProcs == 0 {
			s.MaxProcs = nproc.Cur
		}
		// An action that could not be set up may have left its thread's
		// state half made: end the helper rather than reuse it.
		if code := report(runAction(s, files, tpl)); code != 0 {
			return code
		}
	}
}

// runAction runs one command and, once it has ended, everything it left.
// With tpl, the action's root starts from the helper's template.
func runAction(spec *Spec, files map[string]int, tpl *template) *Status {
	var generated []string // with tpl: the generated /etc files
	if tpl != nil {
		// In the helper's own mount namespace, which the action's is
		// copied from.
		var err error
		if generated, err = tpl.ensure(spec, files); err != nil {
			for _, fd := range files {
				unix.Close(fd)
			}
			return &Status{Error: err.Error()}
		}
	}
	type started struct {
		pid int
		st  *Status
	}
	ch := make(chan started, 1)
	go func() {
		// Never unlocked: the thread has the action's namespaces, root
		// and dropped privileges, so the runtime ends it with this
		// goroutine instead of reusing it.
		runtime.LockOSThread()
		pid, st := startCommand(spec, files, tpl != nil, generated)
		ch <- started{pid, st}
	}()
	s := <-ch
	for _, fd := range files {
		unix.Close(fd) // the command has its own copies; trees were consumed or are unused
	}
	if s.st != nil {
		killAll()
		return s.st
	}
	start := time.Now()
	ws, err := reapUntil(s.pid)
	wall := time.Since(start)
	killAll()
	if err != nil {
		return &Status{Error: err.Error()}
	}
	st := &Status{Done: true, WallNS: int64(wall)}
	if ws.Signaled() {
		st.Signal = int(ws.Signal())
	} else {
		st.ExitCode = ws.ExitStatus()
	}
	return st
}

// startCommand makes the action's namespaces and root on the calling
// thread, which must be locked to its goroutine and never used again,
// drops the thread's privileges and forks the command from it. It returns
// the command's pid, or the status of an action that could not start.
// With templated, the base of the root is already at spec.RootDir (see
// template) and generated names the files of spec.EtcDir.
func startCommand(spec *Spec, files map[string]int, templated bool, generated []string) (int, *Status) {
	fail := func(err error) (int, *Status) { return 0, &Status{Error: err.Error()} }
	// The parent moved the helper into the action's cgroups before sending
	// the spec: rooting a cgroup namespace there makes the command see its
	// cgroups as "/" and learn nothing of the host's hierarchy. A new mount
	// namespace also unshares the thread's root and working directory.
	if err := unix.Unshare(unix.CLONE_NEWNS | unix.CLONE_NEWNET | unix.CLONE_NEWIPC |
		unix.CLONE_NEWUTS | unix.CLONE_NEWCGROUP); err != nil {
		return fail(fmt.Errorf("namespaces: %w", err))
	}
	if err := setUpNamespaces(); err != nil {
		return fail(err)
	}
	trees := treeFDs{execRoot: -1, runtime: -1}
	if fd, ok := files[FileExecRoot]; ok {
		trees.execRoot = fd
		delete(files, FileExecRoot) // attachTree closes it
	}
	if fd, ok := files[FileRuntime]; ok {
		trees.runtime = fd
		delete(files, FileRuntime)
	}
	build := func() error { return buildRoot(spec, trees) }
	if templated {
		build = func() error {
			if err := makePrivate(); err != nil {
				return err
			}
			return finishRoot(spec, trees.execRoot, generated)
		}
	}
	if err := build(); err != nil {
		return fail(err)
	}
	wd := join(spec.ExecRootMount, spec.WorkingDirectory)
	if err := unix.Chdir(wd); err != nil {
		return fail(fmt.Errorf("working directory %s: %w", wd, err))
	}
	path, err := lookPath(spec.Args[0], spec.Env)
	if err != nil {
		return 0, &Status{Done: true, ExitCode: 127, Message: err.Error()}
	}
	// Nice values are per thread; this one may have been made by a
	// prestarted helper's low-priority thread.
	if err := unix.Setpriority(unix.PRIO_PROCESS, 0, spec.Nice); err != nil {
		return fail(fmt.Errorf("nice %d: %w", spec.Nice, err))
	}
	// Counted per uid, and each running action has a uid of its own: a
	// bound on its tasks that holds where no pids cgroup controller does.
	// The helper (root) is exempt when it forks; the command's setuid and
	// every fork after it are not.
	if err := unix.Setrlimit(unix.RLIMIT_NPROC, &unix.Rlimit{Cur: spec.MaxProcs, Max: spec.MaxProcs}); err != nil {
		return fail(fmt.Errorf("RLIMIT_NPROC: %w", err))
	}
	if err := dropPrivileges(); err != nil {
		return fail(err)
	}
	stdio := []uintptr{0, 1, 2}
	if fd, ok := files[FileStdout]; ok {
		stdio[1] = uintptr(fd)
	}
	if fd, ok := files[FileStderr]; ok {
		stdio[2] = uintptr(fd)
	}
	pid, err := syscall.ForkExec(path, spec.Args, &syscall.ProcAttr{
		Env:   spec.Env,
		Files: stdio,
		Sys: &syscall.SysProcAttr{
			Credential: &syscall.Credential{Uid: uint32(spec.UID), Gid: uint32(spec.GID), Groups: []uint32{}},
			Setsid:     true,
		},
	})
	if err != nil {
		if code, ok := execFailureCode(err); ok {
			return 0, &Status{Done: true, ExitCode: code, Message: fmt.Sprintf("cannot run %s: %v", spec.Args[0], err)}
		}
		return fail(fmt.Errorf("starting %s: %w", spec.Args[0], err))
	}
	return pid, nil
}

// setUpNamespaces does what an action's new namespaces need before
// anything else: a hostname and the loopback interface.
func setUpNamespaces() error {
	if err := unix.Sethostname([]byte("localhost")); err != nil {
		return fmt.Errorf("sethostname: %w", err)
	}
	return loopbackUp()
}

// prepare is what a kept helper does before its first action: make its
// mounts private, so nothing its actions mount propagates anywhere, and
// drop its copies of actiondfs mounts. Those were copied from the parent
// when the helper was cloned; the parent unmounting them later would not
// reach this namespace, and each copy would keep its FUSE connection (and
// the server behind it) alive until the helper ends. The execroot comes as
// a file descriptor instead.
//
// Slave mounts would let the host's later unmounts reach an idle helper,
// but with them the VM guest's kernel (6.1) once locked up both CPUs in a
// server and a helper, so they stay private.
func prepare() error {
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("making / private: %w", err)
	}
	mounts, err := mountinfo.Read()
	if err != nil {
		return err
	}
	var points []string
	for _, m := range mounts {
		if m.FSType == "fuse.actiondfs" || strings.HasPrefix(m.Source, "actiondfs") {
			points = append(points, m.Point)
		}
	}
	// Deepest first: an overlay may sit below another mount's point.
	slices.SortFunc(points, func(a, b string) int { return len(b) - len(a) })
	for _, p := range points {
		if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("dropping the copy of %s: %w", p, err)
		}
	}
	return nil
}

// readSpec reads the parent's next message (see SpecFD): io.EOF when the
// parent closed the socket.
func readSpec(sock *os.File) (*Spec, map[string]int, error) {
	buf := make([]byte, 1)
	oob := make([]byte, unix.CmsgSpace(8*4))
	var n, oobn int
	var err error
	for {
		n, oobn, _, _, err = unix.Recvmsg(int(sock.Fd()), buf, oob, unix.MSG_CMSG_CLOEXEC)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		return nil, nil, err
	}
	if n != 1 {
		return nil, nil, io.EOF
	}
	var fds []int
	if oobn > 0 {
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return nil, nil, err
		}
		for _, m := range msgs {
			got, err := unix.ParseUnixRights(&m)
			if err != nil {
				return nil, nil, err
			}
			fds = append(fds, got...)
		}
	}
	closeAll := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	var size [4]byte
	if _, err := io.ReadFull(sock, size[:]); err != nil {
		closeAll()
		return nil, nil, fmt.Errorf("spec length: %w", err)
	}
	data := make([]byte, binary.BigEndian.Uint32(size[:]))
	if _, err := io.ReadFull(sock, data); err != nil {
		closeAll()
		return nil, nil, fmt.Errorf("spec: %w", err)
	}
	var spec Spec
	if err := json.Unmarshal(data, &spec); err != nil {
		closeAll()
		return nil, nil, err
	}
	if len(fds) != len(spec.Files) {
		closeAll()
		return nil, nil, fmt.Errorf("got %d file descriptors for files %v", len(fds), spec.Files)
	}
	files := make(map[string]int, len(fds))
	for i, name := range spec.Files {
		files[name] = fds[i]
	}
	return &spec, files, nil
}

// killAll kills every process in the helper's PID namespace but the
// helper (as PID 1, kill(-1) spares only itself) and reaps them, so that
// nothing of one action is left when the next one starts.
func killAll() {
	for {
		_ = unix.Kill(-1, unix.SIGKILL)
		_, err := unix.Wait4(-1, nil, unix.WALL, nil)
		if errors.Is(err, unix.ECHILD) {
			return
		}
	}
}

// reapUntil reaps every child (as PID 1, orphans are ours) until pid exits.
func reapUntil(pid int) (unix.WaitStatus, error) {
	for {
		var ws unix.WaitStatus
		got, err := unix.Wait4(-1, &ws, 0, nil)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			return 0, fmt.Errorf("wait: %w", err)
		case got == pid && (ws.Exited() || ws.Signaled()):
			return ws, nil
		}
	}
}

// execFailureCode maps an exec error to the shell's exit codes: 127 for a
// command that is not there, 126 for one that cannot be executed.
func execFailureCode(err error) (int, bool) {
	switch {
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ENOTDIR):
		return 127, true
	case errors.Is(err, unix.EACCES), errors.Is(err, unix.ENOEXEC), errors.Is(err, unix.EPERM),
		errors.Is(err, unix.EISDIR), errors.Is(err, unix.ELOOP), errors.Is(err, unix.ENAMETOOLONG),
		errors.Is(err, unix.E2BIG), errors.Is(err, unix.ETXTBSY), errors.Is(err, unix.ELIBBAD):
		return 126, true
	}
	return 0, false
}

// lookPath resolves a command without a slash against PATH from env (the
// first PATH entry wins, as with getenv); without PATH it uses /bin:/usr/bin,
// like execvp. Names with a slash are used as given, relative to the working
// directory.
func lookPath(file string, env []string) (string, error) {
	if strings.Contains(file, "/") {
		return file, nil
	}
	path, found := "/bin:/usr/bin", false
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok && !found {
			path, found = v, true
		}
	}
	for _, dir := range strings.Split(path, ":") {
		if dir == "" {
			dir = "."
		}
		p := strings.TrimSuffix(dir, "/") + "/" + file // relative entries stay relative
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: command not found in PATH %q", file, path)
}

// loopbackUp brings up lo, the only interface in a new network namespace.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("loopback: get flags: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("loopback: set flags: %w", err)
	}
	return nil
}

// dropPrivileges prepares the current thread so that the command forked
// from it can never regain privileges: no ambient or inheritable
// capabilities, an empty bounding set, no_new_privs, the seccomp filter, and
// every descriptor above 2 closed on exec. The uid/gid switch happens in the
// forked child (syscall.Credential), which loses its remaining capabilities
// with it.
func dropPrivileges() error {
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("clearing ambient capabilities: %w", err)
	}
	for c := 0; ; c++ {
		err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0)
		if errors.Is(err, unix.EINVAL) {
			break // past the last capability
		}
		if err != nil {
			return fmt.Errorf("dropping capability %d from the bounding set: %w", c, err)
		}
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var caps [2]unix.CapUserData
	if err := unix.Capget(&hdr, &caps[0]); err != nil {
		return fmt.Errorf("capget: %w", err)
	}
	caps[0].Inheritable, caps[1].Inheritable = 0, 0
	if err := unix.Capset(&hdr, &caps[0]); err != nil {
		return fmt.Errorf("clearing inheritable capabilities: %w", err)
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	if err := installSeccomp(); err != nil {
		return err
	}
	return closeOnExec()
}

// closeOnExec marks every descriptor above 2 close-on-exec, so the command
// inherits only stdin, stdout and stderr while the helper keeps its status
// pipe.
func closeOnExec() error {
	err := unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.ENOSYS) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("close_range: %w", err)
	}
	// Before Linux 5.11: one by one.
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return fmt.Errorf("listing descriptors: %w", err)
	}
	for _, e := range entries {
		if fd, err := strconv.Atoi(e.Name()); err == nil && fd > 2 {
			unix.CloseOnExec(fd) // fails only for the directory's own, already closed, descriptor
		}
	}
	return nil
}

// join joins absolute path elements with single slashes. It avoids
// path/filepath, which Go initialises only after most of a large binary
// (see the package comment). The parent validated the elements: none
// contains "..".
func join(elem ...string) string {
	var b strings.Builder
	for _, e := range elem {
		for _, part := range strings.Split(e, "/") {
			if part != "" && part != "." {
				b.WriteByte('/')
				b.WriteString(part)
			}
		}
	}
	if b.Len() == 0 {
		return "/"
	}
	return b.String()
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
