package sandbox

import (
	"fmt"
	"log/slog"
	"strconv"
	"strings"
)

// HostRuntimeName is the name of the runtime returned by HostRuntime.
const HostRuntimeName = "host"

// DefaultID is nobody/nogroup on Debian, which every action's /etc/passwd
// and /etc/group name. Actions no longer run as it by default (see IDs).
const DefaultID = 65534

// Default range of action ids (Config.IDs): 4096 uids and gids from
// 1879048192 (0x70000000). Normal users get ids below 60000, /etc/subuid
// ranges are handed out from 100000 up to 600100000 (useradd's SUB_UID_MAX,
// SUB_GID_MAX), and systemd gives containers 524288-1879048191 and uses
// nothing from here up to 2147352575.
const (
	DefaultFirstID = 1879048192
	DefaultIDCount = 4096
)

// IDRange is the ids First, First+1, ..., First+Count-1.
type IDRange struct{ First, Count int }

// DefaultIDs is the range actions run as unless Config.IDs says otherwise.
var DefaultIDs = IDRange{First: DefaultFirstID, Count: DefaultIDCount}

func (r IDRange) String() string { return fmt.Sprintf("%d-%d", r.First, r.First+r.Count-1) }

// ParseIDRange parses "FIRST-LAST" (inclusive) or "FIRST+COUNT".
func ParseIDRange(s string) (IDRange, error) {
	var r IDRange
	if a, b, ok := strings.Cut(s, "+"); ok {
		first, err1 := strconv.Atoi(a)
		count, err2 := strconv.Atoi(b)
		if err1 != nil || err2 != nil {
			return r, fmt.Errorf("id range %q: want FIRST-LAST or FIRST+COUNT", s)
		}
		r = IDRange{first, count}
	} else if a, b, ok := strings.Cut(s, "-"); ok {
		first, err1 := strconv.Atoi(a)
		last, err2 := strconv.Atoi(b)
		if err1 != nil || err2 != nil {
			return r, fmt.Errorf("id range %q: want FIRST-LAST or FIRST+COUNT", s)
		}
		r = IDRange{first, last - first + 1}
	} else {
		return r, fmt.Errorf("id range %q: want FIRST-LAST or FIRST+COUNT", s)
	}
	return r, r.check()
}

// maxID is the largest usable id: (uid_t)-1 means "no change" to the
// kernel, and ids from 2^31 confuse programs that store them signed.
const maxID = 1<<31 - 1

func (r IDRange) check() error {
	switch {
	case r.Count < 1:
		return fmt.Errorf("id range %s is empty", r)
	case r.First < 1:
		return fmt.Errorf("id range %s includes root (0) or negative ids", r)
	case r.First > maxID-r.Count+1:
		return fmt.Errorf("id range %s goes beyond %d", r, maxID)
	}
	return nil
}

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
	// IDs are the uids actions run as: each action running at a time gets
	// one of its own, with the gid of the same number, so that concurrent
	// actions share no per-user kernel limits (inotify instances,
	// RLIMIT_NPROC, pipe buffers) with each other or with host daemons.
	// No user of the host should have an id in it. Runs wait while every
	// id is in use. Zero means DefaultIDs.
	IDs IDRange
	// UID and GID, if set, make every action run as these ids instead,
	// sharing them (the old behaviour). Running actions as root is not
	// supported.
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
	// DefaultPrestartedHelpers, negative none. Apart from these, a helper
	// that ran an action cleanly is kept for a later one: as many are kept
	// idle as actions have run at once (at most 64).
	PrestartedHelpers int
	// TmpSize is the size of the action's /tmp and of its /dev/shm (each
	// a tmpfs of its own, in memory): zero means DefaultTmpSize, negative
	// the kernel's default (half the machine's memory each).
	TmpSize int64
}

// DefaultMaxProcs is each action's RLIMIT_NPROC when it sets no pids
// limit: as many tasks as the systemd unit allows the whole server
// (TasksMax), so a fork bomb stops there even where the pids cgroup
// controller is unavailable.
const DefaultMaxProcs = 16384

// maxProcs is the RLIMIT_NPROC of an action with the pids limit pids.
func maxProcs(pids int64) uint64 {
	if pids > 0 {
		return uint64(pids)
	}
	return DefaultMaxProcs
}

// DefaultTmpSize is the default Config.TmpSize: room for the scratch
// files of compilers and tests, not enough for one action to fill the
// host's memory through /tmp.
const DefaultTmpSize = 1 << 30

// DefaultPrestartedHelpers is the default Config.PrestartedHelpers.
const DefaultPrestartedHelpers = 2
