// Package bazelws holds what the end-to-end tests and the benchmarks both
// need around the Bazel workspace they build (testdata/bazel): a fresh copy
// of it, Bazel's process summary parsed, and the clean-up of what Bazel
// leaves read-only.
package bazelws

import (
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/actiond/actiond/internal/srctree"
)

// Copy copies the workspace src into dst (new or empty), leaving out the
// bazel-* convenience symlinks at its top and the generated inputs
// (many/inputs), and runs the copy's gen_inputs.sh, when it has one, to
// make those afresh. Files keep their permission bits; symlinks are copied
// as symlinks; any other file type is an error.
func Copy(src, dst string) error {
	err := srctree.Copy(src, dst, func(rel string, _ fs.DirEntry) bool {
		topLevel := !strings.Contains(rel, string(filepath.Separator))
		return topLevel && strings.HasPrefix(rel, "bazel-") || rel == filepath.Join("many", "inputs") // regenerated below
	})
	if err != nil {
		return fmt.Errorf("copying workspace %s: %w", src, err)
	}
	gen := filepath.Join(dst, "gen_inputs.sh")
	if _, err := os.Stat(gen); err == nil {
		if out, err := exec.Command("/bin/sh", gen, dst).CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %v\n%s", gen, err, out)
		}
	}
	return nil
}
