//go:build !linux

package qemu

import (
	"context"
	"errors"
	"net"
	"syscall"
)

var errNotLinux = errors.New("vmhost/qemu: only Linux hosts are supported")

func sysProcAttr() *syscall.SysProcAttr { return nil }

func kvmDeviceUsable() error { return errNotLinux }

func hostKernelRelease() string { return "" }

func vhostVsockUsable() error { return errNotLinux }

func pickCID() (uint32, error) { return 0, errNotLinux }

func dialVsock(ctx context.Context, cid, port uint32) (net.Conn, error) { return nil, errNotLinux }
