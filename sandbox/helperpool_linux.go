// The helper pool: sandbox helpers (PID 1 of each action's namespaces) are
// started here, and a few are prestarted so that an action does not wait for
// clone, exec and the Go runtime's start-up.

package sandbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/actiond/actiond/sandbox/internal/sandboxinit"
)

// helper is a started sandbox helper waiting for its spec: PID 1 of its
// own namespaces, past exec and the Go runtime's start.
type helper struct {
	cg     *runCgroup // the run's cgroups; the helper was cloned into its v2 one
	cmd    *exec.Cmd
	spec   *os.File   // our end of the spec socket
	status *os.File   // read end of the status pipe
	done   chan error // the helper's Wait result
}

// startHelper starts a helper. A prestarted one prepares its namespaces
// while it waits (see sandboxinit.PrestartEnv) and must get the execroot
// as a descriptor.
func (s *Sandbox) startHelper(prestarted bool) (*helper, error) {
	cg, err := s.cgroups.newRun("actiond-" + strconv.Itoa(os.Getpid()) + "-" + strconv.FormatUint(s.seq.Add(1), 10))
	if err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	h, err := s.startHelperIn(cg, prestarted)
	if err != nil {
		cg.remove()
		return nil, err
	}
	return h, nil
}

func (s *Sandbox) startHelperIn(cg *runCgroup, prestarted bool) (*helper, error) {
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	specOurs, specTheirs := os.NewFile(uintptr(pair[0]), "spec"), os.NewFile(uintptr(pair[1]), "spec")
	defer specTheirs.Close()
	statusR, statusW, err := os.Pipe()
	if err != nil {
		specOurs.Close()
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	defer statusW.Close()
	devNull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		specOurs.Close()
		statusR.Close()
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	defer devNull.Close()
	env := []string{"GOMAXPROCS=1"}
	if prestarted {
		env = append(env, sandboxinit.PrestartEnv+"=1")
	}
	h := &helper{
		cg: cg,
		cmd: &exec.Cmd{
			Path: "/proc/self/exe",
			Args: []string{sandboxinit.Argv0},
			Env:  env,
			// The command's stdout and stderr come with the spec.
			Stdin: devNull, Stdout: devNull, Stderr: devNull,
			ExtraFiles: []*os.File{specTheirs, statusW}, // sandboxinit.SpecFD and StatusFD
			SysProcAttr: &syscall.SysProcAttr{
				Cloneflags: unix.CLONE_NEWNS | unix.CLONE_NEWPID | unix.CLONE_NEWNET |
					unix.CLONE_NEWIPC | unix.CLONE_NEWUTS | unix.CLONE_NEWCGROUP,
				// The helper dies with us. Pdeathsig follows the thread
				// that forked, so that thread is kept until Wait returns.
				Pdeathsig: syscall.SIGKILL,
			},
		},
		spec:   specOurs,
		status: statusR,
		done:   make(chan error, 1),
	}
	if cg.v2fd >= 0 {
		h.cmd.SysProcAttr.UseCgroupFD = true
		h.cmd.SysProcAttr.CgroupFD = cg.v2fd
	}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := h.cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		h.done <- h.cmd.Wait()
	}()
	if err := <-started; err != nil {
		specOurs.Close()
		statusR.Close()
		return nil, fmt.Errorf("sandbox: start helper: %w", err)
	}
	if prestarted {
		// Starting up in the background must not slow the actions
		// running now; takeHelper gives it the normal priority back.
		_ = unix.Setpriority(unix.PRIO_PROCESS, h.cmd.Process.Pid, prestartNice)
	}
	return h, nil
}

// prestartNice is the nice value of prestarted helpers until they are used.
const prestartNice = 10

// send gives the helper its spec and descriptors (see sandboxinit.SpecFD).
func (h *helper) send(spec *sandboxinit.Spec, fds []int) error {
	defer h.spec.Close()
	if err := unix.Sendmsg(int(h.spec.Fd()), []byte{'S'}, unix.UnixRights(fds...), nil, 0); err != nil {
		return err
	}
	return json.NewEncoder(h.spec).Encode(spec)
}

// close releases our ends of the helper's pipes; the helper must be done.
func (h *helper) close() {
	h.spec.Close()
	h.status.Close()
}

// kill ends an unused helper, waits for it and removes its cgroups.
func (h *helper) kill() {
	_ = h.cmd.Process.Kill()
	<-h.done
	h.close()
	h.cg.remove()
}

// takeHelper returns a prestarted helper, or nil when none is ready, and
// has another started in its place.
func (s *Sandbox) takeHelper() *helper {
	select {
	case h := <-s.spares:
		_ = unix.Setpriority(unix.PRIO_PROCESS, h.cmd.Process.Pid, 0)
		go s.addSpare()
		return h
	default:
		return nil
	}
}

// addSpare starts a helper for the pool, unless the pool is full or closed.
func (s *Sandbox) addSpare() {
	s.spareMu.Lock()
	defer s.spareMu.Unlock()
	if s.closed || len(s.spares) == cap(s.spares) {
		return
	}
	h, err := s.startHelper(true)
	if err != nil {
		s.log.Warn("sandbox: cannot prestart helpers; starting one per action", "err", err)
		return
	}
	s.spares <- h
}

// readStatus reads the helper's final status; the helper has exited, so this
// never blocks for long.
func readStatus(r *os.File) (*sandboxinit.Status, error) {
	_ = r.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(r)
	if err != nil {
		return nil, err
	}
	if len(b) == 0 {
		return nil, errors.New("no status")
	}
	var st sandboxinit.Status
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("decoding status: %w", err)
	}
	return &st, nil
}
