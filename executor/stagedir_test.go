package executor

import (
	"os"
	"path/filepath"
	"testing"
)

// removeStage removes a stage directory whatever it holds: the usual
// entries, and what an input root left behind.
func TestRemoveStage(t *testing.T) {
	for name, extra := range map[string][]string{
		"usual entries":            nil,
		"a root with content":      {"root/out/deep/f"},
		"an entry of another name": {"scratch/f"},
	} {
		t.Run(name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "a-1")
			for _, p := range append([]string{stageStdoutName, stageStderrName, "root/.keep"}, extra...) {
				p = filepath.Join(dir, p)
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, []byte("x"), 0o444); err != nil {
					t.Fatal(err)
				}
			}
			if err := os.Remove(filepath.Join(dir, "root/.keep")); err != nil {
				t.Fatal(err)
			}
			if err := removeStage(dir); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Lstat(dir); !os.IsNotExist(err) {
				t.Errorf("stage directory still there: %v", err)
			}
		})
	}
}
