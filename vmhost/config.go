package vmhost

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"strings"

	"github.com/actiond/actiond/internal/bootparams"
)

// Names shared with package guest: the boot contract (internal/bootparams).
const (
	// DefaultVsockPort is the guest's vsock port.
	DefaultVsockPort = bootparams.VsockPort
	// SerialPortName names the virtio-serial port carrying streammux.
	SerialPortName = bootparams.SerialPortName
	// CASDiskID and RuntimesDiskID are the virtio-blk serials of the disks
	// (QEMU serial=, Virtualization.framework blockDeviceIdentifier; at
	// most 20 bytes), which the guest matches with actiond.cas=id:….
	CASDiskID      = bootparams.CASDiskID
	RuntimesDiskID = bootparams.RuntimesDiskID
)

// Transports between host and guest.
const (
	TransportVsock  = bootparams.TransportVsock  // AF_VSOCK: vz, or QEMU with /dev/vhost-vsock
	TransportSerial = bootparams.TransportSerial // virtio-serial port SerialPortName + streammux
)

// Config is what every backend needs to boot the guest. Backends add their
// own knobs (see qemu.Config, vz.Config).
type Config struct {
	// Arch is the guest architecture as a GOARCH name, "amd64" or "arm64"
	// (default runtime.GOARCH).
	Arch string
	// Kernel is an uncompressed kernel: vmlinux with a PVH note (amd64) or
	// an arm64 Image. Initrd is the initramfs whose /init is `actiond
	// guest`.
	Kernel, Initrd string
	// CASImage is the read-write disk holding the guest's CAS and action
	// cache (the guest formats a blank one as ext4).
	CASImage string
	// RuntimesImage is the read-only runtimes disk (runtimes.tar from
	// package vmpayload, or an older payload's SquashFS); "" attaches none.
	RuntimesImage string
	// CPUs (default: the host's) and MemoryMiB (default 2048) size the VM.
	CPUs      int
	MemoryMiB int
	// Cmdline replaces the whole kernel command line; "" means the backend's
	// KernelParams. ExtraCmdline is appended either way (e.g.
	// "actiond.loglevel=debug").
	Cmdline      string
	ExtraCmdline string
	// Logger gets the backend's logs (default slog.Default()).
	Logger *slog.Logger
	// Console receives the guest's console output; nil makes a new one
	// logging to Logger.
	Console *Console
}

// DefaultMemoryMiB is the guest memory when Config.MemoryMiB is 0.
const DefaultMemoryMiB = 2048

// WithDefaults returns c with zero fields defaulted.
func (c Config) WithDefaults() Config {
	if c.Arch == "" {
		c.Arch = runtime.GOARCH
	}
	if c.CPUs <= 0 {
		c.CPUs = runtime.NumCPU()
	}
	if c.MemoryMiB <= 0 {
		c.MemoryMiB = DefaultMemoryMiB
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Console == nil {
		c.Console = NewConsole(c.Logger, "guest-console", 0)
	}
	return c
}

// Validate checks that the files exist and the sizes make sense.
func (c Config) Validate() error {
	var errs []error
	switch c.Arch {
	case "amd64", "arm64":
	default:
		errs = append(errs, fmt.Errorf("guest arch %q: want amd64 or arm64", c.Arch))
	}
	for _, f := range []struct{ what, path string }{
		{"kernel", c.Kernel}, {"initrd", c.Initrd}, {"CAS image", c.CASImage}, {"runtimes image", c.RuntimesImage},
	} {
		if f.path == "" {
			if f.what != "runtimes image" {
				errs = append(errs, fmt.Errorf("%s: no path given", f.what))
			}
			continue
		}
		st, err := os.Stat(f.path)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", f.what, err))
		} else if !st.Mode().IsRegular() && st.Mode()&os.ModeDevice == 0 {
			errs = append(errs, fmt.Errorf("%s %s: not a regular file or device", f.what, f.path))
		}
	}
	if c.CPUs < 1 || c.CPUs > 255 {
		errs = append(errs, fmt.Errorf("cpus %d: want 1 to 255", c.CPUs))
	}
	if c.MemoryMiB < 128 {
		errs = append(errs, fmt.Errorf("memory %d MiB: want at least 128 MiB", c.MemoryMiB))
	}
	return errors.Join(errs...)
}

// KernelParams is the kernel command line of the guest contract (see the
// package documentation); backends fill in what depends on them.
type KernelParams struct {
	// Console is the kernel console device: ttyS0 (QEMU microvm), ttyAMA0
	// (QEMU virt), hvc0 (Virtualization.framework).
	Console string
	// Transport is TransportVsock or TransportSerial.
	Transport string
	// VsockPort is the guest's listening port (vsock only; 0: default).
	VsockPort uint32
	// Runtimes is false when no runtimes disk is attached.
	Runtimes bool
	// Extra parameters, appended in order.
	Extra []string
}

// String renders the command line, e.g.
//
//	console=ttyS0 panic=-1 actiond.transport=serial actiond.serial=actiond actiond.cas=id:actiond-cas actiond.runtimes=id:actiond-runtimes
func (p KernelParams) String() string {
	words := []string{}
	if p.Console != "" {
		words = append(words, "console="+p.Console)
		if p.Console == "hvc0" {
			// hvc0 appears only once the guest loaded virtio_console: tell
			// it where its logs go.
			words = append(words, bootparams.Param(bootparams.Console, "hvc0"))
		}
	}
	// panic=-1: a panicking guest reboots at once, and a reboot ends the VM
	// (QEMU -no-reboot), so the host notices and reports the console.
	// loglevel=4: warnings and worse on the console (it is slow under TCG).
	words = append(words, "panic=-1", "loglevel=4", bootparams.Param(bootparams.Transport, p.Transport))
	switch p.Transport {
	case TransportVsock:
		port := p.VsockPort
		if port == 0 {
			port = DefaultVsockPort
		}
		words = append(words, bootparams.Param(bootparams.Port, strconv.FormatUint(uint64(port), 10)))
	case TransportSerial:
		words = append(words, bootparams.Param(bootparams.Serial, SerialPortName))
	}
	words = append(words, bootparams.Param(bootparams.CAS, bootparams.DiskByID+CASDiskID))
	if p.Runtimes {
		words = append(words, bootparams.Param(bootparams.Runtimes, bootparams.DiskByID+RuntimesDiskID))
	} else {
		words = append(words, bootparams.Param(bootparams.Runtimes, bootparams.None))
	}
	words = append(words, p.Extra...)
	return strings.Join(words, " ")
}

// CmdlineFor returns c's command line: c.Cmdline, or p rendered, plus
// c.ExtraCmdline.
func (c Config) CmdlineFor(p KernelParams) string {
	s := c.Cmdline
	if s == "" {
		p.Runtimes = c.RuntimesImage != ""
		s = p.String()
	}
	if extra := strings.TrimSpace(c.ExtraCmdline); extra != "" {
		s += " " + extra
	}
	return s
}
