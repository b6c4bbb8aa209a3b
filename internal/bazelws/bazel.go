package bazelws

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
)

var processesRE = regexp.MustCompile(`(?m)^INFO: ([0-9,]+) process(?:es)?(?::\s*(.*?))?\.\s*$`)

// ParseProcesses parses Bazel's last process summary line in output, e.g.
//
//	INFO: 23 processes: 1 internal, 22 remote.
//	INFO: 22 processes: 21 remote cache hit, 1 internal.
//
// into {"total": 23, "internal": 1, "remote": 22}. Keys are the strategy
// names as Bazel prints them ("remote cache hit", "disk cache hit", "local",
// "linux-sandbox", "remote", "worker", ...). It returns nil when there is no
// summary line.
func ParseProcesses(output string) map[string]int {
	ms := processesRE.FindAllStringSubmatch(output, -1)
	if len(ms) == 0 {
		return nil
	}
	m := ms[len(ms)-1]
	total, err := strconv.Atoi(strings.ReplaceAll(m[1], ",", ""))
	if err != nil {
		return nil
	}
	res := map[string]int{"total": total}
	if m[2] == "" {
		return res
	}
	for _, part := range strings.Split(m[2], ", ") {
		num, kind, ok := strings.Cut(strings.TrimSpace(part), " ")
		if !ok {
			continue
		}
		if n, err := strconv.Atoi(strings.ReplaceAll(num, ",", "")); err == nil {
			res[kind] += n
		}
	}
	return res
}

// MakeWritable gives the owner full access to every directory under root
// that lacks it, so that what Bazel left read-only (its output base, the
// execroots of linux-sandbox) can be deleted. Errors are ignored: it is
// best effort before a removal that reports its own.
func MakeWritable(root string) {
	filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			if info, err := d.Info(); err == nil && info.Mode().Perm()&0o700 != 0o700 {
				os.Chmod(path, info.Mode().Perm()|0o700)
			}
		}
		return nil
	})
}
