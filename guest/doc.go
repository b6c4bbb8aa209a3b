// Package guest is the init of actiond's VM: the code that runs as PID 1
// inside the tiny Linux VM of `actiond serve-vm` (Virtualization.framework
// on macOS, QEMU on Linux) and turns it into an actiond worker.
//
// Boot, in order (each step is logged on the console with its duration):
//
//  1. console: fds 0-2 are checked; logs go to the console (a missing
//     console, e.g. hvc0 before virtio_console is loaded, is buffered and
//     flushed once it appears);
//  2. mounts: devtmpfs on /dev, /proc, /sys, /run and /tmp (tmpfs), cgroup2
//     on /sys/fs/cgroup, devpts; the initramfs root is first replaced by a
//     bind mount of itself, so that the sandbox can pivot_root out of it;
//  3. modules: the modules named in /lib/modules/$(uname -r)/modules.actiond
//     are loaded with finit_module, each after its dependencies from
//     modules.dep (skipped on a kernel without module support);
//  4. disks: the CAS disk (ext4; formatted with the mkfs.ext4 carried in the
//     initramfs when blank, checked with e2fsck -p otherwise) is mounted on
//     /cas, the runtimes disk (one SquashFS with a directory per runtime)
//     read-only on /runtimes; a runtimes disk that is a tar stream (the
//     payload builder's first stage: unpacked packages, one zstd tar per
//     runtime) is extracted onto /cas/runtimes once per runtime version,
//     configured by the runtime's /.actiond/second-stage in a chroot and
//     bound read-only on /runtimes/<name> (see prepareTarRuntimes);
//  5. server: a child process (the same binary, argv[0]
//     "actiond-guest-server") opens the actiond.Server over /cas/actiond with
//     the Linux sandbox and the runtimes, and serves it on the host
//     transport: AF_VSOCK when the VM has a vsock device, else the
//     virtio-serial port named "actiond" multiplexed with streammux.
//
// PID 1 then supervises: SIGTERM or SIGINT (Ctrl-Alt-Del), the power button
// (ACPI or GPIO, e.g. QEMU's system_powerdown) or a PowerOff call on the
// guest control service stop the server (running calls drain), then PID 1
// kills what is left, syncs, unmounts and powers off. If the server exits on
// its own or panics, or a boot step fails, the reason is printed on the
// console and the machine powers off too: PID 1 never exits (that would
// panic the kernel).
//
// Configuration comes from the kernel command line; see Config and
// ParseCmdline for the actiond.* parameters.
package guest
