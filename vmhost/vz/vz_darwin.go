//go:build darwin

package vz

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"reflect"
	"sync"
	"syscall"
	"unsafe"

	vzfw "github.com/Code-Hex/vz/v3"

	"github.com/actiond/actiond/vmhost"
)

// Config configures a Virtualization.framework machine.
type Config struct {
	vmhost.Config
}

// Machine is a Virtualization.framework VM; it implements vmhost.Machine.
type Machine struct {
	cfg      vmhost.Config
	log      *slog.Logger
	exit     *vmhost.Exit
	cleanups vmhost.Cleanups

	mu   sync.Mutex
	vm   *vzfw.VirtualMachine
	sock *vzfw.VirtioSocketDevice
}

// New returns an unstarted machine.
func New(c Config) (vmhost.Machine, error) {
	cfg := c.Config.WithDefaults()
	if cfg.Arch != "arm64" {
		return nil, fmt.Errorf("vmhost/vz: guest arch %q: Virtualization.framework on Apple silicon runs arm64 guests", cfg.Arch)
	}
	return &Machine{cfg: cfg, log: cfg.Logger, exit: vmhost.NewExit(cfg.Console)}, nil
}

// Start boots the VM (see vmhost.Machine).
func (m *Machine) Start(ctx context.Context) error {
	c := m.cfg
	var (
		vmConfig *vzfw.VirtualMachineConfiguration
		vm       *vzfw.VirtualMachine
	)
	steps := []vmhost.Step{
		{Name: "validate config", Run: func(context.Context) error { return c.Validate() }},
		{Name: "configure", Run: func(context.Context) error {
			cmdline := c.CmdlineFor(vmhost.KernelParams{Console: "hvc0", Transport: vmhost.TransportVsock})
			boot, err := vzfw.NewLinuxBootLoader(c.Kernel, vzfw.WithCommandLine(cmdline), vzfw.WithInitrd(c.Initrd))
			if err != nil {
				return fmt.Errorf("boot loader: %w", err)
			}
			vmConfig, err = vzfw.NewVirtualMachineConfiguration(boot, uint(c.CPUs), uint64(c.MemoryMiB)<<20)
			if err != nil {
				return err
			}
			return m.devices(vmConfig)
		}},
		{Name: "validate vm configuration", Run: func(context.Context) error {
			_, err := vmConfig.Validate()
			return err
		}},
		{Name: "start vm", Run: func(context.Context) error {
			var err error
			vm, err = vzfw.NewVirtualMachine(vmConfig)
			if err != nil {
				return err
			}
			go m.watch(vm)
			if err := vm.Start(); err != nil {
				return err
			}
			socks := vm.SocketDevices()
			if len(socks) == 0 {
				return errors.New("the vm has no virtio-socket device")
			}
			m.mu.Lock()
			m.vm, m.sock = vm, socks[0]
			m.mu.Unlock()
			return nil
		}},
	}
	if err := vmhost.RunSteps(ctx, m.log, steps); err != nil {
		m.exit.Stopping()
		if vm != nil && vm.CanStop() {
			vm.Stop()
		}
		return errors.Join(fmt.Errorf("start vz vm: %w", err), m.cleanups.Run())
	}
	m.log.Info("vm started", "hypervisor", "Virtualization.framework", "cpus", c.CPUs, "memory_mib", c.MemoryMiB)
	return nil
}

// devices attaches the console, entropy, disks and the socket device.
func (m *Machine) devices(vc *vzfw.VirtualMachineConfiguration) error {
	c := m.cfg
	// Console: the guest writes to outW, the shared console reads outR; the
	// guest reads from inR, whose write end stays open and silent.
	outR, outW, err := os.Pipe()
	if err != nil {
		return err
	}
	inR, inW, err := os.Pipe()
	if err != nil {
		return err
	}
	m.cleanups.Add("close console pipes", func() error {
		return errors.Join(outW.Close(), inW.Close(), inR.Close())
	})
	go c.Console.Copy(outR)
	att, err := vzfw.NewFileHandleSerialPortAttachment(inR, outW)
	if err != nil {
		return fmt.Errorf("console: %w", err)
	}
	serial, err := vzfw.NewVirtioConsoleDeviceSerialPortConfiguration(att)
	if err != nil {
		return fmt.Errorf("console: %w", err)
	}
	vc.SetSerialPortsVirtualMachineConfiguration([]*vzfw.VirtioConsoleDeviceSerialPortConfiguration{serial})

	entropy, err := vzfw.NewVirtioEntropyDeviceConfiguration()
	if err != nil {
		return fmt.Errorf("entropy: %w", err)
	}
	vc.SetEntropyDevicesVirtualMachineConfiguration([]*vzfw.VirtioEntropyDeviceConfiguration{entropy})

	var disks []vzfw.StorageDeviceConfiguration
	for _, d := range []struct {
		path, id string
		ro       bool
	}{{c.CASImage, vmhost.CASDiskID, false}, {c.RuntimesImage, vmhost.RuntimesDiskID, true}} {
		if d.path == "" {
			continue
		}
		a, err := vzfw.NewDiskImageStorageDeviceAttachment(d.path, d.ro)
		if err != nil {
			return fmt.Errorf("disk %s: %w", d.path, err)
		}
		blk, err := vzfw.NewVirtioBlockDeviceConfiguration(a)
		if err != nil {
			return fmt.Errorf("disk %s: %w", d.path, err)
		}
		if err := blk.SetBlockDeviceIdentifier(d.id); err != nil {
			return fmt.Errorf("disk %s: identifier: %w", d.path, err)
		}
		disks = append(disks, blk)
	}
	vc.SetStorageDevicesVirtualMachineConfiguration(disks)

	sock, err := vzfw.NewVirtioSocketDeviceConfiguration()
	if err != nil {
		return fmt.Errorf("socket device: %w", err)
	}
	vc.SetSocketDevicesVirtualMachineConfiguration([]vzfw.SocketDeviceConfiguration{sock})
	return nil
}

// watch turns state changes into the machine's end.
func (m *Machine) watch(vm *vzfw.VirtualMachine) {
	for st := range vm.StateChangedNotify() {
		m.log.Debug("vm state", "state", st.String())
		switch st {
		case vzfw.VirtualMachineStateStopped:
			m.finish(nil)
			return
		case vzfw.VirtualMachineStateError:
			m.finish(errors.New("Virtualization.framework reports a vm error"))
			return
		}
	}
}

func (m *Machine) finish(err error) {
	if cerr := m.cleanups.Run(); cerr != nil {
		m.log.Warn("vm cleanup", "err", cerr)
	}
	m.exit.Exited(err)
}

// DialGuest connects to the guest's vsock port (see vmhost.Machine).
func (m *Machine) DialGuest(ctx context.Context) (net.Conn, error) {
	m.mu.Lock()
	sock := m.sock
	m.mu.Unlock()
	if sock == nil {
		return nil, vmhost.ErrNotStarted
	}
	if m.exit.Ended() {
		return nil, vmhost.ErrStopped
	}
	type result struct {
		c   *vzfw.VirtioSocketConnection
		err error
	}
	ch := make(chan result, 1)
	// Connect may never call back when nothing listens: bound it by ctx.
	go func() {
		c, err := sock.Connect(vmhost.DefaultVsockPort)
		ch <- result{c, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, fmt.Errorf("vsock connect to guest port %d: %w", vmhost.DefaultVsockPort, r.err)
		}
		return halfCloser(r.c), nil
	case <-ctx.Done():
		go func() {
			if r := <-ch; r.c != nil {
				r.c.Close()
			}
		}()
		return nil, ctx.Err()
	}
}

// halfCloser returns the Unix socket under a VirtioSocketConnection, which
// can CloseWrite (the wrapper cannot), when its layout is the one this
// code was written against (vz v3.7.1: first field rawConn net.Conn);
// otherwise the connection itself.
func halfCloser(c *vzfw.VirtioSocketConnection) net.Conn {
	v := reflect.ValueOf(c).Elem()
	if v.NumField() == 0 || v.Type().Field(0).Name != "rawConn" || v.Type().Field(0).Type != reflect.TypeFor[net.Conn]() {
		return c
	}
	f := v.Field(0)
	raw := reflect.NewAt(f.Type(), unsafe.Pointer(f.UnsafeAddr())).Elem().Interface().(net.Conn)
	if _, ok := raw.(interface{ CloseWrite() error }); !ok {
		return c
	}
	return raw
}

// Wait waits for the VM to end (see vmhost.Machine).
func (m *Machine) Wait() error { return m.exit.Wait() }

// Stop asks the guest to power off (the guest control service, else the
// framework's stop request, a power button), then force-stops the VM when
// ctx ends.
func (m *Machine) Stop(ctx context.Context) error {
	m.mu.Lock()
	vm := m.vm
	m.mu.Unlock()
	if vm == nil {
		return vmhost.ErrNotStarted
	}
	ask := func() error {
		err := vmhost.RequestPowerOff(ctx, m.DialGuest)
		if err == nil {
			return nil
		}
		m.log.Debug("power-off request failed; requesting a stop", "err", err)
		if ok, rerr := vm.RequestStop(); rerr != nil || !ok {
			return errors.Join(err, rerr, errors.New("the framework refused the stop request"))
		}
		return nil
	}
	kill := func() error {
		m.log.Warn("the guest did not power off in time; stopping the vm")
		if !vm.CanStop() {
			return errors.New("the vm cannot be stopped in its state")
		}
		return vm.Stop()
	}
	return vmhost.GracefulStop(ctx, m.exit, ask, kill)
}

// ReexecEntitled makes sure this process may start a VM: when the binary
// lacks com.apple.security.virtualization (a plain `go build` or `go run`
// output), it re-executes an ad-hoc signed copy (see Entitle) with the
// same arguments; it returns only when no re-exec was needed, or with an
// error.
func ReexecEntitled(ctx context.Context, cacheDir string, log *slog.Logger) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	signed, err := Entitle(ctx, EntitleOptions{Exe: exe, CacheDir: cacheDir, Env: os.Getenv, Run: ExecRunner, Log: log})
	if err != nil || signed == "" {
		return err
	}
	log.Info("re-executing the signed copy", "path", signed)
	env := append(os.Environ(), EntitledEnv+"=1")
	return fmt.Errorf("exec %s: %w", signed, syscall.Exec(signed, os.Args, env))
}
