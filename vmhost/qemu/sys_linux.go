package qemu

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"unsafe"

	"github.com/actiond/actiond/internal/kernel"
	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"
)

// sysProcAttr kills QEMU when the host process dies, so no VM outlives
// serve-vm.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
}

// deviceUsable checks that the device node path (/dev/kvm,
// /dev/vhost-vsock) can be opened read-write: its module is loaded and we
// may use it.
func deviceUsable(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("%s unusable: %w", path, err)
	}
	f.Close()
	return nil
}

func hostKernelRelease() string { return kernel.Release() }

// vhostVsockSetGuestCID is VHOST_VSOCK_SET_GUEST_CID, _IOW(0xAF, 0x60, __u64).
const vhostVsockSetGuestCID = 0x4008af60

// pickCID returns a guest context ID no other VM on this host uses: it
// claims random CIDs on a vhost-vsock handle until one is free, then
// releases it for QEMU (a race with another VM starting in between makes
// QEMU fail with "unable to set guest cid").
func pickCID() (uint32, error) {
	f, err := os.OpenFile("/dev/vhost-vsock", os.O_RDWR, 0)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var b [4]byte
	for range 16 {
		if _, err := rand.Read(b[:]); err != nil {
			return 0, err
		}
		cid := uint64(binary.LittleEndian.Uint32(b[:])%(1<<30)) + 3
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), vhostVsockSetGuestCID, uintptr(unsafe.Pointer(&cid)))
		if errno == 0 {
			return uint32(cid), nil
		}
		if errno != unix.EADDRINUSE {
			return 0, fmt.Errorf("claim vsock cid: %w", errno)
		}
	}
	return 0, errors.New("no free vsock cid after 16 tries")
}

// dialVsock connects to the guest's port; ctx bounds the attempt.
func dialVsock(ctx context.Context, cid, port uint32) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		c, err := vsock.Dial(cid, port, nil)
		ch <- result{c, err}
	}()
	select {
	case r := <-ch:
		return r.c, r.err
	case <-ctx.Done():
		go func() {
			if r := <-ch; r.c != nil {
				r.c.Close()
			}
		}()
		return nil, ctx.Err()
	}
}
