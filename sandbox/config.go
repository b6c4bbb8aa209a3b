package sandbox

import "log/slog"

// HostRuntimeName is the name of the runtime returned by HostRuntime.
const HostRuntimeName = "host"

// DefaultID is the uid and gid actions run as unless Config says otherwise
// (nobody/nogroup on Debian).
const DefaultID = 65534

// Runtime is a root file system that actions can run in.
type Runtime struct {
	// Name selects the runtime in RunSpec.Runtime (the "libc" platform
	// property), e.g. "glibc2.36".
	Name string
	// Root is the directory tree of the runtime, typically a mounted SquashFS
	// image. Its top-level entries are bound read-only into each action's
	// root and its /etc provides /etc. Unused when Host is set.
	Root string
	// Host makes this the host's own runtime: read-only binds of the host's
	// /usr, /bin, /sbin and /lib*, plus /etc/ld.so.cache and /etc/alternatives.
	Host bool
	// Image is the SquashFS image Root was mounted from, set by
	// LoadRuntimes. Sandbox.Close unmounts Root for runtimes that have one.
	Image string
}

// HostRuntime returns the runtime named "host" that exposes the host's own
// system directories read-only.
func HostRuntime() Runtime {
	return Runtime{Name: HostRuntimeName, Host: true}
}

// Config configures a Sandbox.
type Config struct {
	// Runtimes are the root file systems actions can select. At least one is
	// required; names must be unique.
	Runtimes []Runtime
	// UID and GID are the ids actions run as; zero means DefaultID. Running
	// actions as root is not supported.
	UID, GID int
	// StateDir holds the sandbox's scratch files (the mount point for
	// per-action roots and the generated /etc files) in a subdirectory that
	// Close removes. Empty means the system temporary directory.
	StateDir string
	// Logger receives diagnostics; nil means slog.Default().
	Logger *slog.Logger
	// PrestartedHelpers is how many sandbox helpers are kept started ahead
	// of actions (cloned into fresh namespaces, past exec and runtime
	// start, waiting for their action): zero means
	// DefaultPrestartedHelpers, negative none.
	PrestartedHelpers int
	// TmpSize is the size of the action's /tmp and of its /dev/shm (each
	// a tmpfs of its own, in memory): zero means DefaultTmpSize, negative
	// the kernel's default (half the machine's memory each).
	TmpSize int64
}

// DefaultTmpSize is the default Config.TmpSize: room for the scratch
// files of compilers and tests, not enough for one action to fill the
// host's memory through /tmp.
const DefaultTmpSize = 1 << 30

// DefaultPrestartedHelpers is the default Config.PrestartedHelpers.
const DefaultPrestartedHelpers = 2
