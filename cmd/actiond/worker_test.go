package main

import (
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
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

// TestWorkerServesMetrics: with --http the worker serves metrics of its
// local cache and input root (its ActionCache is the farm's: no bbolt
// metrics), the status page works, and SIGTERM still stops it (its
// scheduler is unreachable: nothing runs).
func TestWorkerServesMetrics(t *testing.T) {
	testutil.RequireRoot(t)
	root := t.TempDir()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	// While the test has its own SIGTERM handler, the signal never kills
	// the test process, even before runWorker registers its own.
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGTERM)
	defer signal.Stop(sigs)
	done := make(chan error, 1)
	go func() {
		done <- runWorker([]string{"--root", root, "--scheduler", "127.0.0.1:1", "--cas", "127.0.0.1:1", "--http", addr,
			"--runtime-dir", filepath.Join(root, "no-runtimes"), "--log-level", "error"})
	}()
	var body string
	deadline := time.Now().Add(30 * time.Second)
	for body == "" {
		if time.Now().After(deadline) {
			t.Fatal("no /metrics from the worker within 30s")
		}
		select {
		case err := <-done:
			t.Fatalf("the worker ended: %v", err)
		case <-time.After(100 * time.Millisecond):
		}
		resp, err := http.Get("http://" + addr + "/metrics")
		if err != nil {
			continue
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		body = string(b)
	}
	for _, want := range []string{"actiond_cas_blobs", `actiond_input_root_strategy{strategy="hardlink"}`} {
		if !strings.Contains(body, want) {
			t.Errorf("worker /metrics lacks %s", want)
		}
	}
	resp, err := http.Get("http://" + addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(page), "actiond") {
		t.Errorf("worker status page: %s\n%.400s", resp.Status, page)
	}
	for {
		syscall.Kill(os.Getpid(), syscall.SIGTERM)
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("the worker after SIGTERM: %v", err)
			}
			return
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline.Add(30 * time.Second)) {
			t.Fatal("the worker did not stop after SIGTERM")
		}
	}
}
