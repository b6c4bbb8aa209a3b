//go:build linux

package sandboxinit

// Network namespaces for actions. Each action gets a network namespace in
// which only lo exists, and no two actions may share state through one.
// Making a namespace and having the kernel tear it down again is the
// largest part of a kept helper's CPU per action, and most actions (a
// compile, a genrule) never use the network. So a kept helper keeps the
// namespace of its last action and gives it to the next one when nothing
// used it: no packet crossed an interface and no socket is open or
// lingers. For everything an action can change there (it holds no
// capabilities: interfaces, addresses, routes, filters and the namespace's
// sysctls are beyond it), such a namespace is as new; any other gets
// replaced.

import (
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// keptNetns is the network namespace a kept helper hands from one action
// to the next (fd -1: none yet). Only the thread setting up an action uses
// it, one action at a time.
type keptNetns struct{ fd int }

// enter puts the calling thread, which must be locked to its goroutine,
// into the network namespace of the next action: k's when no action used
// it, else a new one with lo up, which k keeps for the actions after. A
// nil k (a helper for a single action) always makes a new one.
func (k *keptNetns) enter() error {
	if k != nil && k.fd >= 0 {
		if err := unix.Setns(k.fd, unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("entering the kept network namespace: %w", err)
		}
		if netnsUnused() {
			return nil
		}
	}
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("network namespace: %w", err)
	}
	if err := loopbackUp(); err != nil {
		return err
	}
	if k == nil {
		return nil
	}
	fd, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("keeping the network namespace: %w", err)
	}
	if k.fd >= 0 {
		unix.Close(k.fd)
	}
	k.fd = fd
	return nil
}

// netnsUnused reports whether nothing used the calling thread's network
// namespace: every counter of every interface is zero (no connection,
// datagram or ping was ever made in it) and no socket of any family is
// open, orphaned or in TIME_WAIT. Anything it cannot read counts as used.
func netnsUnused() bool {
	dev, err := os.ReadFile("/proc/thread-self/net/dev")
	if err != nil {
		return false
	}
	lines := strings.Split(string(dev), "\n")
	if len(lines) < 3 { // two header lines, then an interface per line
		return false
	}
	for _, l := range lines[2:] {
		_, counters, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		for _, c := range strings.Fields(counters) {
			if c != "0" {
				return false
			}
		}
	}
	// "sockets: used" counts the namespace's sockets of every family
	// (unix and netlink too); TIME_WAIT ones are counted apart.
	for _, name := range []string{"/proc/thread-self/net/sockstat", "/proc/thread-self/net/sockstat6"} {
		b, err := os.ReadFile(name)
		if err != nil {
			if name == "/proc/thread-self/net/sockstat6" && os.IsNotExist(err) {
				continue // no IPv6 in this kernel
			}
			return false
		}
		for _, l := range strings.Split(string(b), "\n") {
			_, rest, ok := strings.Cut(l, ":")
			if !ok {
				continue
			}
			f := strings.Fields(rest)
			for i := 0; i+1 < len(f); i += 2 {
				switch f[i] {
				case "used", "inuse", "orphan", "tw":
					if f[i+1] != "0" {
						return false
					}
				}
			}
		}
	}
	return true
}

// loopbackUp brings up lo, the only interface in a new network namespace.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("loopback: get flags: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("loopback: set flags: %w", err)
	}
	return nil
}
