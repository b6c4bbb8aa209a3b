// Package bootparams is the boot contract between the host that starts the
// VM and the guest's PID 1: the names of the devices the host attaches and
// the kernel command line parameters that tell the guest where to find
// them. Package vmhost formats it (vmhost.KernelParams) and package guest
// parses it (guest.ParseCmdline); a round-trip test in package guest holds
// the two to it. Written once here so that the two sides cannot drift.
package bootparams

// Prefix starts every guest parameter on the kernel command line:
// actiond.<name>=<value>.
const Prefix = "actiond."

// Parameter names (after Prefix) that the host sets.
const (
	Transport = "transport" // TransportVsock or TransportSerial (the guest also takes "auto")
	Port      = "port"      // vsock port the guest listens on
	Serial    = "serial"    // name of the virtio-serial port
	CAS       = "cas"       // the CAS disk: DiskByID + CASDiskID
	Runtimes  = "runtimes"  // the runtimes disk: DiskByID + RuntimesDiskID, or None
	Console   = "console"   // where the guest logs when /dev/console is unusable at boot (hvc0)
)

// Values of the Transport parameter.
const (
	TransportAuto   = "auto"   // vsock when the VM has a vsock device, else serial
	TransportVsock  = "vsock"  // AF_VSOCK on VsockPort: vz, or QEMU with /dev/vhost-vsock
	TransportSerial = "serial" // virtio-serial port SerialPortName, multiplexed with streammux
)

// Devices.
const (
	// VsockPort is the port the guest listens on.
	VsockPort = 8980
	// SerialPortName names the virtio-serial port carrying streammux.
	SerialPortName = "actiond"
	// CASDiskID and RuntimesDiskID are the virtio-blk serials of the disks
	// (QEMU serial=, Virtualization.framework blockDeviceIdentifier; at
	// most 20 bytes).
	CASDiskID      = "actiond-cas"
	RuntimesDiskID = "actiond-runtimes"
	// DiskByID prefixes a disk parameter's value that names a serial.
	DiskByID = "id:"
	// None is the Runtimes value when no runtimes disk is attached.
	None = "none"
)

// Param renders one parameter: Prefix + name + "=" + value.
func Param(name, value string) string { return Prefix + name + "=" + value }
