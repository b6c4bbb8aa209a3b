// Package vmhost runs actiond's guest VM and connects the host to it: the
// Machine interface and the lifecycle around it (Serve), readiness
// (WaitReady), the raw byte proxy that `actiond serve-vm` puts in front of
// the guest's gRPC server (Proxy), the console tail (Console, Ring), the
// payload files (FindPayload, EnsureDiskImage) and the guest contract
// below. Backends: vmhost/qemu (Linux: QEMU, KVM when it works, else TCG)
// and vmhost/vz (macOS: Virtualization.framework). Everything that is not
// a hypervisor call lives here, so that it is shared and tested on Linux.
//
// # Guest contract
//
// The guest is `actiond guest` (package guest) as PID 1 of an initramfs.
// The host configures it with the kernel command line (KernelParams):
//
//	console=ttyS0|ttyAMA0|hvc0   QEMU microvm (16550) | QEMU virt (PL011) | vz (virtio console)
//	actiond.console=hvc0         vz only: where the guest logs once virtio_console is loaded
//	panic=-1                     a panic reboots at once; a reboot ends the VM (QEMU -no-reboot)
//	actiond.transport=vsock|serial
//	actiond.port=8980            vsock: the guest listens on this port (any CID)
//	actiond.serial=actiond       serial: name of the virtio-serial port carrying streammux
//	actiond.cas=id:actiond-cas   the CAS disk: virtio-blk, read-write, serial "actiond-cas"
//	actiond.runtimes=id:actiond-runtimes|none   the runtimes SquashFS: virtio-blk, read-only
//	tsc_early_khz=N              QEMU TCG on x86 only: the host's TSC rate (see vmhost/qemu)
//
// Config.ExtraCmdline appends more (e.g. actiond.loglevel=debug,
// actiond.drain=30s; see guest.Params for the list), Config.Cmdline
// replaces it all. The disks carry virtio-blk serials (QEMU serial=,
// Virtualization.framework blockDeviceIdentifier) so that the guest finds
// them whatever order the buses enumerate them in. The CAS disk may be a
// blank sparse file: the guest formats it (ext4) on first boot.
//
// Transport: the host opens one byte stream per client connection and the
// guest serves actiond's gRPC server (REAPI, health, and the guest control
// service GuestControlService) on each. With vsock the host connects to
// the guest's port 8980 (vz: the socket device's Connect; QEMU with
// /dev/vhost-vsock: AF_VSOCK to the guest's CID). Without vsock, the
// virtio-serial port "actiond" carries streammux (internal/streammux): the
// host is the yamux client and opens streams; the guest accepts them. The
// guest starts a session when the host's first bytes arrive and starts
// over (closing and reopening its port) when the host disconnects.
//
// Readiness: the guest is ready when grpc.health.v1.Health/Check for
// service "" answers SERVING through a stream (WaitReady).
//
// Shutdown: the host calls actiond.guest.v1.Guest/PowerOff through a stream
// (RequestPowerOff); if that fails it presses the power button (QEMU
// system_powerdown: ACPI GED on microvm, GPIO key on virt; vz
// RequestStop), which the guest also obeys. The guest drains (its gRPC
// server sends GOAWAY and lets running calls finish), syncs, unmounts and
// powers off; the host kills the VM if it has not ended within
// ServeOptions.StopTimeout. The PowerOff call is reachable through the
// proxy, like every guest service: keep serve-vm's listener on loopback.
//
// Failure: when the VM ends without being asked to (a guest panic, a
// failed boot step, the server exiting), Machine.Wait returns an
// *ExitError quoting the console's last lines, Serve returns it and
// `actiond serve-vm` logs it and exits with status 1.
package vmhost
