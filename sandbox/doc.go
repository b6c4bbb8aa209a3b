// Package sandbox is the Linux implementation of executor.Sandbox: it runs one
// action's command isolated from the host and from other actions.
//
// Runs are carried out by helpers: the current binary re-executed
// (/proc/self/exe) under the argv[0] "actiond-sandbox-init". An init
// function (in sandbox/internal/sandboxinit, which this package links)
// recognises that name, so the helper works in any binary that imports
// this package (cmd/actiond, tests, examples) without extra wiring. A
// helper starts as PID 1 of new mount, PID, network, IPC and UTS
// namespaces and runs one action at a time, for as many actions as it is
// given. For each action it makes a thread of its own, which:
//
//   - unshares new mount, network, IPC, UTS and cgroup namespaces for the
//     action (the cgroup one rooted at the action's cgroup);
//   - builds a fresh root on a tmpfs: the selected runtime bound read-only,
//     the execroot read-only at /execroot with only the output directories
//     writable, a private /tmp and /dev/shm, a minimal /dev, a /proc that
//     hides other users' processes (hidepid) and a generated /etc (hosts,
//     passwd, group), then makes the root read-only and pivots into it;
//   - brings up the loopback interface (the only interface it has);
//   - drops its privileges and forks the command as the action's own
//     uid/gid (Config.IDs: each action running at a time has a different
//     one, so they share no per-user limits) with no supplementary groups,
//     an empty capability bounding set, no_new_privs, only stdin, stdout
//     and stderr open, and a seccomp filter refusing namespace, mount, BPF,
//     io_uring, ptrace, keyring, module and vsock calls;
//   - and ends, so nothing it changed is ever used again.
//
// The helper reaps orphans and, when the command exits, kills and reaps
// everything left in its PID namespace before it reports and takes the
// next action. Starting a helper (cloning namespaces, exec of this binary,
// the Go runtime's start) costs tens of milliseconds of CPU on a slow
// machine; a helper that is kept pays it once instead of per action. A few
// helpers are started ahead of their first action
// (Config.PrestartedHelpers) at a low priority. A helper's mount namespace
// is a copy of the host's from when it was cloned, so it cannot see
// mounts made later; the parent therefore sends the execroot and a
// directory runtime as detached mount trees (open_tree(2)), which the
// action's thread moves into its root, and the helper drops its copies of
// actiondfs mounts when it starts (a copy would keep that mount's FUSE
// connection alive). The command's stdout and stderr come as descriptors
// with the spec. Without open_tree (Linux before 5.2) a helper runs one
// action and sees its execroot by path.
//
// Each helper has cgroups of its own for life (cgroup v2 controllers where
// they are delegated, cgroup v1 otherwise), which the actions it runs
// share one after another: the parent sets an action's memory, CPU and
// task limits there before it sends the spec and lifts them afterwards,
// so no process ever moves between cgroups (a move waits for an RCU grace
// period: milliseconds on a busy machine, far more in an emulated VM). The
// parent enforces the timeout and detects OOM kills; on a timeout, a
// cancellation or a failure it kills the helper (which takes its PID
// namespace with it) and, as a second line, whatever is left in its
// cgroups. Limits apply to everything in the sandbox, the helper (a few
// threads, a few MiB) included.
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
