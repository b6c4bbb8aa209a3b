//go:build !linux

package fs

import (
	"context"
	"errors"
	"log/slog"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/executor"
)

var errUnsupported = errors.New("actiondfs needs Linux")

// Available reports whether actiondfs works here: never off Linux.
func Available() error { return errUnsupported }

// InputRoot is not available off Linux.
type InputRoot struct{}

// Option configures an InputRoot.
type Option func(*struct{})

// WithLogger is accepted for API compatibility.
func WithLogger(*slog.Logger) Option { return func(*struct{}) {} }

// WithDirCacheSize is accepted for API compatibility.
func WithDirCacheSize(int64) Option { return func(*struct{}) {} }

// WithOpenBlobs is accepted for API compatibility.
func WithOpenBlobs(int) Option { return func(*struct{}) {} }

// WithSandboxUser is accepted for API compatibility.
func WithSandboxUser(uid, gid uint32) Option { return func(*struct{}) {} }

// NewInputRoot fails off Linux.
func NewInputRoot(cas.LocalStore, string, ...Option) (*InputRoot, error) { return nil, errUnsupported }

// Name implements executor.InputRoot.
func (*InputRoot) Name() string { return "fuse" }

// Stage implements executor.InputRoot.
func (*InputRoot) Stage(context.Context, *executor.InputTree, string) (func() error, error) {
	return nil, errUnsupported
}

// StageWithOptions implements executor.OptionsInputRoot.
func (*InputRoot) StageWithOptions(context.Context, *executor.InputTree, string, executor.StageOptions) (*executor.StagedRoot, error) {
	return nil, errUnsupported
}

// Close does nothing.
func (*InputRoot) Close() error { return nil }
