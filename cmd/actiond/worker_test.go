package main

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/internal/testutil"
)

func TestPlatformFlagSorts(t *testing.T) {
	var f platformFlag
	for _, v := range []string{"OSFamily=linux", "ISA=x86-64", "OSFamily=Linux", "empty="} {
		if err := f.Set(v); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Set("novalue"); err == nil {
		t.Error("Set accepted a property without '='")
	}
	var got []string
	for _, p := range f.platform().Properties {
		got = append(got, p.Name+"="+p.Value)
	}
	want := []string{"ISA=x86-64", "OSFamily=Linux", "OSFamily=linux", "empty="}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
}

func TestRunWorkerFlags(t *testing.T) {
	if err := runWorker([]string{"--cas=127.0.0.1:1"}); err == nil {
		t.Error("runWorker without --scheduler succeeded")
	}
	if err := runWorker([]string{"--scheduler=a:1", "--cas=b:1", "--platform=bad"}); err == nil {
		t.Error("runWorker accepted --platform=bad")
	}
}

// TestWorkerTakesTheRootLock: `actiond worker` defaults to serve's root.
// It used to take no lock and wipe the stage directory at start, under a
// running server's actions; now it is refused before touching anything.
func TestWorkerTakesTheRootLock(t *testing.T) {
	testutil.RequireRoot(t) // a worker without root refuses to start at all
	root := t.TempDir()
	unlock, err := actiond.LockRoot(root) // a running `actiond serve`
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	leftover := filepath.Join(root, "cas", "stage", "a-running", "input")
	if err := os.MkdirAll(filepath.Dir(leftover), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(leftover, []byte("in use"), 0o644); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		done <- runWorker([]string{"--root", root, "--scheduler", "127.0.0.1:1", "--cas", "127.0.0.1:1",
			"--runtime-dir", filepath.Join(root, "no-runtimes"), "--log-level", "error"})
	}()
	select {
	case err := <-done:
		if !errors.Is(err, actiond.ErrRootInUse) {
			t.Fatalf("runWorker on a root in use: %v, want ErrRootInUse", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("runWorker started on a root another process holds")
	}
	if _, err := os.Stat(leftover); err != nil {
		t.Fatalf("the worker removed the running server's stage: %v", err)
	}
}
