// Execroot preparation: checking an action's execroot and paths, and
// handing the directories it may write to the action's user.

package sandbox

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/actiond/actiond/executor"
)

// prepareExecRoot validates the paths in spec and gives the sandbox user
// ownership of the directories it may write. It returns the writable
// directories, parents before children.
func (s *Sandbox) prepareExecRoot(spec *executor.RunSpec, user executor.User) ([]string, error) {
	if len(spec.Args) == 0 {
		return nil, errors.New("empty command")
	}
	if !filepath.IsAbs(spec.ExecRoot) {
		return nil, fmt.Errorf("execroot %q is not an absolute path", spec.ExecRoot)
	}
	fi, err := os.Stat(spec.ExecRoot)
	if err != nil {
		return nil, fmt.Errorf("execroot: %w", err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("execroot %s is not a directory", spec.ExecRoot)
	}
	if fi.Mode().Perm()&0o001 == 0 {
		return nil, fmt.Errorf("execroot %s (mode %v) is not searchable by the sandbox user", spec.ExecRoot, fi.Mode().Perm())
	}
	if wd := spec.WorkingDirectory; wd != "" && !filepath.IsLocal(wd) {
		return nil, fmt.Errorf("working directory %q is not a relative path inside the execroot", wd)
	}
	root, err := unix.Open(spec.ExecRoot, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open execroot: %w", err)
	}
	defer unix.Close(root)

	dirs := make([]string, 0, len(spec.WritableDirs))
	for _, d := range spec.WritableDirs {
		if !filepath.IsLocal(d) {
			return nil, fmt.Errorf("writable dir %q is not a relative path inside the execroot", d)
		}
		d = filepath.Clean(d)
		if err := openWritableDir(root, d, user.GID); err != nil {
			return nil, err
		}
		dirs = append(dirs, d)
	}
	slices.SortFunc(dirs, func(a, b string) int { return len(a) - len(b) })
	dirs = slices.Compact(dirs)

	if spec.WritableInputs {
		err := filepath.WalkDir(spec.ExecRoot, func(path string, d fs.DirEntry, err error) error {
			if err != nil || !d.IsDir() {
				return err
			}
			if err := os.Lchown(path, user.UID, user.GID); err != nil {
				return err
			}
			return os.Chmod(path, 0o755) // the owner's; nobody else's
		})
		if err != nil {
			return nil, fmt.Errorf("making execroot writable: %w", err)
		}
	}
	return dirs, nil
}

// openWritableDir gives the directory rel under root to group gid, mode
// 01770, refusing symlinks anywhere in rel so that an input tree cannot
// redirect it.
func openWritableDir(root int, rel string, gid int) error {
	fd, err := unix.Openat2(root, rel, &unix.OpenHow{
		Flags:   unix.O_RDONLY | unix.O_DIRECTORY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	})
	if err != nil {
		return fmt.Errorf("writable dir %q: %w", rel, err)
	}
	defer unix.Close(fd)
	if err := unix.Fchown(fd, -1, gid); err != nil {
		return fmt.Errorf("writable dir %q: chown: %w", rel, err)
	}
	if err := unix.Fchmod(fd, 0o1770); err != nil {
		return fmt.Errorf("writable dir %q: chmod: %w", rel, err)
	}
	return nil
}
