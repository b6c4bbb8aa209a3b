//go:build linux

package main

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

var updateFlagsDoc = flag.Bool("update-flags-doc", false, "rewrite docs/flags.md from the code")

// TestFlagsDoc fails when docs/flags.md is not what the code's FlagSets
// say; regenerate it with `go run ./tools/flagsdoc`.
func TestFlagsDoc(t *testing.T) {
	var b bytes.Buffer
	if err := writeFlagsMarkdown(&b); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join("..", "..", "docs", "flags.md")
	if *updateFlagsDoc {
		if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read %s: %v (generate it with `go run ./tools/flagsdoc`)", path, err)
	}
	if !bytes.Equal(got, b.Bytes()) {
		t.Errorf("%s is stale: run `go run ./tools/flagsdoc` and commit it", path)
	}
	for _, want := range []string{"## actiond serve\n", "`--http", "## actiond cas verify", "## actiond stats"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("flags reference lacks %q", want)
		}
	}
}

// TestEveryCommandIsDocumented: each command main dispatches has its flags
// in the reference.
func TestEveryCommandIsDocumented(t *testing.T) {
	src, err := os.ReadFile("main.go")
	if err != nil {
		t.Fatal(err)
	}
	known := map[string]bool{"version": true, "help": true}
	for _, c := range documented {
		known[c.name] = true
		if cmd, _, ok := strings.Cut(c.name, " "); ok { // "cas verify" documents "cas"
			known[cmd] = true
		}
	}
	for _, m := range regexp.MustCompile(`case "([a-z][a-z-]*)"`).FindAllStringSubmatch(string(src), -1) {
		if !known[m[1]] {
			t.Errorf("main.go dispatches %q, which is not in flags.go's documented list (add it, use newFlagSet, run go run ./tools/flagsdoc)", m[1])
		}
	}
}
