package srctree

import (
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

func TestModuleRootFromASubdirectory(t *testing.T) {
	root := t.TempDir()
	sub := filepath.Join(root, "a", "b")
	if err := os.MkdirAll(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "go.mod"), []byte("module m\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got, err := ModuleRoot(sub); err != nil || got != root {
		t.Fatalf("ModuleRoot(%s) = %q, %v; want %q", sub, got, err, root)
	}
}

// TestCopy copies a tree with a skipped directory and a skipped link
// (left out with all below them), a symbolic link and an executable (kept
// as they are).
func TestCopy(t *testing.T) {
	src := t.TempDir()
	for _, d := range []string{"out/sub", "pkg/out"} {
		if err := os.MkdirAll(filepath.Join(src, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	files := map[string]os.FileMode{"BUILD": 0o644, "tool.sh": 0o775, "out/sub/f": 0o644, "pkg/f": 0o600, "pkg/out/f": 0o644}
	for name, perm := range files {
		if err := os.WriteFile(filepath.Join(src, name), []byte(name), perm); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(filepath.Join(src, name), perm); err != nil { // past the umask
			t.Fatal(err)
		}
	}
	for link, target := range map[string]string{"bazel-out": "/nonexistent", "pkg/link": "../BUILD"} {
		if err := os.Symlink(target, filepath.Join(src, link)); err != nil {
			t.Fatal(err)
		}
	}
	dst := filepath.Join(t.TempDir(), "copy")
	var skipped []string
	err := Copy(src, dst, func(rel string, _ fs.DirEntry) bool {
		if rel == "out" || rel == "bazel-out" {
			skipped = append(skipped, rel)
			return true
		}
		return false
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(skipped) != 2 {
		t.Errorf("skipped %q, want out and bazel-out once each (nothing below out asked)", skipped)
	}
	for _, gone := range []string{"bazel-out", "out"} {
		if _, err := os.Lstat(filepath.Join(dst, gone)); !os.IsNotExist(err) {
			t.Errorf("%s copied (%v)", gone, err)
		}
	}
	for _, name := range []string{"BUILD", "tool.sh", "pkg/f", "pkg/out/f"} {
		fi, err := os.Stat(filepath.Join(dst, name))
		if err != nil {
			t.Errorf("%s not copied: %v", name, err)
		} else if fi.Mode().Perm() != files[name] {
			t.Errorf("%s: mode %v, want %v", name, fi.Mode().Perm(), files[name])
		}
	}
	if link, err := os.Readlink(filepath.Join(dst, "pkg/link")); err != nil || link != "../BUILD" {
		t.Errorf("pkg/link: %q, %v; want a link to ../BUILD", link, err)
	}
}
