//go:build !linux

package sandbox

import (
	"context"
	"errors"

	"github.com/actiond/actiond/executor"
)

// errUnsupported is returned everywhere but on Linux: the sandbox is built on
// Linux namespaces, cgroups and seccomp.
var errUnsupported = errors.New("sandbox: only supported on Linux")

// Sandbox is unavailable on this platform.
type Sandbox struct{}

var _ executor.Sandbox = (*Sandbox)(nil)

// New fails: the sandbox needs Linux.
func New(Config) (*Sandbox, error) { return nil, errUnsupported }

// Run fails: the sandbox needs Linux.
func (*Sandbox) Run(context.Context, *executor.RunSpec) (*executor.RunResult, error) {
	return nil, errUnsupported
}

// Runtimes returns nothing: the sandbox needs Linux.
func (*Sandbox) Runtimes() []string { return nil }

// Close does nothing.
func (*Sandbox) Close() error { return nil }

// LoadRuntimes fails: the sandbox needs Linux.
func LoadRuntimes(imageDir, mountDir string) ([]Runtime, error) { return nil, errUnsupported }

// MountImage fails: the sandbox needs Linux.
func MountImage(image, dir string) error { return errUnsupported }
