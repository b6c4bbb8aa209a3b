//go:build !unix

package vmpayload

// lockDir is a no-op where flock is missing (the payload builder runs on
// macOS and Linux).
func lockDir(dir string, waiting func()) (func(), error) { return func() {}, nil }
