package bazelws

import (
	"os"
	"path/filepath"
	"testing"
)

func TestCopyWorkspace(t *testing.T) {
	src, err := filepath.Abs("../../testdata/bazel")
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "ws")
	if err := Copy(src, dst); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"WORKSPACE", "BUILD", "gen_inputs.sh", filepath.Join("tree", "defs.bzl")} {
		want, err := os.ReadFile(filepath.Join(src, name))
		if err != nil {
			t.Fatal(err)
		}
		if got, err := os.ReadFile(filepath.Join(dst, name)); err != nil || string(got) != string(want) {
			t.Errorf("%s: copy differs (%v)", name, err)
		}
	}
	if ents, err := os.ReadDir(filepath.Join(dst, "many", "inputs")); err != nil || len(ents) == 0 {
		t.Errorf("gen_inputs.sh made no many/inputs (%v)", err)
	}
}
