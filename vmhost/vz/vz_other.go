//go:build !darwin

package vz

import (
	"context"
	"errors"
	"log/slog"

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

// ReexecEntitled does nothing: entitlements are a macOS matter.
func ReexecEntitled(ctx context.Context, cacheDir string, log *slog.Logger) error { return nil }
