package testutil

import (
	"os"
	"path/filepath"
	"testing"
)

// Corruptions are the ways CorruptBlob makes a stored blob go bad.
var Corruptions = []string{"flip", "truncate", "same-size"}

// CorruptBlob changes the stored file of the blob with the given hash in the
// disk store of the server root root (cas/sha256/ab/<hash>) the way kind
// says: "flip" one bit in the middle, "truncate" to half its length,
// "same-size" every byte changed and the length kept. Blobs are read-only
// files; a bad disk or a root user ignores that, and so does this, leaving
// the file read-only again.
func CorruptBlob(t testing.TB, root, hash, kind string) {
	t.Helper()
	p := filepath.Join(root, "cas", "sha256", hash[:2], hash)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("blob %s (%s): %v", hash, kind, err)
	}
	switch kind {
	case "flip":
		b[len(b)/2] ^= 0x40
	case "truncate":
		b = b[:len(b)/2]
	case "same-size":
		for i := range b {
			b[i] ^= 0xff
		}
	default:
		t.Fatalf("unknown corruption %q", kind)
	}
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, 0o444); err != nil {
		t.Fatal(err)
	}
}
