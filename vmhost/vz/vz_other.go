//go:build !darwin

package vz

import (
	"errors"

	"github.com/actiond/actiond/vmhost"
)

// Config configures a Virtualization.framework machine.
type Config struct {
	vmhost.Config
}

// New fails: Virtualization.framework exists only on macOS.
func New(c Config) (vmhost.Machine, error) {
	return nil, errors.New("vmhost/vz: Virtualization.framework needs macOS; use the qemu backend")
}
