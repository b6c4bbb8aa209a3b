package main

import (
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/sandbox"
)

// execFlags configure execution for serve (and later the VM guest and the
// farm worker).
type execFlags struct {
	noExec         bool
	runtimeDir     string
	defaultRuntime string
	concurrency    int
	inputRoot      string
	maxTimeout     time.Duration
	actionIDs      string
	defaultTimeout time.Duration
	maxEntries     int64
	maxInputBytes  int64
	tmpSize        int64
}

func defaultRuntimeDir() string {
	if d := os.Getenv("ACTIOND_RUNTIME_DIR"); d != "" {
		return d
	}
	return "/var/cache/actiond/runtimes"
}

func (f *execFlags) register(fs *flag.FlagSet) {
	fs.BoolVar(&f.noExec, "no-exec", false, "serve as a cache only, without the Execution service")
	fs.StringVar(&f.runtimeDir, "runtime-dir", defaultRuntimeDir(), "directory of runtime SquashFS images (<name>.squashfs, e.g. glibc2.36.squashfs; built by `make runtimes`)")
	fs.StringVar(&f.defaultRuntime, "default-runtime", "host", "runtime for actions that set no \"libc\" platform property")
	fs.IntVar(&f.concurrency, "concurrency", runtime.NumCPU(), "actions run at once")
	fs.StringVar(&f.inputRoot, "input-root", "auto", "how input trees are materialised: auto (fuse when /dev/fuse works, else hardlink), fuse (actiondfs), hardlink or copy")
	fs.DurationVar(&f.maxTimeout, "max-action-timeout", 0, "cap on an action's timeout, also applied to actions without one (0: none)")
	fs.StringVar(&f.actionIDs, "action-uids", sandbox.DefaultIDs.String(), "uids (and gids of the same numbers) actions run as, FIRST-LAST: each running action gets its own, so concurrent actions share no per-user limits; no user of the host may have one, and it needs at least --concurrency ids")
	fs.DurationVar(&f.defaultTimeout, "default-action-timeout", executor.DefaultActionTimeout, "timeout of actions that set none; it counts from the start of input staging (0: none)")
	f.maxEntries = executor.DefaultMaxInputEntries
	fs.Int64Var(&f.maxEntries, "max-input-entries", f.maxEntries, "refuse actions whose input tree, expanded (a directory named twice counts twice), has more files, directories and symlinks (0: no limit)")
	f.maxInputBytes = executor.DefaultMaxInputBytes
	fs.Var(sizeFlag{&f.maxInputBytes}, "max-input-bytes", "refuse actions whose expanded input tree holds more bytes of files (0: no limit)")
	f.tmpSize = sandbox.DefaultTmpSize
	fs.Var(sizeFlag{&f.tmpSize}, "sandbox-tmp-size", "size of each action's /tmp and of its /dev/shm (tmpfs, in memory; 0: the kernel's default, half the memory)")
}

// orNone maps a flag's 0 ("none") to the options' negative "none".
func orNone[T int64 | time.Duration](v T) T {
	if v == 0 {
		return -1
	}
	return v
}

// apply sets up the sandbox and fills the execution options. Without root
// the server still serves as a cache, and says why it cannot execute.
func (f *execFlags) apply(opts *actiond.Options, log *slog.Logger) (func(), error) {
	if f.noExec {
		return func() {}, nil
	}
	if os.Geteuid() != 0 {
		log.Warn("execution disabled: the Linux sandbox needs root (namespaces, chroot, mounts); serving as a cache only")
		return func() {}, nil
	}
	ids, err := sandbox.ParseIDRange(f.actionIDs)
	if err != nil {
		return nil, fmt.Errorf("--action-uids: %w", err)
	}
	if ids.Count < f.concurrency {
		return nil, fmt.Errorf("--action-uids %s has %d ids, fewer than --concurrency %d: each running action needs its own", ids, ids.Count, f.concurrency)
	}
	if err := actiond.PrivateRoot(opts.Root, log); err != nil {
		return nil, err
	}
	runtimes := []sandbox.Runtime{sandbox.HostRuntime()}
	unmountEmbedded := func() {}
	if _, err := os.Stat(f.runtimeDir); err == nil {
		loaded, err := sandbox.LoadRuntimes(f.runtimeDir, filepath.Join(opts.Root, "runtimes"))
		if err != nil {
			return nil, fmt.Errorf("load runtimes from %s: %w", f.runtimeDir, err)
		}
		runtimes = append(runtimes, loaded...)
	} else if embedded, unmount, ok, err := embeddedRuntimes(opts.Root, log); err != nil {
		return nil, err
	} else if ok {
		// A standalone binary: the runtimes disk it carries.
		runtimes = append(runtimes, embedded...)
		unmountEmbedded = unmount
	} else {
		log.Info("no runtime images; only the host runtime is available", "runtime_dir", f.runtimeDir, "hint", "build them with `make runtimes`")
	}
	sb, err := sandbox.New(sandbox.Config{Runtimes: runtimes, IDs: ids, StateDir: filepath.Join(opts.Root, "sandbox"), Logger: log, TmpSize: orNone(f.tmpSize)})
	if err != nil {
		unmountEmbedded()
		return nil, err
	}
	opts.Sandbox = sb
	opts.DefaultRuntime = f.defaultRuntime
	opts.Concurrency = f.concurrency
	opts.MaxActionTimeout = f.maxTimeout
	opts.DefaultActionTimeout = orNone(f.defaultTimeout)
	opts.MaxInputEntries = orNone(f.maxEntries)
	opts.MaxInputBytes = orNone(f.maxInputBytes)
	opts.InputRootKind = f.inputRoot
	return func() { sb.Close(); unmountEmbedded() }, nil
}
