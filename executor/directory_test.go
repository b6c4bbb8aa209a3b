package executor

import (
	"strings"
	"testing"

	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
)

func TestValidateDirectory(t *testing.T) {
	f := cas.DigestOf([]byte("x")).Proto()
	d := cas.DigestOf([]byte("a directory")).Proto()
	bad := &repb.Digest{Hash: "zz", SizeBytes: 1}
	file := func(name string) *repb.FileNode { return &repb.FileNode{Name: name, Digest: f} }
	dir := func(name string) *repb.DirectoryNode { return &repb.DirectoryNode{Name: name, Digest: d} }
	link := func(name, target string) *repb.SymlinkNode { return &repb.SymlinkNode{Name: name, Target: target} }
	cases := []struct {
		name    string
		dir     *repb.Directory
		wantErr string // "" for valid
	}{
		{"empty", &repb.Directory{}, ""},
		{"one of each", &repb.Directory{
			Files:       []*repb.FileNode{file("a"), file("b.txt")},
			Directories: []*repb.DirectoryNode{dir("c"), dir("d")},
			Symlinks:    []*repb.SymlinkNode{link("e", "a"), link("f", "../up/there"), link("g", "dangling/x")},
		}, ""},
		{"names sorted per kind only", &repb.Directory{
			Files:       []*repb.FileNode{file("z")},
			Directories: []*repb.DirectoryNode{dir("a")},
		}, ""},
		{"empty file name", &repb.Directory{Files: []*repb.FileNode{file("")}}, "empty name"},
		{"dot", &repb.Directory{Directories: []*repb.DirectoryNode{dir(".")}}, "not a valid file name"},
		{"dotdot", &repb.Directory{Files: []*repb.FileNode{file("..")}}, "not a valid file name"},
		{"slash", &repb.Directory{Files: []*repb.FileNode{file("a/b")}}, "contains '/'"},
		{"NUL", &repb.Directory{Symlinks: []*repb.SymlinkNode{link("a\x00", "b")}}, "NUL"},
		{"unsorted files", &repb.Directory{Files: []*repb.FileNode{file("b"), file("a")}}, "not sorted"},
		{"unsorted directories", &repb.Directory{Directories: []*repb.DirectoryNode{dir("b"), dir("a")}}, "not sorted"},
		{"unsorted symlinks", &repb.Directory{Symlinks: []*repb.SymlinkNode{link("b", "x"), link("a", "x")}}, "not sorted"},
		{"duplicate", &repb.Directory{Files: []*repb.FileNode{file("a"), file("a")}}, "not sorted"},
		{"file and directory", &repb.Directory{
			Files:       []*repb.FileNode{file("a")},
			Directories: []*repb.DirectoryNode{dir("a")},
		}, "used by a file and a directory"},
		{"directory and symlink", &repb.Directory{
			Directories: []*repb.DirectoryNode{dir("a")},
			Symlinks:    []*repb.SymlinkNode{link("a", "x")},
		}, "used by a directory and a symlink"},
		{"bad file digest", &repb.Directory{Files: []*repb.FileNode{{Name: "a", Digest: bad}}}, `file "a"`},
		{"missing file digest", &repb.Directory{Files: []*repb.FileNode{{Name: "a"}}}, `file "a"`},
		{"bad directory digest", &repb.Directory{Directories: []*repb.DirectoryNode{{Name: "a", Digest: bad}}}, `directory "a"`},
		{"empty symlink target", &repb.Directory{Symlinks: []*repb.SymlinkNode{link("a", "")}}, "empty target"},
		// Capabilities advertise DISALLOWED: an absolute target is refused.
		{"absolute symlink target", &repb.Directory{Symlinks: []*repb.SymlinkNode{link("a", "/etc/shadow")}}, "absolute target"},
	}
	if SymlinkAbsolutePathStrategy != repb.SymlinkAbsolutePathStrategy_DISALLOWED {
		t.Fatalf("SymlinkAbsolutePathStrategy is %v; this table expects DISALLOWED", SymlinkAbsolutePathStrategy)
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := ValidateDirectory(c.dir)
			switch {
			case c.wantErr == "" && err != nil:
				t.Fatalf("ValidateDirectory = %v, want nil", err)
			case c.wantErr != "" && err == nil:
				t.Fatalf("ValidateDirectory accepted it, want an error containing %q", c.wantErr)
			case c.wantErr != "" && !strings.Contains(err.Error(), c.wantErr):
				t.Fatalf("ValidateDirectory = %v, want an error containing %q", err, c.wantErr)
			}
		})
	}
}
