// Package mountinfo parses /proc/self/mountinfo, which actiondfs (stale
// mounts), the sandbox (cgroup hierarchies, runtime images) and the
// sandbox helper (mounts to drop) all read.
package mountinfo

import (
	"bufio"
	"bytes"
	"os"
	"slices"
	"strconv"
	"strings"
)

// Entry is one mount.
type Entry struct {
	Root         string // the mounted directory within its file system
	Point        string // where it is mounted
	FSType       string // e.g. "fuse.actiondfs", "cgroup2"
	Source       string // e.g. "/dev/loop2"
	SuperOptions string // the file system's options, e.g. "rw,memory"
	// Propagation holds the optional fields, e.g. "shared:1" or "master:3";
	// none for a private mount.
	Propagation []string
}

// Shared reports whether the mount is in a peer group (mounts and unmounts
// under it propagate to its peers).
func (e Entry) Shared() bool {
	for _, f := range e.Propagation {
		if strings.HasPrefix(f, "shared:") {
			return true
		}
	}
	return false
}

// RootShared reports whether / has shared propagation in the calling
// process's mount namespace, as on every systemd host.
func RootShared() (bool, error) {
	entries, err := Read()
	if err != nil {
		return false, err
	}
	for i := len(entries) - 1; i >= 0; i-- { // the topmost mount on /
		if entries[i].Point == "/" {
			return entries[i].Shared(), nil
		}
	}
	return false, nil
}

// Read parses the calling process's /proc/self/mountinfo.
func Read() ([]Entry, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	return Parse(data), nil
}

// Parse parses mountinfo text, skipping malformed lines; later entries are
// mounted on top of earlier ones at the same point.
func Parse(data []byte) []Entry {
	var out []Entry
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		// The optional fields end with "-" somewhere after the sixth.
		sep := slices.Index(f, "-")
		if sep < 6 || len(f) < sep+4 {
			continue
		}
		out = append(out, Entry{
			Root:         Unescape(f[3]),
			Point:        Unescape(f[4]),
			FSType:       f[sep+1],
			Source:       Unescape(f[sep+2]),
			SuperOptions: f[sep+3],
			Propagation:  slices.Clone(f[6:sep]),
		})
	}
	return out
}

// Unescape decodes the \ooo escapes mountinfo uses for spaces, tabs,
// newlines and backslashes.
func Unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
