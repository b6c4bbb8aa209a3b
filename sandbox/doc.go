// Package sandbox is the Linux implementation of executor.Sandbox: it runs one
// action's command isolated from the host and from other actions.
//
// Each Run re-executes the current binary (/proc/self/exe) under the argv[0]
// "actiond-sandbox-init". An init function (in sandbox/internal/sandboxinit,
// which this package links) recognises that name, so the helper works in any
// binary that imports this package (cmd/actiond, tests, examples) without
// extra wiring. The helper starts as PID 1 of new mount, PID, network, IPC,
// UTS and cgroup namespaces and:
//
//   - builds a fresh root on a tmpfs: the selected runtime bound read-only,
//     the execroot read-only at /execroot with only the output directories
//     writable, a private /tmp and /dev/shm, a minimal /dev, a fresh /proc and
//     a generated /etc (hosts, passwd, group), then makes the root read-only
//     and pivots into it;
//   - brings up the loopback interface (the only interface it has);
//   - drops to the action's own uid/gid (Config.IDs: each action running at
//     a time has a different one, so they share no per-user limits) with no
//     supplementary groups, an empty
//     capability bounding set, no_new_privs, every descriptor above 2
//     closed, and a seccomp filter refusing namespace, mount, BPF, io_uring,
//     ptrace, keyring, module and vsock calls;
//   - starts the command, reaps orphans, and exits when the command does,
//     which makes the kernel kill everything left in the PID namespace.
//
// Starting a helper (cloning six namespaces, exec, the Go runtime's start,
// the loopback interface) costs about 3 ms, so a few helpers are started
// ahead of their actions (Config.PrestartedHelpers) at a low priority and
// wait for their spec. A prestarted helper's mount namespace is a copy of
// the host's from when it was cloned, so it cannot see mounts made later;
// the parent therefore sends the execroot and a directory runtime as
// detached mount trees (open_tree(2)), which the helper moves into its root,
// and the helper drops its copies of actiondfs mounts while it waits (a
// copy would keep that mount's FUSE connection alive). The command's stdout
// and stderr come as descriptors with the spec.
//
// The parent places the helper in per-run cgroups (cgroup v2 controllers where
// they are delegated, cgroup v1 otherwise) for memory, CPU and task limits,
// enforces the timeout, detects OOM kills and, as a second line behind the
// PID namespace, kills whatever is left in the run's cgroups. Limits apply to
// everything in the sandbox, its init process (a few threads, a few MiB)
// included.
//
// On a pure cgroup v2 host the process must be allowed to manage its own
// cgroup (for a systemd service: Delegate=yes). If that cgroup also holds
// processes, New moves the current process into a leaf child named
// "actiond-supervisor" so that controllers can be enabled for the per-run
// cgroups next to it.
//
// Runtimes are directory trees, usually SquashFS images mounted with
// LoadRuntimes or MountImage, or the host's own /usr (HostRuntime).
package sandbox
