//go:build linux

package guest

import (
	"os"
	"path/filepath"
	"testing"
)

// TestRuntimesIn lists a runtimes disk's tree: a directory with usr or bin
// is a runtime; hidden ones, the host runtime's name, empty directories and
// files are not.
func TestRuntimesIn(t *testing.T) {
	dir := t.TempDir()
	for _, d := range []string{"glibc2.36/usr", "merged/bin", ".hidden/usr", "host/usr", "empty"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "file"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	rts, err := RuntimesIn(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, rt := range rts {
		if rt.Root != filepath.Join(dir, rt.Name) || rt.Image != "" {
			t.Errorf("runtime %+v: want its directory as root and no image", rt)
		}
		got = append(got, rt.Name)
	}
	if len(got) != 2 || got[0] != "glibc2.36" || got[1] != "merged" {
		t.Errorf("runtimes %q, want glibc2.36 and merged", got)
	}
}
