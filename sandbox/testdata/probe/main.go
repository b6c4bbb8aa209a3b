// Command probe is a small static tool the sandbox tests run inside
// sandboxes: it attempts escapes and reports what happened, and it doubles
// as a minimal userland for runtimes without a shell.
package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: probe command [args]")
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "echo":
		fmt.Println(strings.Join(args, " "))
	case "cat":
		b, err := os.ReadFile(args[0])
		check(err)
		os.Stdout.Write(b)
	case "write":
		check(os.WriteFile(args[0], []byte(args[1]), 0o644))
	case "exists":
		_, err := os.Lstat(args[0])
		fmt.Println(err == nil)
	case "btime": // when paths were created, and the probe's pid
		for _, p := range args {
			var stx unix.Statx_t
			check(unix.Statx(unix.AT_FDCWD, p, 0, unix.STATX_BTIME, &stx))
			if stx.Mask&unix.STATX_BTIME == 0 {
				fail(p + ": no birth time")
			}
			fmt.Printf("%s=%d.%09d ", p, stx.Btime.Sec, stx.Btime.Nsec)
		}
		fmt.Printf("pid=%d\n", os.Getpid())
	case "id":
		fmt.Printf("uid=%d euid=%d gid=%d egid=%d groups=%v\n", os.Getuid(), os.Geteuid(), os.Getgid(), os.Getegid(), must(os.Getgroups()))
	case "syscalls":
		syscalls()
	case "alloc":
		alloc(atoi(args[0]))
	case "spawn":
		spawn(atoi(args[0]))
	case "sleep":
		time.Sleep(time.Duration(atoi(args[0])) * time.Second)
	case "spin":
		spin(time.Duration(atoi(args[0])) * time.Millisecond)
	case "dial":
		c, err := net.DialTimeout("tcp", args[0], 2*time.Second)
		check(err)
		c.Close()
		fmt.Println("connected")
	case "kill-self":
		check(syscall.Kill(os.Getpid(), syscall.Signal(atoi(args[0]))))
		time.Sleep(time.Minute)
	default:
		fail("unknown command " + os.Args[1])
	}
}

// syscalls prints "name=result" for calls the sandbox's seccomp filter must
// refuse, each made with harmless arguments. Several of them succeed for an
// unprivileged user without the filter, so they test the filter itself.
func syscalls() {
	var buf [8]byte
	local := []unix.Iovec{{Base: &buf[0], Len: 8}}
	remote := []unix.RemoteIovec{{Base: uintptr(unsafe.Pointer(&buf[0])), Len: 8}}
	var uringParams [120]byte
	calls := []struct {
		name string
		call func() error
	}{
		{"unshare", func() error { return unix.Unshare(unix.CLONE_NEWUSER) }},
		{"mount", func() error { return unix.Mount("none", "/tmp", "tmpfs", 0, "") }},
		{"umount2", func() error { return unix.Unmount("/proc", unix.MNT_DETACH) }},
		{"pivot_root", func() error { return unix.PivotRoot("/tmp", "/tmp") }},
		{"fsopen", func() error { _, err := unix.Fsopen("tmpfs", 0); return err }},
		{"open_tree", func() error { _, err := unix.OpenTree(unix.AT_FDCWD, "/tmp", unix.OPEN_TREE_CLONE); return err }},
		{"setns", func() error { return unix.Setns(0, 0) }},
		{"bpf", func() error { return raw(unix.SYS_BPF, 0, 0, 0) }},
		{"io_uring_setup", func() error { return raw(unix.SYS_IO_URING_SETUP, 1, uintptr(unsafe.Pointer(&uringParams[0])), 0) }},
		{"keyctl", func() error { _, err := unix.KeyctlGetKeyringID(unix.KEY_SPEC_SESSION_KEYRING, false); return err }},
		{"add_key", func() error {
			_, err := unix.AddKey("user", "probe", []byte("x"), unix.KEY_SPEC_PROCESS_KEYRING)
			return err
		}},
		{"ptrace", func() error { return raw(unix.SYS_PTRACE, unix.PTRACE_PEEKDATA, 1, 0) }},
		{"process_vm_readv", func() error { _, err := unix.ProcessVMReadv(os.Getpid(), local, remote, 0); return err }},
		{"perf_event_open", func() error { return raw(unix.SYS_PERF_EVENT_OPEN, 0, 0, 0) }},
		{"userfaultfd", func() error { return raw(unix.SYS_USERFAULTFD, 1 /* UFFD_USER_MODE_ONLY */, 0, 0) }},
		{"init_module", func() error { return raw(unix.SYS_INIT_MODULE, 0, 0, 0) }},
		{"kexec_load", func() error { return raw(unix.SYS_KEXEC_LOAD, 0, 0, 0) }},
		{"clone3", func() error { return raw(unix.SYS_CLONE3, 0, 0, 0) }},
		{"clone_newuser", func() error {
			cmd := exec.Command("/proc/self/exe", "echo")
			cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: unix.CLONE_NEWUSER}
			return cmd.Run()
		}},
		{"socket_vsock", func() error { return socket(unix.AF_VSOCK) }},
		{"socket_inet", func() error { return socket(unix.AF_INET) }},
	}
	for _, c := range calls {
		err := c.call()
		res := "ok"
		if err != nil {
			res = errnoName(err)
		}
		fmt.Printf("%s=%s\n", c.name, res)
	}
}

func raw(nr, a1, a2, a3 uintptr) error {
	r, _, e := unix.Syscall(nr, a1, a2, a3)
	if e != 0 {
		return e
	}
	if nr == unix.SYS_IO_URING_SETUP || nr == unix.SYS_USERFAULTFD {
		unix.Close(int(r))
	}
	return nil
}

func socket(domain int) error {
	fd, err := unix.Socket(domain, unix.SOCK_STREAM, 0)
	if err == nil {
		unix.Close(fd)
	}
	return err
}

func errnoName(err error) string {
	for {
		if e, ok := err.(syscall.Errno); ok {
			return unix.ErrnoName(e)
		}
		u, ok := err.(interface{ Unwrap() error })
		if !ok {
			return err.Error()
		}
		err = u.Unwrap()
	}
}

// alloc allocates and touches mib MiB, one MiB at a time.
func alloc(mib int) {
	var keep [][]byte
	for i := range mib {
		b := make([]byte, 1<<20)
		for j := 0; j < len(b); j += 4096 {
			b[j] = byte(i)
		}
		keep = append(keep, b)
	}
	fmt.Println("allocated", len(keep), "MiB")
}

// spawn starts n sleeping copies of itself and reports how many started.
func spawn(n int) {
	started, failed := 0, 0
	var firstErr error
	for range n {
		cmd := exec.Command("/proc/self/exe", "sleep", "30")
		if err := cmd.Start(); err != nil {
			failed++
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		started++
	}
	fmt.Printf("started=%d failed=%d err=%v\n", started, failed, firstErr)
}

// spin burns CPU for d of wall time and prints the CPU time it got, in ms.
func spin(d time.Duration) {
	end := time.Now().Add(d)
	x := 0
	for time.Now().Before(end) {
		for i := range 100000 {
			x += i
		}
	}
	var ru unix.Rusage
	check(unix.Getrusage(unix.RUSAGE_SELF, &ru))
	cpu := time.Duration(ru.Utime.Nano()+ru.Stime.Nano()) * time.Nanosecond
	fmt.Printf("cpu_ms=%d x=%d\n", cpu.Milliseconds(), x%2)
}

func atoi(s string) int {
	n, err := strconv.Atoi(s)
	check(err)
	return n
}

func must[T any](v T, err error) T {
	check(err)
	return v
}

func check(err error) {
	if err != nil {
		fail(err.Error())
	}
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "probe:", msg)
	os.Exit(1)
}
