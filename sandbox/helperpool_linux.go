// The helper pool: sandbox helpers (PID 1 of the namespaces their actions
// run in) are started here, a few ahead of their first action, and are
// kept between actions, so that an action pays neither for clone, exec and
// the Go runtime's start-up nor for their CPU.

package sandbox

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"runtime"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/actiond/actiond/sandbox/internal/sandboxinit"
)

// helper is a started sandbox helper: PID 1 of its own namespaces, past
// exec and the Go runtime's start, waiting for an action.
type helper struct {
	cg       *runCgroup // cloned into it; see runCgroup
	log      *slog.Logger
	cmd      *exec.Cmd
	spec     *os.File                 // our end of the spec socket
	statuses chan *sandboxinit.Status // one per action; closed when the helper's status pipe ends
	done     chan error               // the helper's Wait result
	// reusable: the helper gets its execroot and runtime as descriptors
	// (open_tree), so it can run actions whose mounts it was cloned before.
	reusable bool
}

// startHelper starts a helper, at a low priority when it is started ahead
// of its action. Where open_tree(2) works, helpers drop their copies of
// actiondfs mounts (see sandboxinit.PrestartEnv), get the execroot as a
// descriptor and may run any number of actions; elsewhere a helper runs
// one action and sees its execroot by path.
func (s *Sandbox) startHelper(prestarted bool) (*helper, error) {
	cg, err := s.cgroups.newRun(helperCgroupName(os.Getpid(), helperSeq.Add(1)))
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
	if s.openTree {
		env = append(env, sandboxinit.PrestartEnv+"=1")
	}
	h := &helper{
		cg:  cg,
		log: s.log,
		cmd: &exec.Cmd{
			Path: "/proc/self/exe",
			Args: []string{sandboxinit.Argv0},
			Env:  env,
			// The command's stdout and stderr come with each spec.
			Stdin: devNull, Stdout: devNull, Stderr: devNull,
			ExtraFiles: []*os.File{specTheirs, statusW}, // sandboxinit.SpecFD and StatusFD
			SysProcAttr: &syscall.SysProcAttr{
				// Each action gets mount, network, IPC, UTS and cgroup
				// namespaces of its own from the helper; the PID
				// namespace is the helper's, which its actions share
				// one after another.
				Cloneflags: unix.CLONE_NEWNS | unix.CLONE_NEWPID | unix.CLONE_NEWNET |
					unix.CLONE_NEWIPC | unix.CLONE_NEWUTS,
				// The helper dies with us. Pdeathsig follows the thread
				// that forked, so that thread is kept until Wait returns.
				Pdeathsig: syscall.SIGKILL,
			},
		},
		spec:     specOurs,
		statuses: make(chan *sandboxinit.Status, 1),
		done:     make(chan error, 1),
		reusable: s.openTree,
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
	if err := cg.join(h.cmd.Process.Pid); err != nil {
		_ = h.cmd.Process.Kill()
		<-h.done
		specOurs.Close()
		statusR.Close()
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	go h.readStatuses(statusR)
	if prestarted {
		// Starting up in the background must not slow the actions
		// running now; takeHelper gives it the normal priority back.
		_ = unix.Setpriority(unix.PRIO_PROCESS, h.cmd.Process.Pid, prestartNice)
	}
	return h, nil
}

// helperSeq numbers helpers (and so their cgroups) across every Sandbox
// of the process.
var helperSeq atomic.Uint64

// prestartNice is the nice value of prestarted helpers until they are used.
const prestartNice = 10

// readStatuses passes on the helper's statuses until its pipe ends.
func (h *helper) readStatuses(r *os.File) {
	defer close(h.statuses)
	defer r.Close()
	dec := json.NewDecoder(r)
	for {
		var st sandboxinit.Status
		if err := dec.Decode(&st); err != nil {
			return
		}
		h.statuses <- &st
	}
}

// send gives the helper an action's spec and descriptors (see
// sandboxinit.SpecFD).
func (h *helper) send(spec *sandboxinit.Spec, fds []int) error {
	data, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	if err := unix.Sendmsg(int(h.spec.Fd()), []byte{'S'}, unix.UnixRights(fds...), nil, 0); err != nil {
		return err
	}
	msg := binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(data)), uint32(len(data)))
	_, err = h.spec.Write(append(msg, data...))
	return err
}

// kill ends the helper, with whatever it runs, waits for it and removes
// its cgroups.
func (h *helper) kill() {
	_ = h.cmd.Process.Kill()
	<-h.done
	h.spec.Close()
	h.removeCgroups()
}

// retire lets an idle helper end: it exits when its spec socket closes.
// Close waits for that.
func (s *Sandbox) retire(h *helper) {
	h.spec.Close()
	s.retiring.Add(1)
	go func() {
		defer s.retiring.Done()
		<-h.done
		h.removeCgroups()
	}()
}

func (h *helper) removeCgroups() {
	if err := h.cg.remove(); err != nil {
		h.log.Warn("sandbox: removing a helper's cgroups", "cgroup", h.cg.name, "err", err)
	}
}

// takeHelper returns an idle helper, or nil when none is ready, and has a
// spare started when it took the last one. A helper that died while it
// waited (killed by someone, or by the OOM killer) is dropped.
func (s *Sandbox) takeHelper() *helper {
	for {
		select {
		case h := <-s.spares:
			if h.gone() {
				s.log.Warn("sandbox: an idle helper died; dropping it", "pid", h.cmd.Process.Pid)
				h.kill()
				continue
			}
			_ = unix.Setpriority(unix.PRIO_PROCESS, h.cmd.Process.Pid, 0)
			if len(s.spares) == 0 {
				go s.addSpare()
			}
			return h
		default:
			return nil
		}
	}
}

// gone reports whether the helper has exited: Wait has reported it, or
// its end of the spec socket is closed (once its last thread has exited,
// which may be before Wait reports it).
func (h *helper) gone() bool {
	select {
	case err := <-h.done:
		h.done <- err
		return true
	default:
	}
	fds := []unix.PollFd{{Fd: int32(h.spec.Fd()), Events: unix.POLLOUT}}
	n, err := unix.Poll(fds, 0)
	return err == nil && n > 0 && fds[0].Revents&(unix.POLLHUP|unix.POLLERR) != 0
}

// maxIdleHelpers bounds the idle helpers kept (each a few MiB).
const maxIdleHelpers = 64

// putHelper keeps a helper that ran an action cleanly for the next one.
// Enough are kept for as many actions as have run at once, plus the
// prestarted ones: fewer, and the pool would run dry at every busy moment
// and start helpers only to retire others later.
func (s *Sandbox) putHelper(h *helper) {
	s.spareMu.Lock()
	defer s.spareMu.Unlock()
	if !h.reusable || s.closed || len(s.spares) >= s.prestart+int(s.peak.Load()) {
		s.retire(h)
		return
	}
	select {
	case s.spares <- h:
	default:
		s.retire(h)
	}
}

// addSpare starts a helper for the pool, unless it already has the
// configured number of prestarted helpers or is closed.
func (s *Sandbox) addSpare() {
	s.spareMu.Lock()
	defer s.spareMu.Unlock()
	if s.closed || len(s.spares) >= s.prestart {
		return
	}
	h, err := s.startHelper(true)
	if err != nil {
		s.log.Warn("sandbox: cannot prestart helpers; starting one per action", "err", err)
		return
	}
	s.spares <- h
}
