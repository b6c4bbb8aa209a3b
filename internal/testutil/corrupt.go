package testutil

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"
)

// Corruptions are the ways CorruptBlob makes a stored blob go bad.
var Corruptions = []string{"flip", "truncate", "same-size"}

// CorruptBlob changes the stored copy of the blob with the given hash in
// the disk store of the server root root the way kind says: "flip" one bit
// in the middle, "truncate" to half its length, "same-size" every byte
// changed and the length kept. The copy is the blob's record in a pack
// (cas/packs/*.pack) if it has one, where "truncate" is what a power loss
// does to an unflushed record: the pack cut in its middle if it is the
// last, its second half zeros if not. Otherwise it is the blob's file
// (cas/sha256/ab/<hash>). (A packed blob's file is a copy made for a
// path, which the store drops when it opens.) Blob files are read-only; a
// bad disk or a root user ignores that, and so does this, leaving each
// file with the mode it had.
func CorruptBlob(t testing.TB, root, hash, kind string) {
	t.Helper()
	if corruptPacked(t, root, hash, kind) {
		return
	}
	p := filepath.Join(root, "cas", "sha256", hash[:2], hash)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("blob %s (%s): %v", hash, kind, err)
	}
	if !spoil(t, b, kind) {
		b = b[:len(b)/2]
	}
	writeInPlace(t, p, b)
}

// spoil changes b in place the way kind says ("flip", "same-size"); it
// reports false for "truncate", whose shape depends on where b lives.
func spoil(t testing.TB, b []byte, kind string) bool {
	t.Helper()
	switch kind {
	case "flip":
		b[len(b)/2] ^= 0x40
	case "same-size":
		for i := range b {
			b[i] ^= 0xff
		}
	case "truncate":
		return false
	default:
		t.Fatalf("unknown corruption %q", kind)
	}
	return true
}

// corruptPacked is CorruptBlob for a blob in a pack; it reports whether
// the blob has a record. The record layout (see cas/disk_pack.go) is
// "adp1", the raw SHA-256, a big-endian uint32 size, then the bytes.
func corruptPacked(t testing.TB, root, hash, kind string) bool {
	t.Helper()
	raw, err := hex.DecodeString(hash)
	if err != nil {
		t.Fatal(err)
	}
	header := append([]byte("adp1"), raw...)
	packs, _ := filepath.Glob(filepath.Join(root, "cas", "packs", "*.pack"))
	for _, p := range packs {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		i := bytes.Index(b, header)
		if i < 0 {
			continue
		}
		start := i + len(header) + 4
		n := int(binary.BigEndian.Uint32(b[i+len(header):]))
		data := b[start : start+n]
		if !spoil(t, data, kind) {
			if start+n == len(b) {
				b = b[:start+n/2] // a torn tail
			} else {
				clear(data[n/2:]) // blocks never written read as zeros
			}
		}
		writeInPlace(t, p, b)
		return true
	}
	return false
}

// writeInPlace replaces the content of the file p, keeping its inode (as
// an open descriptor sees it) and its mode (a read-only blob file stays
// read-only).
func writeInPlace(t testing.TB, p string, b []byte) {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, fi.Mode().Perm()); err != nil {
		t.Fatal(err)
	}
}
