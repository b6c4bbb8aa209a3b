package bazelws

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestParseProcesses(t *testing.T) {
	for _, tc := range []struct {
		out  string
		want map[string]int
	}{
		{"INFO: 23 processes: 1 internal, 22 remote.\n", map[string]int{"total": 23, "internal": 1, "remote": 22}},
		{"INFO: 22 processes: 21 remote cache hit, 1 internal.\n", map[string]int{"total": 22, "remote cache hit": 21, "internal": 1}},
		{"INFO: 35 processes: 9 internal, 26 local.\r\n", map[string]int{"total": 35, "internal": 9, "local": 26}},
		{"INFO: 1 process: 1 internal.\n", map[string]int{"total": 1, "internal": 1}},
		{"INFO: 0 processes.\n", map[string]int{"total": 0}},
		{"INFO: 1,234 processes: 1,200 remote, 34 internal.\n", map[string]int{"total": 1234, "remote": 1200, "internal": 34}},
		// The last summary wins.
		{"INFO: 3 processes: 3 local.\nINFO: 4 processes: 1 disk cache hit, 3 linux-sandbox.\n",
			map[string]int{"total": 4, "disk cache hit": 1, "linux-sandbox": 3}},
		{"INFO: Build completed successfully, 4 total actions\n", nil},
	} {
		if got := ParseProcesses(tc.out); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("ParseProcesses(%q) = %v, want %v", tc.out, got, tc.want)
		}
	}
}

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
