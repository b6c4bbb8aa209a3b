package executor

// The rules a Directory message of an input tree must follow, in one place
// for everything that reads input trees: LoadInputTree here, and actiondfs
// (package fs) for the directories it reads from the CAS itself.

import (
	"errors"
	"fmt"
	"strings"

	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
)

// SymlinkAbsolutePathStrategy is how this server treats symlinks with
// absolute targets, in input trees (ValidateDirectory) and in outputs. It
// is what the Capabilities service must advertise: DISALLOWED, because an
// absolute target points outside the input root, into whatever the
// sandbox shows at that path.
const SymlinkAbsolutePathStrategy = repb.SymlinkAbsolutePathStrategy_DISALLOWED

// ValidateDirectory enforces the REAPI rules on one Directory of an input
// tree, which lookups by name rely on: names are single path components,
// entries are sorted by name within each kind, no name is used twice
// across files, directories and symlinks, digests are valid, and symlink
// targets are not empty (nor absolute, unless SymlinkAbsolutePathStrategy
// allows them).
func ValidateDirectory(dir *repb.Directory) error {
	seen := make(map[string]string)
	prev := "" // the name before, within the kind being checked
	// entry checks an entry's name and, for files and directories, its
	// digest.
	entry := func(kind, name string, digest *repb.Digest) error {
		if err := validName(name); err != nil {
			return fmt.Errorf("%s %q: %v", kind, name, err)
		}
		if prev != "" && name <= prev {
			return fmt.Errorf("%s %q is not sorted after %q (entries must be sorted and unique)", kind, name, prev)
		}
		if other, ok := seen[name]; ok {
			return fmt.Errorf("name %q is used by a %s and a %s", name, other, kind)
		}
		seen[name], prev = kind, name
		if kind == "symlink" {
			return nil
		}
		if _, err := cas.FromProto(digest); err != nil {
			return fmt.Errorf("%s %q: %v", kind, name, err)
		}
		return nil
	}
	for _, f := range dir.Files {
		if err := entry("file", f.Name, f.Digest); err != nil {
			return err
		}
	}
	prev = ""
	for _, d := range dir.Directories {
		if err := entry("directory", d.Name, d.Digest); err != nil {
			return err
		}
	}
	prev = ""
	for _, s := range dir.Symlinks {
		if err := entry("symlink", s.Name, nil); err != nil {
			return err
		}
		if s.Target == "" {
			return fmt.Errorf("symlink %q has an empty target", s.Name)
		}
		if strings.HasPrefix(s.Target, "/") && SymlinkAbsolutePathStrategy != repb.SymlinkAbsolutePathStrategy_ALLOWED {
			return fmt.Errorf("symlink %q has absolute target %q (this server's symlink_absolute_path_strategy is %s)", s.Name, s.Target, SymlinkAbsolutePathStrategy)
		}
	}
	return nil
}

func validName(name string) error {
	switch {
	case name == "":
		return errors.New("empty name")
	case name == "." || name == "..":
		return errors.New("not a valid file name")
	case strings.ContainsRune(name, '/'):
		return errors.New("contains '/'")
	case strings.ContainsRune(name, 0):
		return errors.New("contains a NUL byte")
	}
	return nil
}
