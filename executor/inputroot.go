package executor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/ctxio"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
)

// InputRoot materialises an input tree as a directory the sandbox can show
// the command. Implementations: hardlinks or copies from the CAS here,
// actiondfs (package fs) for a lazy FUSE tree.
type InputRoot interface {
	// Stage makes tree visible at dir (which does not exist yet) and
	// returns a function that undoes whatever Stage set up (unmounts); the
	// executor removes dir afterwards. Files created under dir by the
	// command must be regular files in dir, on the CAS's file system.
	Stage(ctx context.Context, tree *InputTree, dir string) (cleanup func() error, err error)
	// Name is the strategy name for logs and metrics ("hardlink", "copy", "fuse").
	Name() string
}

// StageOptions tell an OptionsInputRoot about the action being staged.
type StageOptions struct {
	// MutatesInputs is the mutates_inputs platform property: the command
	// may modify, replace and remove its input files.
	MutatesInputs bool
	// User, if known, is who the command will run as (see UserSandbox);
	// a root that checks callers itself lets only this user and root in.
	User *User
}

// StagedRoot is an input root made visible by an OptionsInputRoot.
type StagedRoot struct {
	// Dir, if set, is where the root was staged instead of the directory
	// asked for (an input root with mounts made ahead of time); the
	// executor uses it as the execroot. It must be reachable by the
	// sandbox and writable by nobody else.
	Dir string
	// Cleanup undoes the staging (unmounts); required. The executor removes
	// the directory afterwards.
	Cleanup func() error
	// SelfProtected means the root enforces its own access rules (actiondfs
	// refuses writes to inputs and stages new files; its mutates_inputs
	// mode is an overlay the command may write anywhere). The executor then
	// makes the whole execroot writable for the sandbox (WritableDirs gets
	// "."), never sets RunSpec.WritableInputs and does not chmod inputs.
	SelfProtected bool
	// OutputPath, if set, maps a regular file's path relative to the
	// execroot to the file holding its bytes on the CAS's file system, so
	// outputs move into the CAS by rename instead of being read through the
	// root; "" means use the path under the execroot. Called only after
	// the command has finished.
	OutputPath func(rel string) string
	// Report, if set, lists what the command was refused (e.g. writing an
	// input file without mutates_inputs), one line each, for the user.
	// Called only after the command has finished.
	Report func() []string
}

// OptionsInputRoot is an InputRoot that needs to know more about the action
// than the tree (mutates_inputs) or can tell the executor more about the
// staged root. The executor calls StageWithOptions instead of Stage when
// its InputRoot implements it; implementations must not need the executor
// to switch to CopyInputRoot for mutates_inputs.
type OptionsInputRoot interface {
	InputRoot
	StageWithOptions(ctx context.Context, tree *InputTree, dir string, opts StageOptions) (*StagedRoot, error)
}

// LinkInputRoot hardlinks every input file from a local CAS; executable
// files link to the store's separate executable copy, so no shared blob's
// mode is ever changed.
type LinkInputRoot struct{ Store cas.LocalStore }

// Name implements InputRoot.
func (LinkInputRoot) Name() string { return "hardlink" }

// Stage implements InputRoot.
func (r LinkInputRoot) Stage(ctx context.Context, tree *InputTree, dir string) (func() error, error) {
	err := materialise(ctx, tree, dir, func(d cas.Digest, exec bool, dst string) error {
		if d.IsEmpty() {
			// Created, not linked: linking would make every empty input
			// of every concurrent action a name of one inode, and ext4
			// refuses a 65,001st link. An empty file costs no copy.
			return createInput(dst, exec, nil)
		}
		src, err := r.Store.BlobPath(d, exec)
		if err != nil {
			return missingAsPrecondition(d, err)
		}
		err = os.Link(src, dst)
		if errors.Is(err, syscall.EMLINK) {
			// A blob more inputs name at once than the file system
			// allows links (a common header in many actions): this
			// input gets a copy.
			f, oerr := os.Open(src)
			if oerr != nil {
				return missingAsPrecondition(d, oerr)
			}
			defer f.Close()
			return createInput(dst, exec, f)
		}
		return err
	})
	return func() error { return nil }, err
}

// createInput creates the read-only input file dst with the bytes of src
// (none when src is nil).
func createInput(dst string, exec bool, src io.Reader) error {
	mode := os.FileMode(0o444)
	if exec {
		mode = 0o555
	}
	f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if src != nil {
		if _, err := io.Copy(f, src); err != nil {
			f.Close()
			return err
		}
	}
	return f.Close()
}

// missingAsPrecondition reports a blob that went missing while staging
// (evicted, or gone from a remote CAS) as MISSING, which makes the client
// upload it again, rather than as NOT_FOUND or INTERNAL.
func missingAsPrecondition(d cas.Digest, err error) error {
	if errors.Is(err, cas.ErrNotFound) || errors.Is(err, fs.ErrNotExist) {
		return &MissingBlobsError{Digests: []cas.Digest{d}}
	}
	return err
}

// CopyInputRoot copies every input file out of the CAS; for stores that are
// not local files or when hardlinks do not work (another file system).
type CopyInputRoot struct{ Store cas.Store }

// Name implements InputRoot.
func (CopyInputRoot) Name() string { return "copy" }

// Stage implements InputRoot.
func (r CopyInputRoot) Stage(ctx context.Context, tree *InputTree, dir string) (func() error, error) {
	err := materialise(ctx, tree, dir, func(d cas.Digest, exec bool, dst string) error {
		if d.IsEmpty() {
			return createInput(dst, exec, nil)
		}
		src, err := r.Store.Get(ctx, d, 0)
		if err != nil {
			return missingAsPrecondition(d, err)
		}
		defer src.Close()
		return createInput(dst, exec, ctxio.Reader(ctx, src))
	})
	return func() error { return nil }, err
}

type fileJob struct {
	d    cas.Digest
	exec bool
	dst  string
}

// materialise creates the directories and symlinks of tree under dir and
// hands every file to place, in parallel.
func materialise(ctx context.Context, tree *InputTree, dir string, place func(d cas.Digest, exec bool, dst string) error) error {
	var jobs []fileJob
	var walk func(d cas.Digest, path string) error
	walk = func(d cas.Digest, path string) error {
		// A shared Directory is created once per name: a tree the
		// executor let through is bounded, but staging must still stop
		// when the action is cancelled or its timeout passes.
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := os.Mkdir(path, 0o755); err != nil {
			return fmt.Errorf("stage input directory %s: %w", path, err)
		}
		dirpb := tree.Dirs[d]
		for _, f := range dirpb.Files {
			fd, _ := cas.FromProto(f.Digest)
			jobs = append(jobs, fileJob{fd, f.IsExecutable, filepath.Join(path, f.Name)})
		}
		for _, s := range dirpb.Symlinks {
			if err := os.Symlink(s.Target, filepath.Join(path, s.Name)); err != nil {
				return fmt.Errorf("stage input symlink %s: %w", filepath.Join(path, s.Name), err)
			}
		}
		for _, sub := range dirpb.Directories {
			sd, _ := cas.FromProto(sub.Digest)
			if err := walk(sd, filepath.Join(path, sub.Name)); err != nil {
				return err
			}
		}
		return nil
	}
	if err := walk(tree.Root, dir); err != nil {
		return err
	}
	if len(jobs) < 64 {
		for _, j := range jobs {
			if err := ctx.Err(); err != nil {
				return err
			}
			if err := place(j.d, j.exec, j.dst); err != nil {
				return fmt.Errorf("stage input %s: %w", j.dst, err)
			}
		}
		return nil
	}
	workers := min(runtime.GOMAXPROCS(0)*2, 16)
	ch := make(chan fileJob)
	var once sync.Once
	var first error
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for j := range ch {
				if err := place(j.d, j.exec, j.dst); err != nil {
					once.Do(func() { first = fmt.Errorf("stage input %s: %w", j.dst, err) })
				}
			}
		})
	}
	for _, j := range jobs {
		if ctx.Err() != nil {
			break
		}
		ch <- j
	}
	close(ch)
	wg.Wait()
	if first == nil {
		first = ctx.Err()
	}
	return first
}

// lookupPath follows rel through the input tree, refusing symlinks, and
// reports whether it names an existing directory (false when it does not
// exist at all).
func (t *InputTree) lookupDir(rel string) (exists bool, err error) {
	if rel == "" {
		return true, nil
	}
	dir := t.Dirs[t.Root]
	for _, c := range splitPath(rel) {
		if dir == nil {
			return false, nil
		}
		var next *repb.Directory
		found := false
		for _, d := range dir.Directories {
			if d.Name == c {
				dd, _ := cas.FromProto(d.Digest)
				next, found = t.Dirs[dd], true
			}
		}
		if !found {
			for _, s := range dir.Symlinks {
				if s.Name == c {
					return false, invalidf("path %q goes through input symlink %q; working and output directories must be real directories", rel, c)
				}
			}
			for _, f := range dir.Files {
				if f.Name == c {
					return false, invalidf("path %q goes through input file %q", rel, c)
				}
			}
			return false, nil
		}
		dir = next
	}
	return true, nil
}
