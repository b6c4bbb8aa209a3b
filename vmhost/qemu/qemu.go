// Package qemu is the Linux backend of vmhost: it runs the guest under QEMU,
// -M microvm for amd64 guests (the uncompressed vmlinux boots through its
// PVH entry point) and -M virt -cpu cortex-a72 for arm64 guests, with KVM
// when a probe boot shows that it works (else TCG), two virtio-blk disks
// (CAS read-write, runtimes read-only), and the host transport: vhost-vsock
// when /dev/vhost-vsock is usable, else the virtio-serial port "actiond"
// carrying streammux.
//
// QEMU starts paused with a QMP socket: Start connects to QMP, then lets
// the VM run, so every event is seen. QMP carries VSERPORT_CHANGE (when the
// guest opens its serial port, see serialLink), SHUTDOWN (why the VM
// ended) and, for Stop, system_powerdown (the microvm's ACPI GED or the
// virt board's GPIO power key) and quit. The console is the first UART on
// QEMU's stdout, copied into a vmhost.Console; QEMU's stderr goes there
// too, prefixed "qemu: ". QEMU runs in its own process group (a terminal's
// Ctrl-C reaches serve-vm, which shuts the guest down cleanly) and dies
// with the host process (PR_SET_PDEATHSIG).
package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/actiond/actiond/internal/tsc"
	"github.com/actiond/actiond/vmhost"
)

// Transport choices of Config.Transport.
const TransportAuto = "auto"

// Config configures a QEMU machine.
type Config struct {
	vmhost.Config
	// QEMU is the emulator (default Binary(Arch), found on PATH).
	QEMU string
	// Accel is AccelAuto (default: KVM if the probe passes, else TCG),
	// AccelKVM or AccelTCG.
	Accel string
	// Transport is TransportAuto (default: vsock when /dev/vhost-vsock is
	// usable), vmhost.TransportVsock or vmhost.TransportSerial.
	Transport string
	// CPUModel overrides -cpu (default CPUModel(Arch, accel)).
	CPUModel string
	// ProbeCache caches the KVM probe verdict ("" probes on every start).
	ProbeCache string
	// ProbeTimeout bounds the KVM probe (default DefaultProbeTimeout).
	ProbeTimeout time.Duration
	// StateDir holds the sockets (default: a new directory under the temp
	// dir, removed on stop; socket paths must stay short).
	StateDir string
	// ExtraArgs are appended to QEMU's arguments.
	ExtraArgs []string
}

// Machine is a QEMU VM; it implements vmhost.Machine.
type Machine struct {
	cfg     Config
	log     *slog.Logger
	console *vmhost.Console
	exit    *vmhost.Exit

	mu       sync.Mutex
	started  bool
	plan     Plan
	cmd      *exec.Cmd
	qmp      *qmp
	serial   *serialLink
	cleanups vmhost.Cleanups
	shutdown string // the last SHUTDOWN event's reason
	probe    *ProbeResult
}

var _ vmhost.Machine = (*Machine)(nil)

// New returns an unstarted machine.
func New(c Config) *Machine {
	c.Config = c.Config.WithDefaults()
	if c.QEMU == "" {
		c.QEMU = Binary(c.Arch)
	}
	if c.Accel == "" {
		c.Accel = AccelAuto
	}
	if c.Transport == "" {
		c.Transport = TransportAuto
	}
	return &Machine{cfg: c, log: c.Logger, console: c.Console, exit: vmhost.NewExit(c.Console)}
}

// Plan returns the decisions Start made (accelerator, transport, command line).
func (m *Machine) Plan() Plan {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.plan
}

// Probe returns the KVM probe verdict Start used, if it probed.
func (m *Machine) Probe() *ProbeResult {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.probe
}

// Console returns the console collector.
func (m *Machine) Console() *vmhost.Console { return m.console }

// Start boots the VM (see vmhost.Machine).
func (m *Machine) Start(ctx context.Context) error {
	m.mu.Lock()
	if m.started {
		m.mu.Unlock()
		return errors.New("qemu: machine already started")
	}
	m.started = true
	m.mu.Unlock()
	c := &m.cfg
	var p Plan
	steps := []vmhost.Step{
		{Name: "validate config", Run: func(context.Context) error {
			if err := c.Validate(); err != nil {
				return err
			}
			qemu, err := exec.LookPath(c.QEMU)
			if err != nil {
				return fmt.Errorf("%w (Debian: apt-get install qemu-system-x86 qemu-system-arm)", err)
			}
			c.QEMU = qemu
			return nil
		}},
		{Name: "choose accelerator", Run: func(ctx context.Context) error {
			accel, err := m.chooseAccel(ctx)
			p.Accel = accel
			return err
		}},
		{Name: "choose transport", Run: func(context.Context) error {
			t, err := m.chooseTransport()
			p.Transport = t
			if err == nil && t == vmhost.TransportVsock {
				p.CID, err = pickCID()
			}
			return err
		}},
		{Name: "state directory", Run: func(context.Context) error {
			dir := c.StateDir
			if dir == "" {
				d, err := os.MkdirTemp("", "actiond-vm-")
				if err != nil {
					return err
				}
				dir = d
				m.cleanups.Add("remove state directory", func() error { return os.RemoveAll(d) })
			} else if err := os.MkdirAll(dir, 0o700); err != nil {
				return err
			}
			p.QMPSocket = filepath.Join(dir, "qmp.sock")
			os.Remove(p.QMPSocket)
			if p.Transport == vmhost.TransportSerial {
				p.SerialSocket = filepath.Join(dir, "serial.sock")
				os.Remove(p.SerialSocket)
			}
			return nil
		}},
		{Name: "kernel command line", Run: func(context.Context) error {
			if p.Accel == AccelTCG && c.Arch == "amd64" {
				p.TSCkHz = tsc.HostKHz()
			}
			p.Cmdline = Cmdline(*c, p)
			return nil
		}},
		{Name: "start qemu", Run: func(context.Context) error { return m.startProcess(p) }},
		{Name: "connect qmp", Run: func(ctx context.Context) error {
			if p.Transport == vmhost.TransportSerial {
				m.serial = newSerialLink(p.SerialSocket, m.log)
				m.cleanups.Add("close serial link", m.serial.Close)
			}
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			q, err := dialQMP(cctx, p.QMPSocket, m.onEvent)
			if err != nil {
				return err
			}
			m.mu.Lock()
			m.qmp = q
			m.mu.Unlock()
			m.cleanups.Add("close qmp", q.Close)
			return nil
		}},
		{Name: "resume vm", Run: func(ctx context.Context) error {
			_, err := m.qmp.execute(ctx, "cont", nil)
			return err
		}},
	}
	m.mu.Lock()
	m.plan = p
	m.mu.Unlock()
	err := vmhost.RunSteps(ctx, m.log, steps)
	m.mu.Lock()
	m.plan = p
	m.mu.Unlock()
	if err != nil {
		m.exit.Stopping()
		cerr := m.cleanups.Run()
		if m.cmd != nil {
			<-m.exit.Done()
		}
		err = fmt.Errorf("start qemu vm: %w", err)
		if tail := m.console.Tail(vmhost.ConsoleTailLines); tail != "" {
			err = fmt.Errorf("%w; console tail:\n%s", err, tail)
		}
		return errors.Join(err, cerr)
	}
	m.log.Info("vm started", "qemu", filepath.Base(c.QEMU), "accel", p.Accel, "transport", p.Transport,
		"cpus", c.CPUs, "memory_mib", c.MemoryMiB, "arch", c.Arch)
	m.log.Debug("vm command line", "args", strings.Join(m.cmd.Args, " "))
	return nil
}

func (m *Machine) chooseAccel(ctx context.Context) (string, error) {
	c := &m.cfg
	switch c.Accel {
	case AccelKVM, AccelTCG:
		return c.Accel, nil
	case AccelAuto:
	default:
		return "", fmt.Errorf("accelerator %q: want auto, kvm or tcg", c.Accel)
	}
	r := Probe{QEMU: c.QEMU, Arch: c.Arch, Kernel: c.Kernel, Timeout: c.ProbeTimeout, CacheFile: c.ProbeCache, Logger: m.log}.Run(ctx)
	if err := ctx.Err(); err != nil {
		return "", err
	}
	m.mu.Lock()
	m.probe = &r
	m.mu.Unlock()
	if r.KVM {
		m.log.Info("using KVM", "probe", r.Reason, "cached", r.Cached, "took", r.Took.Round(time.Millisecond))
		return AccelKVM, nil
	}
	m.log.Info("using TCG (software emulation): KVM does not work here", "reason", r.Reason, "cached", r.Cached)
	return AccelTCG, nil
}

func (m *Machine) chooseTransport() (string, error) {
	switch m.cfg.Transport {
	case vmhost.TransportSerial:
		return vmhost.TransportSerial, nil
	case vmhost.TransportVsock:
		if err := deviceUsable("/dev/vhost-vsock"); err != nil {
			return "", err
		}
		return vmhost.TransportVsock, nil
	case TransportAuto:
		if err := deviceUsable("/dev/vhost-vsock"); err != nil {
			m.log.Debug("vsock unavailable; using virtio-serial", "reason", err)
			return vmhost.TransportSerial, nil
		}
		return vmhost.TransportVsock, nil
	}
	return "", fmt.Errorf("transport %q: want auto, vsock or serial", m.cfg.Transport)
}

func (m *Machine) startProcess(p Plan) error {
	cmd := exec.Command(m.cfg.QEMU, Args(m.cfg, p)...)
	cmd.SysProcAttr = sysProcAttr()
	cmd.Stdin = nil
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", m.cfg.QEMU, err)
	}
	m.mu.Lock()
	m.cmd = cmd
	m.mu.Unlock()
	var copies sync.WaitGroup
	copies.Add(2)
	go func() {
		defer copies.Done()
		m.console.Copy(stdout)
	}()
	go func() {
		defer copies.Done()
		m.copyStderr(stderr)
	}()
	go func() {
		copies.Wait() // the pipes are read to EOF before Wait closes them
		err := cmd.Wait()
		m.mu.Lock()
		reason := m.shutdown
		m.mu.Unlock()
		if err == nil && reason != "" && reason != "guest-shutdown" {
			err = fmt.Errorf("qemu exited after %s", reason)
		}
		// Release sockets and the state directory once QEMU is gone.
		if cerr := m.cleanups.Run(); cerr != nil {
			m.log.Warn("vm cleanup", "err", cerr)
		}
		m.exit.Exited(err)
	}()
	m.cleanups.Add("kill qemu", func() error {
		if m.exit.Ended() {
			return nil
		}
		if err := cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
			return err
		}
		return nil
	})
	return nil
}

func (m *Machine) copyStderr(r io.Reader) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Text()
		m.console.Write([]byte("qemu: " + line + "\n"))
		m.log.Warn("qemu: " + line)
	}
	io.Copy(io.Discard, r)
}

func (m *Machine) onEvent(e qmpEvent) {
	switch e.Event {
	case "VSERPORT_CHANGE":
		var d struct {
			ID   string `json:"id"`
			Open bool   `json:"open"`
		}
		if json.Unmarshal(e.Data, &d) == nil && d.ID == serialDeviceID && m.serial != nil {
			m.serial.portChanged(d.Open)
		}
	case "SHUTDOWN":
		var d struct {
			Guest  bool   `json:"guest"`
			Reason string `json:"reason"`
		}
		json.Unmarshal(e.Data, &d)
		m.mu.Lock()
		m.shutdown = d.Reason
		m.mu.Unlock()
		m.log.Debug("vm shutdown event", "guest", d.Guest, "reason", d.Reason)
	case "GUEST_PANICKED", "RESET":
		m.log.Debug("vm event", "event", e.Event, "data", string(e.Data))
	}
}

// DialGuest opens a stream to the guest's server (see vmhost.Machine).
func (m *Machine) DialGuest(ctx context.Context) (net.Conn, error) {
	m.mu.Lock()
	started, p, serial := m.qmp != nil, m.plan, m.serial
	m.mu.Unlock()
	if !started {
		return nil, vmhost.ErrNotStarted
	}
	if m.exit.Ended() {
		return nil, vmhost.ErrStopped
	}
	if p.Transport == vmhost.TransportVsock {
		return dialVsock(ctx, p.CID, vmhost.DefaultVsockPort)
	}
	return serial.Dial(ctx, m.exit.Done())
}

// Wait waits for the VM to end (see vmhost.Machine).
func (m *Machine) Wait() error { return m.exit.Wait() }

// Done is closed when the VM has ended.
func (m *Machine) Done() <-chan struct{} { return m.exit.Done() }

// Stop asks the guest to power off: the guest control service's PowerOff
// call through a guest stream (works on every transport), else QMP
// system_powerdown (a power button press); after ctx ends it kills QEMU.
func (m *Machine) Stop(ctx context.Context) error {
	m.mu.Lock()
	q, cmd := m.qmp, m.cmd
	m.mu.Unlock()
	if cmd == nil {
		return vmhost.ErrNotStarted
	}
	ask := func() error {
		err := vmhost.RequestPowerOff(ctx, m.DialGuest)
		if err == nil {
			m.log.Debug("guest accepted the power-off request")
			return nil
		}
		m.log.Debug("power-off request failed; pressing the power button", "err", err)
		if q == nil {
			return err
		}
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if _, qerr := q.execute(pctx, "system_powerdown", nil); qerr != nil {
			return errors.Join(err, qerr)
		}
		return nil
	}
	kill := func() error {
		m.log.Warn("the guest did not power off in time; killing qemu")
		if q != nil {
			qctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_, err := q.execute(qctx, "quit", nil)
			cancel()
			if err == nil {
				select {
				case <-m.exit.Done():
					return nil
				case <-time.After(2 * time.Second):
				}
			}
		}
		if err := cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
			return err
		}
		return nil
	}
	return vmhost.GracefulStop(ctx, m.exit, ask, kill)
}
