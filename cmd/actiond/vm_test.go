package main

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/actiond/actiond/vmhost/vmpayload"
)

// A complete payload made by this binary is used as it is: no build (the
// mirror is unreachable and there is no source, so a build would fail).
func TestEnsurePayloadReusesComplete(t *testing.T) {
	dir := t.TempDir()
	self, err := selfID()
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "vmlinux"), []byte("kernel"), 0o644)
	m := vmpayload.Manifest{Format: vmpayload.ManifestFormat, Arch: "amd64", Kernel: "vmlinux", BuilderID: self, ContentHash: "feedface",
		Files: map[string]vmpayload.FileInfo{"vmlinux": {Size: 6}}}
	data, _ := json.Marshal(m)
	os.WriteFile(filepath.Join(dir, "manifest.json"), data, 0o644)
	var log bytes.Buffer
	got, err := ensurePayload(context.Background(), payloadRequest{Arch: "amd64", Dir: dir, Mirror: "http://127.0.0.1:1/none", Src: "/nonexistent"}, slog.New(slog.NewTextHandler(&log, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if got.ContentHash != "feedface" || !strings.Contains(log.String(), "payload up to date: no download, no build") || !strings.Contains(log.String(), "feedface") {
		t.Fatalf("got %+v, log:\n%s", got, log.String())
	}
	// Made by another binary: a rebuild is attempted, saying why.
	m.BuilderID = "other"
	data, _ = json.Marshal(m)
	os.WriteFile(filepath.Join(dir, "manifest.json"), data, 0o644)
	log.Reset()
	// It fails here (no mirror) before changing anything, so the
	// previous payload is booted, with a warning.
	got, err = ensurePayload(context.Background(), payloadRequest{Arch: "amd64", Dir: dir, Mirror: "http://127.0.0.1:1/none", Src: t.TempDir()}, slog.New(slog.NewTextHandler(&log, nil)))
	if err != nil || got.ContentHash != "feedface" || !strings.Contains(log.String(), "a new actiond binary") || !strings.Contains(log.String(), "booting the previous one") {
		t.Fatalf("new binary, no mirror: %v\n%s", err, log.String())
	}
	// With --update semantics of `vm payload` (Force), the failure is an
	// error.
	if _, err := ensurePayload(context.Background(), payloadRequest{Arch: "amd64", Dir: dir, Mirror: "http://127.0.0.1:1/none", Src: t.TempDir(), Force: true}, slog.New(slog.NewTextHandler(&log, nil))); err == nil {
		t.Fatal("vm payload with an unreachable mirror succeeded")
	}
}
