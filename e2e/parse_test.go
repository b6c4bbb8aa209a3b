package e2e

import (
	"reflect"
	"testing"
)

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
