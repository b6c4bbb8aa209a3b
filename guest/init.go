package guest

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/actiond/actiond/internal/kernel"
	"golang.org/x/sys/unix"
)

// guestPath is PATH for PID 1 and the server (the kernel gives init none).
const guestPath = "/usr/sbin:/usr/bin:/sbin:/bin"

// stopGrace is how long the server may take beyond its drain timeout
// before PID 1 kills it.
const stopGrace = 10 * time.Second

// boot is PID 1's state.
type boot struct {
	con     *consoleWriter
	level   slog.LevelVar
	log     *slog.Logger
	cfg     Config
	info    map[string]any
	timings map[string]float64 // step → seconds
	mounted []string           // data file systems, in mount order
	casDev  string             // the CAS disk's device
	child   int                // server pid, 0 when not running
	started float64            // boot clock (s) when init started
	state   serverState
}

// Main runs the guest init. It must be PID 1 (the kernel's /init) and never
// returns: when the server stops, or anything fails, or it panics, it
// prints why on the console, syncs, unmounts and powers the VM off.
func Main() {
	b := &boot{con: &consoleWriter{}, info: map[string]any{}, timings: map[string]float64{}, started: bootClock().Seconds()}
	if stderrIsConsole() {
		b.con.attach(os.Stderr)
	}
	b.log = newLogger(b.con, &b.level, "init")
	defer func() {
		if r := recover(); r != nil {
			fmt.Fprintf(b.con, "actiond guest: PANIC in init: %v\n%s\n", r, debug.Stack())
			b.shutdown(fmt.Sprintf("panic: %v", r), true)
		}
	}()
	if os.Getpid() != 1 {
		b.log.Error("actiond guest must run as PID 1 (the VM's /init)")
		os.Exit(2)
	}
	os.Setenv("PATH", guestPath)
	b.run()
}

// step runs one named boot step and records its duration.
func (b *boot) step(name string, fn func() error) {
	t := time.Now()
	err := fn()
	d := time.Since(t)
	b.timings[name] = d.Seconds()
	if err != nil {
		b.log.Error("boot step failed", "step", name, "err", err)
		b.shutdown(fmt.Sprintf("boot step %q failed: %v", name, err), true)
	}
	b.log.Debug("boot step done", "step", name, "took", d.Round(time.Microsecond))
}

func (b *boot) run() {
	b.info["init_start_s"] = b.started
	b.step("switch root", b.switchRoot)
	var cmdline string
	b.step("mounts", func() error {
		warnings, err := mountBasics()
		for _, w := range warnings {
			b.log.Warn("optional mount failed", "err", w)
		}
		if err != nil {
			return err
		}
		data, err := os.ReadFile("/proc/cmdline")
		if err != nil {
			return err
		}
		cmdline = strings.TrimSpace(string(data))
		cfg, warnings, err := ParseCmdline(cmdline)
		for _, w := range warnings {
			b.log.Warn(w)
		}
		b.cfg = cfg
		b.level.Set(cfg.LogLevel)
		return err
	})
	// Ctrl-Alt-Del sends SIGINT to init instead of rebooting at once.
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_CAD_OFF)
	release := kernel.Release()
	b.info["kernel"] = release
	b.log.Info("actiond guest starting", "kernel", release, "cmdline", cmdline)

	b.step("modules", func() error { return b.loadModules(release) })
	// Before anything runs beside init (see pinStaticKeys). Not fatal: a
	// kernel without these controllers has fewer keys to flip.
	b.step("static keys", func() error {
		info, err := pinStaticKeys("/sys/fs/cgroup")
		if info != nil {
			b.info["static_keys"] = info
		}
		if err != nil {
			b.log.Warn("cannot pin the kernel's cgroup static keys; an emulated VM may lock up when the sandbox makes its first cgroups", "err", err)
		} else {
			b.log.Debug("pinned the kernel's cgroup static keys", "cgroup", info["cgroup"], "controllers", info["controllers"], "cpu_max", info["cpu_max"])
		}
		return nil
	})
	b.step("console", func() error {
		if b.con.attached() {
			return nil
		}
		// The devices asked for first (actiond.console, then the kernel's
		// console= from the last, which /dev/console would be), then
		// /dev/console, then the usual suspects.
		var names []string
		if b.cfg.Console != "" {
			names = append(names, b.cfg.Console)
		}
		consoles := kernelConsoles(cmdline)
		for i := len(consoles) - 1; i >= 0; i-- {
			names = append(names, consoles[i])
		}
		names = append(names, "console", "hvc0", "ttyS0", "ttyAMA0")
		f, err := openConsole(names)
		if err != nil {
			// Nowhere to log: keep buffering, keep serving.
			return nil
		}
		b.con.attach(f)
		b.log.Info("console attached late", "device", f.Name())
		return nil
	})

	if b.cfg.Crash == "init" {
		panic("actiond.crash=init: crashing on purpose")
	}
	b.step("cas disk", func() error {
		res, err := setupCAS(b.cfg, DefaultCASMountPoint, b.log)
		if res.Disk.Dev != "" {
			b.info["cas_disk"] = res.Disk.String()
			b.casDev = res.Disk.Dev
		}
		if err != nil {
			return err
		}
		b.mounted = append(b.mounted, DefaultCASMountPoint)
		b.info["cas_formatted"] = res.Formatted
		if res.Formatted {
			b.info["mkfs_s"] = res.MkfsTime.Seconds()
		}
		if res.FsckTime > 0 {
			b.info["fsck_s"] = res.FsckTime.Seconds()
			b.info["fsck_exit"] = res.FsckCode
		}
		b.log.Info("CAS disk mounted", "disk", res.Disk.String(), "on", DefaultCASMountPoint, "formatted", res.Formatted)
		return nil
	})
	b.step("runtimes disk", func() error {
		casMount := ""
		if b.casDev != "" {
			casMount = DefaultCASMountPoint
		}
		res, err := setupRuntimes(b.cfg, DefaultRuntimesMount, b.casDev, casMount, b.log)
		if res.Disk.Dev != "" {
			b.info["runtimes_disk"] = res.Disk.String()
		}
		b.mounted = append(b.mounted, res.Mounts...)
		if len(res.Info) > 0 {
			b.info["runtimes_prepared"] = res.Info
		}
		if err != nil {
			return err
		}
		if res.Disk.Dev != "" {
			var names []string
			for _, rt := range res.Runtimes {
				names = append(names, rt.Name)
			}
			b.log.Info("runtimes disk ready", "disk", res.Disk.String(), "on", DefaultRuntimesMount, "runtimes", names)
		}
		for name, reason := range res.Failed {
			b.log.Error("runtime unavailable; actions naming it fail", "runtime", name, "reason", reason)
		}
		b.state.Runtimes = res.Runtimes
		b.state.PendingRuntimes = res.Pending
		if len(res.Pending) > 0 {
			b.state.RuntimesDisk = res.Disk.Dev
			b.state.RuntimesDir = filepath.Join(DefaultCASMountPoint, casRuntimesDir)
			var names []string
			for _, p := range res.Pending {
				names = append(names, p.Entry.Name)
			}
			b.log.Info("runtimes to prepare on this first boot with them: the server prepares them in the background; actions naming one wait for it",
				"runtimes", names)
		}
		b.state.FailedRuntimes = res.Failed
		b.state.RuntimesCASBytes = res.CASBytes
		return nil
	})
	b.supervise()
}

// switchRoot leaves the initramfs's rootfs for a bind mount of it (see
// the switchRoot function). Failure is not fatal: the sandbox copes with a
// rootfs root, only less neatly.
func (b *boot) switchRoot() error {
	if err := os.MkdirAll("/proc", 0o755); err != nil {
		return err
	}
	if err := unix.Mount("proc", "/proc", "proc", 0, ""); err != nil {
		b.log.Warn("switch root: cannot mount /proc; staying on the initramfs root", "err", err)
		return nil
	}
	initramfs, err := rootIsInitramfs()
	_ = unix.Unmount("/proc", unix.MNT_DETACH)
	if err != nil || !initramfs {
		return nil
	}
	if err := switchRoot(); err != nil {
		b.log.Warn("switch root failed; staying on the initramfs root", "err", err)
	}
	return nil
}

func (b *boot) loadModules(release string) error {
	if !b.cfg.Modules {
		b.log.Info("module loading disabled (actiond.modules=0)")
		return nil
	}
	dir := filepath.Join("/lib/modules", release)
	if _, err := os.Stat("/proc/modules"); err != nil {
		b.log.Debug("kernel without module support; nothing to load")
		return nil
	}
	if _, err := os.Stat(filepath.Join(dir, "modules.dep")); err != nil {
		b.log.Warn("no modules for this kernel in the initramfs; relying on built-in drivers", "dir", dir)
		return nil
	}
	t := time.Now()
	res, err := loadModules(dir, b.log)
	if err != nil {
		return err
	}
	b.log.Info("modules loaded", "loaded", res.Loaded, "already_present", res.Present, "failed", res.Failed, "took", time.Since(t).Round(time.Millisecond))
	return nil
}

// startServer starts the server process: this binary, argv[0]
// serverArgv0, with the state in the environment and the console as its
// stdio.
func (b *boot) startServer() error {
	st := b.state
	st.Config = b.cfg
	st.CASMount = DefaultCASMountPoint
	st.Root = filepath.Join(DefaultCASMountPoint, "actiond")
	st.StateDir = sandboxStateDir
	st.Info = b.info
	st.Info["boot_steps_s"] = b.timings
	data, err := json.Marshal(st)
	if err != nil {
		return err
	}
	env := []string{"PATH=" + guestPath, "HOME=/", "LC_ALL=C", stateEnv + "=" + string(data)}
	pid, err := syscall.ForkExec("/proc/self/exe", []string{serverArgv0}, &syscall.ProcAttr{
		Dir:   "/",
		Env:   env,
		Files: []uintptr{0, 1, 2},
	})
	if err != nil {
		return fmt.Errorf("start the server: %w", err)
	}
	b.child = pid
	b.log.Info("server started", "pid", pid, "boot_steps_s", b.timings)
	return nil
}

// supervise starts the server, then waits for a reason to stop: a signal,
// the power button, or the server ending. It never returns.
func (b *boot) supervise() {
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, unix.SIGCHLD, unix.SIGTERM, unix.SIGINT, unix.SIGPWR, unix.SIGHUP)
	power, buttons := watchPowerButton(b.log)
	if len(buttons) > 0 {
		b.log.Debug("watching the power button", "devices", buttons)
	}
	b.step("server", b.startServer)

	var reason string
	var kill <-chan time.Time
	for {
		select {
		case s := <-sigs:
			if s == unix.SIGCHLD {
				if ws, ok := b.reap(); ok {
					b.child = 0
					if reason == "" {
						b.shutdown("the server exited unexpectedly: "+describeWait(ws), true)
					}
					b.shutdown(reason, false)
				}
				continue
			}
			if s == unix.SIGHUP {
				continue // no terminal to hang up; ignore
			}
			if reason == "" {
				reason = "signal " + s.String()
			}
		case r := <-power:
			if reason == "" {
				reason = r
			}
		case <-kill:
			b.log.Warn("the server did not stop in time; killing it", "pid", b.child)
			_ = unix.Kill(b.child, unix.SIGKILL)
			kill = nil
			continue
		}
		if kill == nil && b.child != 0 {
			b.log.Info("stopping the server", "reason", reason, "drain", b.cfg.DrainTimeout)
			_ = unix.Kill(b.child, unix.SIGTERM)
			kill = time.After(b.cfg.DrainTimeout + stopGrace)
		}
	}
}

// reap collects every exited child; it reports the server's status if the
// server was among them.
func (b *boot) reap() (unix.WaitStatus, bool) {
	var server unix.WaitStatus
	found := false
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return server, found
		}
		if pid == b.child && b.child != 0 {
			server, found = ws, true
		}
	}
}

func describeWait(ws unix.WaitStatus) string {
	switch {
	case ws.Exited():
		return fmt.Sprintf("exit status %d", ws.ExitStatus())
	case ws.Signaled():
		return "killed by " + ws.Signal().String()
	}
	return fmt.Sprintf("wait status %#x", uint32(ws))
}

// shutdown ends the VM: everything still running is terminated, data file
// systems are synced and unmounted, and the machine powers off. It never
// returns.
func (b *boot) shutdown(reason string, failed bool) {
	if failed {
		b.log.Error("shutting down after a failure", "reason", reason)
	} else {
		b.log.Info("shutting down", "reason", reason)
	}
	if b.child != 0 {
		_ = unix.Kill(b.child, unix.SIGKILL)
	}
	// Everything but PID 1 (the kernel never signals init with -1).
	if err := unix.Kill(-1, unix.SIGTERM); err == nil {
		b.waitAll(2 * time.Second)
		_ = unix.Kill(-1, unix.SIGKILL)
		b.waitAll(time.Second)
	}
	targets := make([]string, 0, len(b.mounted))
	for i := len(b.mounted) - 1; i >= 0; i-- {
		targets = append(targets, b.mounted[i])
	}
	unmountAll(targets, b.log)
	b.log.Info("powering off", "uptime", fmt.Sprintf("%.3fs", bootClock().Seconds()))
	err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	b.log.Error("power off failed; halting", "err", err)
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_HALT)
	for {
		// PID 1 must not exit. (A bare select{} could end in the
		// runtime's "all goroutines are asleep" fatal error.)
		time.Sleep(time.Hour)
	}
}

// waitAll reaps children until none are left or timeout passes.
func (b *boot) waitAll(timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, unix.ECHILD) {
			return
		}
		if pid <= 0 {
			time.Sleep(20 * time.Millisecond)
		}
	}
}
