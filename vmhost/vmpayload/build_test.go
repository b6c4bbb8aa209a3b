package vmpayload

import (
	"context"
	"io"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// An unreachable mirror: the error names the URL and says that a complete
// cached payload would have been used; no manifest is left.
func TestBuildUnreachableMirror(t *testing.T) {
	srv := httptest.NewServer(nil)
	url := srv.URL + "/debian"
	srv.Close()
	dir := t.TempDir()
	_, err := Build(context.Background(), Options{Arch: "arm64", Dir: dir, Mirror: url, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err == nil || !strings.Contains(err.Error(), url+"/dists/bookworm/InRelease") || !strings.Contains(err.Error(), "cached payload") {
		t.Fatalf("unreachable mirror: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "manifest.json")); err == nil {
		t.Fatal("a failed build left a manifest")
	}
}

// ReadManifest refuses a payload whose files do not match the manifest
// (an interrupted rebuild) and one of another arch.
func TestReadManifestRefusesIncomplete(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "manifest.json"), []byte(`{"format":2,"arch":"amd64","files":{"vmlinux":{"size":10}}}`), 0o644)
	os.WriteFile(filepath.Join(dir, "vmlinux"), []byte("short"), 0o644)
	if _, err := ReadManifest(dir, "amd64"); err == nil || !strings.Contains(err.Error(), "vmlinux") {
		t.Fatalf("size mismatch: %v", err)
	}
	os.WriteFile(filepath.Join(dir, "vmlinux"), []byte("0123456789"), 0o644)
	if _, err := ReadManifest(dir, "amd64"); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadManifest(dir, "arm64"); err == nil {
		t.Fatal("arch mismatch accepted")
	}
	os.WriteFile(filepath.Join(dir, "manifest.json"), []byte(`{"arch":"amd64"}`), 0o644)
	if _, err := ReadManifest(dir, "amd64"); err == nil || !strings.Contains(err.Error(), "format") {
		t.Fatalf("old format: %v", err)
	}
}
