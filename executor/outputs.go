package executor

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"
)

type outputKind int

const (
	outputAny outputKind = iota // v2.1 output_paths: file, directory or symlink
	outputFile
	outputDir
)

type output struct {
	path string // relative to the working directory, cleaned
	kind outputKind
}

// parseOutputs reads output_paths, or the legacy output_files and
// output_directories that older clients (Bazel 4) send.
func parseOutputs(cmd *repb.Command) ([]output, error) {
	var outs []output
	add := func(field string, paths []string, kind outputKind) error {
		for _, p := range paths {
			c, err := cleanRelPath(field, p)
			if err != nil {
				return err
			}
			outs = append(outs, output{c, kind})
		}
		return nil
	}
	if len(cmd.OutputPaths) > 0 {
		if err := add("output path", cmd.OutputPaths, outputAny); err != nil {
			return nil, err
		}
		return outs, nil
	}
	if err := add("output file", cmd.OutputFiles, outputFile); err != nil {
		return nil, err
	}
	if err := add("output directory", cmd.OutputDirectories, outputDir); err != nil {
		return nil, err
	}
	return outs, nil
}

// prepareOutputDirs creates the directories leading up to every output and
// returns them (relative to the execroot) as the directories the command
// may write. They are root-owned, mode 1777 (a Sandbox narrows that to the
// action's own group; the stage around them is private): the sandbox user
// can create files there but, thanks to the sticky bit, cannot remove or
// rename the input files that may share the directory.
func prepareOutputDirs(execRoot, wd string, outs []output, tree *InputTree) ([]string, error) {
	seen := map[string]bool{}
	var dirs []string
	for _, o := range outs {
		parent := path.Dir(path.Join(wd, o.path)) // "." is the execroot itself
		if seen[parent] {
			continue
		}
		seen[parent] = true
		if _, err := tree.lookupDir(parent); err != nil {
			return nil, err
		}
		if err := mkdirNoFollow(execRoot, parent); err != nil {
			return nil, fmt.Errorf("create output directory %q: %w", parent, err)
		}
		if err := os.Chmod(filepath.Join(execRoot, parent), os.ModeSticky|0o777); err != nil {
			return nil, fmt.Errorf("open output directory %q: %w", parent, err)
		}
		dirs = append(dirs, parent)
	}
	sort.Strings(dirs)
	return dirs, nil
}

// mkdirNoFollow creates rel under root one component at a time, refusing to
// pass through symlinks (which could point anywhere on the host).
func mkdirNoFollow(root, rel string) error {
	cur := root
	for _, c := range splitPath(rel) {
		cur = filepath.Join(cur, c)
		fi, err := os.Lstat(cur)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			if err := os.Mkdir(cur, 0o755); err != nil {
				return err
			}
		case err != nil:
			return err
		case fi.Mode()&os.ModeSymlink != 0:
			return &InvalidInputError{Msg: fmt.Sprintf("output path component %q is a symlink", c)}
		case !fi.IsDir():
			return &InvalidInputError{Msg: fmt.Sprintf("output path component %q is a file", c)}
		}
	}
	return nil
}

// collectOutputs moves the declared outputs into the CAS and fills result.
// physical, if set, maps a regular file's path relative to execRoot to the
// file holding its bytes (see StagedRoot.OutputPath).
func (e *Executor) collectOutputs(ctx context.Context, execRoot, wd string, outs []output, physical func(string) string, result *repb.ActionResult, digests *[]cas.Digest) error {
	for _, o := range outs {
		rel := path.Join(wd, o.path)
		host := filepath.Join(execRoot, rel)
		fi, err := lstatInside(execRoot, rel)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("output %q: %w", o.path, err)
		}
		switch {
		case fi.Mode()&os.ModeSymlink != 0:
			target, err := os.Readlink(host)
			if err != nil {
				return fmt.Errorf("output %q: %w", o.path, err)
			}
			if err := checkSymlink(rel, target); err != nil {
				return err
			}
			sl := &repb.OutputSymlink{Path: o.path, Target: target}
			result.OutputSymlinks = append(result.OutputSymlinks, sl)
			switch o.kind {
			case outputFile:
				result.OutputFileSymlinks = append(result.OutputFileSymlinks, sl)
			case outputDir:
				result.OutputDirectorySymlinks = append(result.OutputDirectorySymlinks, sl)
			}
		case fi.Mode().IsRegular():
			if o.kind == outputDir {
				return &InvalidInputError{Msg: fmt.Sprintf("output directory %q is a regular file", o.path)}
			}
			d, err := e.opts.Store.PutFile(ctx, physicalPath(physical, rel, host))
			if err != nil {
				return fmt.Errorf("store output %q: %w", o.path, err)
			}
			*digests = append(*digests, d)
			result.OutputFiles = append(result.OutputFiles, &repb.OutputFile{
				Path: o.path, Digest: d.Proto(), IsExecutable: fi.Mode()&0o111 != 0,
			})
		case fi.IsDir():
			if o.kind == outputFile {
				return &InvalidInputError{Msg: fmt.Sprintf("output file %q is a directory", o.path)}
			}
			td, err := e.storeTree(ctx, host, rel, physical, digests)
			if err != nil {
				return fmt.Errorf("output directory %q: %w", o.path, err)
			}
			result.OutputDirectories = append(result.OutputDirectories, &repb.OutputDirectory{
				Path: o.path, TreeDigest: td.Proto(), IsTopologicallySorted: true,
			})
		}
	}
	return nil
}

// lstatInside stats rel under root without following symlinks in any
// component, so an action cannot make output collection read host files.
func lstatInside(root, rel string) (os.FileInfo, error) {
	parts := splitPath(rel)
	cur := root
	for i, c := range parts {
		cur = filepath.Join(cur, c)
		fi, err := os.Lstat(cur)
		if err != nil {
			return nil, err
		}
		if i == len(parts)-1 {
			return fi, nil
		}
		if !fi.IsDir() {
			return nil, fs.ErrNotExist
		}
	}
	return os.Lstat(root)
}

// checkSymlink refuses output symlinks that are absolute or leave the execroot.
func checkSymlink(rel, target string) error {
	if strings.HasPrefix(target, "/") {
		return &InvalidInputError{Msg: fmt.Sprintf("output symlink %q has absolute target %q; this server's symlink_absolute_path_strategy is DISALLOWED", rel, target)}
	}
	resolved := path.Join(path.Dir(rel), target)
	if resolved == ".." || strings.HasPrefix(resolved, "../") {
		return &InvalidInputError{Msg: fmt.Sprintf("output symlink %q -> %q points outside the execution root", rel, target)}
	}
	return nil
}

// physicalPath is where the output file rel (host under the execroot)
// can be moved into the CAS from.
func physicalPath(physical func(string) string, rel, host string) string {
	if physical != nil {
		if p := physical(rel); p != "" {
			return p
		}
	}
	return host
}

// storeTree moves a directory's files into the CAS and stores its Tree.
func (e *Executor) storeTree(ctx context.Context, host, rel string, physical func(string) string, digests *[]cas.Digest) (cas.Digest, error) {
	tree := &repb.Tree{}
	children := map[cas.Digest]*repb.Directory{}
	var order []cas.Digest
	var walk func(host, rel string) (*repb.Directory, error)
	walk = func(host, rel string) (*repb.Directory, error) {
		ents, err := os.ReadDir(host)
		if err != nil {
			return nil, err
		}
		dir := &repb.Directory{}
		for _, ent := range ents { // ReadDir sorts by name
			p := filepath.Join(host, ent.Name())
			r := path.Join(rel, ent.Name())
			fi, err := os.Lstat(p)
			if err != nil {
				return nil, err
			}
			switch {
			case fi.Mode()&os.ModeSymlink != 0:
				target, err := os.Readlink(p)
				if err != nil {
					return nil, err
				}
				if err := checkSymlink(r, target); err != nil {
					return nil, err
				}
				dir.Symlinks = append(dir.Symlinks, &repb.SymlinkNode{Name: ent.Name(), Target: target})
			case fi.Mode().IsRegular():
				d, err := e.opts.Store.PutFile(ctx, physicalPath(physical, r, p))
				if err != nil {
					return nil, err
				}
				*digests = append(*digests, d)
				dir.Files = append(dir.Files, &repb.FileNode{Name: ent.Name(), Digest: d.Proto(), IsExecutable: fi.Mode()&0o111 != 0})
			case fi.IsDir():
				sub, err := walk(p, r)
				if err != nil {
					return nil, err
				}
				data, err := proto.MarshalOptions{Deterministic: true}.Marshal(sub)
				if err != nil {
					return nil, err
				}
				sd := cas.DigestOf(data)
				if _, ok := children[sd]; !ok {
					children[sd] = sub
					order = append(order, sd)
				}
				dir.Directories = append(dir.Directories, &repb.DirectoryNode{Name: ent.Name(), Digest: sd.Proto()})
			}
		}
		return dir, nil
	}
	root, err := walk(host, rel)
	if err != nil {
		return cas.Digest{}, err
	}
	tree.Root = root
	// Children in reverse discovery order: parents before their children
	// (topologically sorted), as IsTopologicallySorted promises.
	for i := len(order) - 1; i >= 0; i-- {
		tree.Children = append(tree.Children, children[order[i]])
	}
	data, err := proto.MarshalOptions{Deterministic: true}.Marshal(tree)
	if err != nil {
		return cas.Digest{}, err
	}
	d, err := e.putBytes(ctx, data)
	if err == nil {
		*digests = append(*digests, d)
	}
	return d, err
}
