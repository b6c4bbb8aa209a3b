package sandboxinit

import (
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// deniedSyscalls fail with EPERM inside the sandbox: they reach kernel
// surface an action never needs (namespaces, mounts, BPF, io_uring, keyrings,
// modules, kexec, perf, userfaultfd) or let it inspect other processes.
var deniedSyscalls = []uintptr{
	unix.SYS_BPF,
	unix.SYS_IO_URING_SETUP, unix.SYS_IO_URING_ENTER, unix.SYS_IO_URING_REGISTER,
	unix.SYS_MOUNT, unix.SYS_UMOUNT2, unix.SYS_PIVOT_ROOT,
	unix.SYS_MOVE_MOUNT, unix.SYS_FSOPEN, unix.SYS_FSCONFIG, unix.SYS_FSMOUNT, unix.SYS_FSPICK,
	unix.SYS_OPEN_TREE, unix.SYS_OPEN_TREE_ATTR, unix.SYS_MOUNT_SETATTR,
	unix.SYS_PTRACE, unix.SYS_PROCESS_VM_READV, unix.SYS_PROCESS_VM_WRITEV,
	unix.SYS_KEYCTL, unix.SYS_ADD_KEY, unix.SYS_REQUEST_KEY,
	unix.SYS_KEXEC_LOAD, unix.SYS_KEXEC_FILE_LOAD,
	unix.SYS_INIT_MODULE, unix.SYS_FINIT_MODULE, unix.SYS_DELETE_MODULE,
	unix.SYS_UNSHARE, unix.SYS_SETNS,
	unix.SYS_PERF_EVENT_OPEN, unix.SYS_USERFAULTFD,
}

// cloneNamespaceFlags are the clone(2) flags that create namespaces; clone
// with any of them fails with EPERM, like unshare.
const cloneNamespaceFlags = unix.CLONE_NEWNS | unix.CLONE_NEWUTS | unix.CLONE_NEWIPC | unix.CLONE_NEWUSER |
	unix.CLONE_NEWPID | unix.CLONE_NEWNET | unix.CLONE_NEWCGROUP

// Supported reports whether the sandbox can run on this architecture (it
// needs a seccomp filter for it).
func Supported() error {
	_, err := seccompFilter()
	return err
}

// auditArch is the AUDIT_ARCH_* value of the architecture this binary runs
// as; syscalls made under any other ABI (i386, x32, arm32) are refused.
func auditArch() (uint32, error) {
	switch runtime.GOARCH {
	case "amd64":
		return unix.AUDIT_ARCH_X86_64, nil
	case "arm64":
		return unix.AUDIT_ARCH_AARCH64, nil
	}
	return 0, fmt.Errorf("seccomp filter not available on %s", runtime.GOARCH)
}

// Offsets into struct seccomp_data. Arguments are 64-bit; on these
// little-endian architectures the low half comes first.
const (
	offNr   = 0
	offArch = 4
	offArg0 = 16
)

// seccompFilter assembles the BPF program:
//
//	foreign architecture             → kill the process
//	x32 ABI (amd64)                  → EPERM
//	deniedSyscalls                   → EPERM
//	clone3                           → ENOSYS (its flags are out of reach of
//	                                   BPF; libc falls back to clone)
//	clone with namespace flags       → EPERM
//	socket(AF_VSOCK, ...)            → EPERM
//	everything else                  → allow
func seccompFilter() ([]unix.SockFilter, error) {
	arch, err := auditArch()
	if err != nil {
		return nil, err
	}
	const (
		ld   = unix.BPF_LD | unix.BPF_W | unix.BPF_ABS
		jeq  = unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K
		jge  = unix.BPF_JMP | unix.BPF_JGE | unix.BPF_K
		jset = unix.BPF_JMP | unix.BPF_JSET | unix.BPF_K
		ret  = unix.BPF_RET | unix.BPF_K
	)
	stmt := func(code uint16, k uint32) unix.SockFilter { return unix.SockFilter{Code: code, K: k} }
	jump := func(code uint16, k uint32, jt, jf uint8) unix.SockFilter {
		return unix.SockFilter{Code: code, K: k, Jt: jt, Jf: jf}
	}
	errno := func(e unix.Errno) unix.SockFilter { return stmt(ret, unix.SECCOMP_RET_ERRNO|uint32(e)) }
	allow := stmt(ret, unix.SECCOMP_RET_ALLOW)

	prog := []unix.SockFilter{
		stmt(ld, offArch),
		jump(jeq, arch, 1, 0),
		stmt(ret, unix.SECCOMP_RET_KILL_PROCESS),
		stmt(ld, offNr),
	}
	if runtime.GOARCH == "amd64" {
		const x32SyscallBit = 0x40000000
		prog = append(prog, jump(jge, x32SyscallBit, 0, 1), errno(unix.EPERM))
	}
	for _, nr := range deniedSyscalls {
		prog = append(prog, jump(jeq, uint32(nr), 0, 1), errno(unix.EPERM))
	}
	prog = append(prog, jump(jeq, unix.SYS_CLONE3, 0, 1), errno(unix.ENOSYS))
	// Argument checks: with A = nr, each block either returns or falls
	// through to the next with A unchanged.
	argCheck := func(nr uintptr, test unix.SockFilter) []unix.SockFilter {
		return []unix.SockFilter{
			jump(jeq, uint32(nr), 0, 4),
			stmt(ld, offArg0),
			test, // true → next (EPERM), false → skip it (allow)
			errno(unix.EPERM),
			allow,
		}
	}
	prog = append(prog, argCheck(unix.SYS_CLONE, jump(jset, cloneNamespaceFlags, 0, 1))...)
	prog = append(prog, argCheck(unix.SYS_SOCKET, jump(jeq, unix.AF_VSOCK, 0, 1))...)
	prog = append(prog, allow)
	return prog, nil
}

// installSeccomp loads the filter into the calling thread, which forks the
// command, and only that thread: the helper's other threads go on making
// namespaces and mounts for later actions. no_new_privs must already be set.
func installSeccomp() error {
	filter, err := seccompFilter()
	if err != nil {
		return err
	}
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	if _, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, 0, uintptr(unsafe.Pointer(&prog))); errno != 0 {
		return fmt.Errorf("installing seccomp filter: %w", errno)
	}
	return nil
}
