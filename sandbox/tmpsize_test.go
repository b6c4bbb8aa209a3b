//go:build linux

package sandbox_test

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/internal/testutil"
	"github.com/actiond/actiond/sandbox"
)

// TestTmpIsBounded: the action's /tmp and /dev/shm are tmpfs mounts, in
// the host's memory; each has the configured size, so writing past it
// fails with ENOSPC instead of taking the host's memory.
func TestTmpIsBounded(t *testing.T) {
	testutil.RequireRoot(t)
	sb, err := sandbox.New(sandbox.Config{
		Runtimes: []sandbox.Runtime{sandbox.HostRuntime()},
		StateDir: t.TempDir(),
		Logger:   slog.New(slog.NewTextHandler(testWriter{t}, nil)),
		TmpSize:  8 << 20,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sb.Close() })
	root := newExecRoot(t, false)
	for _, dir := range []string{"/tmp", "/dev/shm"} {
		res, _, stderr := run(t, sb, shSpec(t, root, "dd if=/dev/zero of="+dir+"/fill bs=1M count=16"))
		if res.ExitCode == 0 || !strings.Contains(stderr, "No space left on device") {
			t.Errorf("writing 16 MiB to %s with TmpSize 8 MiB: exit %d, stderr %q; want ENOSPC", dir, res.ExitCode, stderr)
		}
	}
	// The default is bounded too.
	def := newSandbox(t)
	out := mustSucceed(t, def, shSpec(t, root, "df -k /tmp /dev/shm | tail -n +2"))
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if f := strings.Fields(line); len(f) < 2 || f[1] != "1048576" {
			t.Errorf("df line %q: want a 1 GiB (1048576 KiB) tmpfs by default", line)
		}
	}
}

// TestTmpSizeProperty: an action may ask for a smaller /tmp (tmp_size),
// not for more than the server allows.
func TestTmpSizeProperty(t *testing.T) {
	sb := newSandbox(t) // the default, 1 GiB
	root := newExecRoot(t, false)
	s := shSpec(t, root, "df -k /tmp /dev/shm | tail -n +2")
	s.Limits.TmpBytes = 64 << 20
	out := mustSucceed(t, sb, s)
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if f := strings.Fields(line); len(f) < 2 || f[1] != "65536" {
			t.Errorf("df line %q: want a 64 MiB (65536 KiB) tmpfs", line)
		}
	}
	s = shSpec(t, root, "true")
	s.Limits.TmpBytes = 2 << 30
	_, err := sb.Run(context.Background(), s)
	var inv *executor.InvalidInputError
	if !errors.As(err, &inv) || !strings.Contains(err.Error(), "--sandbox-tmp-size") {
		t.Fatalf("tmp_size over the server's limit: %v, want an InvalidInputError naming --sandbox-tmp-size", err)
	}
}
