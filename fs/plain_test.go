//go:build linux

package fs_test

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/internal/mountinfo"
	"github.com/actiond/actiond/internal/testutil"
)

// A small input tree without files (a genrule with no inputs) is staged as
// plain directories, as a mount would present them (root's, 0755, the
// symlinks as they are), without a mount or a spare; a tree with a file,
// or a large one, is still mounted.
func TestTreeWithoutFilesIsPlainDirectories(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	base := e.dir
	stage := func(name string, tree *executor.InputTree) (*executor.StagedRoot, string) {
		t.Helper()
		dir := filepath.Join(base, name)
		s, err := e.root.StageWithOptions(ctx, tree, dir, executor.StageOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Cleanup() })
		if s.Dir != "" {
			dir = s.Dir
		}
		return s, dir
	}

	s, dir := stage("plain", e.tree(map[string]string{"bazel-out/k8/bin/": "", "tools/": "", "link@": "bazel-out/k8"}))
	if !s.SelfProtected || s.Dir != "" || s.OutputPath != nil {
		t.Errorf("staged %+v; want plain directories where asked, self-protected", s)
	}
	if n := mountsAt(t, dir); n != 0 {
		t.Errorf("%d mounts at or below %s", n, dir)
	}
	for _, d := range []string{".", "bazel-out", "bazel-out/k8/bin", "tools"} {
		fi, err := os.Stat(filepath.Join(dir, d))
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		if !fi.IsDir() || fi.Mode().Perm() != 0o755 || st.Uid != 0 {
			t.Errorf("%s: %v owned by %d; want a directory of root's, 0755, as a mount shows input directories", d, fi.Mode(), st.Uid)
		}
	}
	if target, err := os.Readlink(filepath.Join(dir, "link")); err != nil || target != "bazel-out/k8" {
		t.Errorf("link -> %q, %v", target, err)
	}
	if err := s.Cleanup(); err != nil {
		t.Error(err)
	}

	_, dir = stage("file", e.tree(map[string]string{"tools/": "", "empty.txt": ""}))
	if mountsAt(t, dir) == 0 {
		t.Error("a tree with a file (empty) was not mounted")
	}
	big := map[string]string{}
	for i := 0; i < 300; i++ {
		big["d"+strconv.Itoa(i)+"/"] = ""
	}
	_, dir = stage("big", e.tree(big))
	if mountsAt(t, dir) == 0 {
		t.Error("a tree of 300 directories was staged eagerly, not mounted")
	}
}

// mountsAt counts the mounts at dir or below it.
func mountsAt(t *testing.T, dir string) int {
	t.Helper()
	return testutil.CountMounts(t, func(e mountinfo.Entry) bool {
		return e.Point == dir || strings.HasPrefix(e.Point, dir+"/")
	})
}
