package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/cas"
)

// newRoot makes a root with n blobs of 1000 bytes, as a server would leave it.
func newRoot(t *testing.T, n int) (string, []cas.Digest) {
	t.Helper()
	root := t.TempDir()
	store, err := cas.NewDiskStore(filepath.Join(root, "cas"), cas.WithFsync(false))
	if err != nil {
		t.Fatal(err)
	}
	var ds []cas.Digest
	for i := range n {
		data := bytes.Repeat([]byte{byte(i)}, 1000)
		d := cas.DigestOf(data)
		if err := store.Put(context.Background(), d, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		ds = append(ds, d)
	}
	return root, ds
}

func TestCASGC(t *testing.T) {
	root, _ := newRoot(t, 10)
	if err := runCAS([]string{"gc", "--root", root, "--max-size", "4500", "--log-level", "error"}); err != nil {
		t.Fatal(err)
	}
	store, err := cas.NewDiskStore(filepath.Join(root, "cas"))
	if err != nil {
		t.Fatal(err)
	}
	if st := store.Stats(); st.Blobs != 4 || st.Bytes != 4000 {
		t.Errorf("after gc to 4500 bytes: %d blobs, %d bytes; want 4, 4000", st.Blobs, st.Bytes)
	}
	if err := runCAS([]string{"gc", "--root", root}); err == nil {
		t.Error("gc without --max-size succeeded")
	}
}

func TestCASVerifyCommand(t *testing.T) {
	root, ds := newRoot(t, 3)
	if err := runCAS([]string{"verify", "--root", root, "--log-level", "error"}); err != nil {
		t.Fatalf("verify of a clean root: %v", err)
	}
	p := filepath.Join(root, "cas", "sha256", ds[1].Hash[:2], ds[1].Hash)
	os.Chmod(p, 0o644)
	if err := os.WriteFile(p, []byte("rot"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := runCAS([]string{"verify", "--root", root, "--log-level", "error"}); !errors.Is(err, errCorrupt) {
		t.Fatalf("verify of a corrupt root: %v, want errCorrupt", err)
	}
	if _, err := os.Stat(filepath.Join(root, "cas", cas.QuarantineDir, ds[1].Hash)); err != nil {
		t.Errorf("not quarantined: %v", err)
	}
	if err := runStats([]string{"--root", root}); err != nil {
		t.Errorf("stats: %v", err)
	}
}

func TestMaintenanceRefusesRootInUse(t *testing.T) {
	root, _ := newRoot(t, 1)
	srv, err := actiond.New(actiond.Options{Root: root, Logger: discard()})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	for _, args := range [][]string{{"verify", "--root", root}, {"gc", "--root", root, "--max-size", "1G"}} {
		if err := runCAS(args); !errors.Is(err, actiond.ErrRootInUse) {
			t.Errorf("cas %v on a served root: %v, want ErrRootInUse", args, err)
		}
	}
	if err := runStats([]string{"--root", root}); !errors.Is(err, actiond.ErrRootInUse) {
		t.Errorf("stats on a served root: %v, want ErrRootInUse", err)
	}
	if err := runCAS([]string{"verify", "--root", filepath.Join(root, "nope")}); err == nil {
		t.Error("verify of a missing root succeeded")
	}
}

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }
