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

func deviceUsable(path string) error { return errNotLinux }

func hostKernelRelease() string { return "" }

func pickCID() (uint32, error) { return 0, errNotLinux }

func dialVsock(ctx context.Context, cid, port uint32) (net.Conn, error) { return nil, errNotLinux }
