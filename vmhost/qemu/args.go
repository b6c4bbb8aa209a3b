package qemu

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/actiond/actiond/vmhost"
)

// Plan holds the decisions Start makes before building QEMU's command
// line: what was probed or allocated on this host.
type Plan struct {
	// Accel is AccelKVM or AccelTCG.
	Accel string
	// Transport is vmhost.TransportVsock or vmhost.TransportSerial.
	Transport string
	// CID is the guest's vsock context ID (vsock only).
	CID uint32
	// QMPSocket is QEMU's control socket; SerialSocket the chardev socket
	// of the "actiond" virtio-serial port (serial only).
	QMPSocket, SerialSocket string
	// TSCkHz, when non-zero on an x86 guest under TCG, is passed as
	// tsc_early_khz (see tsc.HostKHz).
	TSCkHz uint64
	// Cmdline is the kernel command line.
	Cmdline string
}

// Accelerators.
const (
	AccelAuto = "auto"
	AccelKVM  = "kvm"
	AccelTCG  = "tcg"
)

// Binary returns the QEMU system emulator for a guest arch (GOARCH name).
func Binary(arch string) string {
	if arch == "arm64" {
		return "qemu-system-aarch64"
	}
	return "qemu-system-x86_64"
}

// ConsoleDevice is the kernel console of the machine type QEMU emulates
// for arch: the microvm's 16550 UART or the virt board's PL011.
func ConsoleDevice(arch string) string {
	if arch == "arm64" {
		return "ttyAMA0"
	}
	return "ttyS0"
}

// CPUModel returns the -cpu value: "host" under KVM; under TCG "max" for
// x86 (every feature QEMU emulates, so that actions built for newer CPUs
// run) and cortex-a72 for arm64 (plain "max" costs ~4x in pointer
// authentication emulation).
func CPUModel(arch, accel string) string {
	switch {
	case accel == AccelKVM:
		return "host"
	case arch == "arm64":
		return "cortex-a72"
	default:
		return "max"
	}
}

// device picks the virtio transport of the machine type: virtio-mmio
// ("-device") on microvm, PCI ("-pci") on virt, which is what
// Virtualization.framework uses too, so one arm64 guest serves both.
func device(arch, kind string) string {
	if arch == "arm64" {
		return kind + "-pci"
	}
	return kind + "-device"
}

// machineArgs are the arguments common to real boots and the KVM probe.
func machineArgs(arch, accel, cpu string) []string {
	var m string
	if arch == "arm64" {
		m = "virt"
	} else {
		// microvm: no PCI, no firmware tables beyond what it needs; the
		// kernel boots through its PVH entry point. Its ACPI GED carries
		// system_powerdown to the guest as a power button press.
		m = "microvm"
	}
	if cpu == "" {
		cpu = CPUModel(arch, accel)
	}
	acc := accel
	if accel == AccelTCG {
		acc += ",thread=multi"
	}
	return []string{
		"-name", "actiond-guest",
		"-M", m,
		"-accel", acc,
		"-cpu", cpu,
		"-nodefaults", "-no-user-config",
		"-display", "none",
		"-nic", "none",
		// A guest reboot (panic=-1, or a failed boot) ends QEMU, so the
		// host sees it.
		"-no-reboot",
		// The console: the first UART, on QEMU's stdout.
		"-chardev", "stdio,id=con,signal=off",
		"-serial", "chardev:con",
	}
}

// Args builds QEMU's arguments (without the binary) for c and the
// decisions in p.
func Args(c Config, p Plan) []string {
	a := machineArgs(c.Arch, p.Accel, c.CPUModel)
	a = append(a,
		"-smp", strconv.Itoa(c.CPUs),
		"-m", strconv.Itoa(c.MemoryMiB)+"M",
		"-kernel", c.Kernel,
		"-initrd", c.Initrd,
		"-append", p.Cmdline,
		// Start paused: Start connects to QMP first, so no event is missed.
		"-S",
		"-qmp", "unix:"+p.QMPSocket+",server=on,wait=off",
		"-object", "rng-random,id=rng0,filename=/dev/urandom",
		"-device", device(c.Arch, "virtio-rng")+",rng=rng0",
		// The CAS disk, read-write; discard lets the guest give freed
		// blocks back to the sparse image.
		"-drive", "file="+escapeOpt(c.CASImage)+",if=none,id=cas,format=raw,discard=unmap",
		"-device", device(c.Arch, "virtio-blk")+",drive=cas,serial="+vmhost.CASDiskID,
	)
	if c.RuntimesImage != "" {
		a = append(a,
			"-drive", "file="+escapeOpt(c.RuntimesImage)+",if=none,id=runtimes,format=raw,readonly=on",
			"-device", device(c.Arch, "virtio-blk")+",drive=runtimes,serial="+vmhost.RuntimesDiskID,
		)
	}
	switch p.Transport {
	case vmhost.TransportVsock:
		a = append(a, "-device", device(c.Arch, "vhost-vsock")+",guest-cid="+strconv.FormatUint(uint64(p.CID), 10))
	case vmhost.TransportSerial:
		a = append(a,
			"-device", device(c.Arch, "virtio-serial")+",id=vser0",
			"-chardev", "socket,id=actiond,path="+escapeOpt(p.SerialSocket)+",server=on,wait=off",
			"-device", "virtserialport,bus=vser0.0,chardev=actiond,id="+serialDeviceID+",name="+vmhost.SerialPortName,
		)
	}
	return append(a, c.ExtraArgs...)
}

// serialDeviceID is the QEMU id of the virtserialport, as named in its
// VSERPORT_CHANGE events.
const serialDeviceID = "actiond-port"

// escapeOpt escapes a value for QEMU's option syntax, where a comma is
// written twice.
func escapeOpt(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// KernelParams returns the guest contract parameters for this plan.
func KernelParams(arch string, p Plan) vmhost.KernelParams {
	return vmhost.KernelParams{Console: ConsoleDevice(arch), Transport: p.Transport}
}

// Cmdline is the kernel command line of c under plan p: c's (see
// vmhost.Config.CmdlineFor), plus tsc_early_khz for an x86 guest under TCG
// unless the command line sets it.
func Cmdline(c Config, p Plan) string {
	s := c.CmdlineFor(KernelParams(c.Arch, p))
	if c.Arch == "amd64" && p.Accel == AccelTCG && p.TSCkHz > 0 && !strings.Contains(s, "tsc_early_khz=") {
		s += fmt.Sprintf(" tsc_early_khz=%d", p.TSCkHz)
	}
	return s
}
