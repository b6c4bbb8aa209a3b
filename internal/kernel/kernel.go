//go:build unix

// Package kernel says which kernel this process runs on, for the
// few places whose behaviour depends on it (the guest's module directory,
// QEMU's probe cache, actiondfs' page-cache stores).
package kernel

import (
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Release returns the running kernel's release (uname -r), or "" if it
// cannot be read.
func Release() string {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return ""
	}
	return unix.ByteSliceToString(u.Release[:])
}

// Version parses the major and minor numbers of a kernel release
// ("6.1.0-50-amd64", "6.18.44-fc", "6.12rc3").
func Version(release string) (major, minor int, ok bool) {
	parts := strings.SplitN(release, ".", 3)
	if len(parts) < 2 {
		return 0, 0, false
	}
	major, err1 := strconv.Atoi(parts[0])
	digits := strings.IndexFunc(parts[1], func(r rune) bool { return r < '0' || r > '9' })
	if digits < 0 {
		digits = len(parts[1])
	}
	minor, err2 := strconv.Atoi(parts[1][:digits])
	return major, minor, err1 == nil && err2 == nil
}

// AtLeast reports whether the running kernel is major.minor or later
// (false if its release cannot be read).
func AtLeast(major, minor int) bool {
	ma, mi, ok := Version(Release())
	return ok && (ma > major || ma == major && mi >= minor)
}
