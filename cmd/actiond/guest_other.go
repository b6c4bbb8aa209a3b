//go:build !linux

package main

import "errors"

// runGuest exists only in Linux builds: the guest init runs inside the
// Linux VM, never on the macOS host.
func runGuest([]string) error {
	return errors.New("the guest init runs only inside the Linux VM")
}
