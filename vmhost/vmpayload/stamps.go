package vmpayload

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"

	"github.com/actiond/actiond/cas"
)

// Stamps: PATH.stamp holds the recipe PATH (a file or directory) was made
// from; a step whose recipe matches is skipped.
func stampMatches(path, recipe string) bool {
	if _, err := os.Stat(path); err != nil {
		return false
	}
	got, err := os.ReadFile(path + ".stamp")
	return err == nil && string(got) == recipe
}

func writeStamp(path, recipe string) error {
	return writeFileAtomic(path+".stamp", []byte(recipe), 0o644)
}

// writeFileAtomic writes data to a temporary file next to path, syncs it
// and renames it into place: a crash leaves the old file or the new one.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return os.Rename(tmp, path)
}

func fileSHA256(path string) (string, error) {
	d, err := cas.DigestFile(path)
	return d.Hash, err
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}
