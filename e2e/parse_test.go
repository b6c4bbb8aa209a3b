package e2e

import (
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

func TestLabelToPath(t *testing.T) {
	for in, want := range map[string]string{
		"//tree:tree":     "tree/tree",
		"//tree":          "tree/tree",
		"//:big":          "big",
		"//cc:hello":      "cc/hello",
		"//a/b:c.txt":     "a/b/c.txt",
		"//a/b":           "a/b/b",
		"multi/empty.txt": "multi/empty.txt",
	} {
		if got := labelToPath(in); got != want {
			t.Errorf("labelToPath(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestDiffHashes(t *testing.T) {
	a := map[string]string{"x": "1", "y": "2", "z": "3"}
	b := map[string]string{"x": "1", "y": "9", "w": "4"}
	got := DiffHashes(a, b, 10)
	want := []string{"unexpected: w", "differs: y (want 2, got 9)", "missing: z"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("DiffHashes = %q, want %q", got, want)
	}
	if d := DiffHashes(a, a, 10); len(d) != 0 {
		t.Errorf("DiffHashes(a, a) = %q", d)
	}
}
