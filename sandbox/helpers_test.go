//go:build linux

package sandbox_test

import (
	"context"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/internal/testutil"
	"github.com/actiond/actiond/sandbox"
)

// shPath is the environment most test commands get.
const shPath = "PATH=/usr/bin:/bin"

// actionUID is the uid (and gid) of the only action running at a time:
// the first of the default range.
var actionUID = strconv.Itoa(sandbox.DefaultFirstID)

const firstID = sandbox.DefaultFirstID

var tmpRoot string // removed after all tests

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "sandbox-test-")
	if err != nil {
		panic(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil { // the probe also runs as nobody
		panic(err)
	}
	tmpRoot = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

var probeBuild struct {
	once sync.Once
	path string
	err  error
}

// probeBinary builds testdata/probe as a static binary (once per test run)
// and returns its path.
func probeBinary(t testing.TB) string {
	t.Helper()
	goTool, err := exec.LookPath("go")
	testutil.Require(t, err == nil, "needs the go tool to build the test probe")
	probeBuild.once.Do(func() {
		out := filepath.Join(tmpRoot, "probe")
		cmd := exec.Command(goTool, "build", "-o", out, "./testdata/probe")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			probeBuild.err = &buildError{err: err, out: string(b)}
			return
		}
		probeBuild.path = out
	})
	if probeBuild.err != nil {
		t.Fatalf("building probe: %v", probeBuild.err)
	}
	return probeBuild.path
}

type buildError struct {
	err error
	out string
}

func (e *buildError) Error() string { return e.err.Error() + ": " + e.out }

// newSandbox returns a Sandbox with the host runtime (plus extra runtimes)
// that is closed when the test ends.
func newSandbox(t testing.TB, extra ...sandbox.Runtime) *sandbox.Sandbox {
	t.Helper()
	return newSandboxWith(t, sandbox.Config{Runtimes: append([]sandbox.Runtime{sandbox.HostRuntime()}, extra...)})
}

// newSandboxWith is newSandbox with cfg, whose StateDir and Logger it
// fills in, and Runtimes when empty (the host runtime).
func newSandboxWith(t testing.TB, cfg sandbox.Config) *sandbox.Sandbox {
	t.Helper()
	testutil.RequireRoot(t)
	if len(cfg.Runtimes) == 0 {
		cfg.Runtimes = []sandbox.Runtime{sandbox.HostRuntime()}
	}
	cfg.StateDir = t.TempDir()
	cfg.Logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	sb, err := sandbox.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := sb.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return sb
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// newExecRoot makes an execroot like the executor's: root-owned inputs
// (in.txt, mode 0444), an output directory out/ (0755) and a package
// directory pkg/. With withProbe it also holds the probe binary as "probe".
func newExecRoot(t testing.TB, withProbe bool) string {
	t.Helper()
	root := filepath.Join(t.TempDir(), "execroot")
	for _, d := range []string{root, filepath.Join(root, "out"), filepath.Join(root, "pkg")} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, filepath.Join(root, "in.txt"), "input\n", 0o444)
	if withProbe {
		copyFile(t, probeBinary(t), filepath.Join(root, "probe"), 0o555)
	}
	return root
}

func writeFile(t testing.TB, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // beat the umask
		t.Fatal(err)
	}
}

func copyFile(t testing.TB, src, dst string, mode os.FileMode) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dst, mode); err != nil {
		t.Fatal(err)
	}
}

// spec returns a RunSpec for args in execRoot on the host runtime, with
// out/ writable and output files in a fresh temp dir.
func spec(t testing.TB, execRoot string, args ...string) *executor.RunSpec {
	dir := t.TempDir()
	return &executor.RunSpec{
		ExecRoot:     execRoot,
		WritableDirs: []string{"out"},
		Args:         args,
		Env:          []string{shPath},
		Runtime:      sandbox.HostRuntimeName,
		StdoutPath:   filepath.Join(dir, "stdout"),
		StderrPath:   filepath.Join(dir, "stderr"),
	}
}

func shSpec(t testing.TB, execRoot, script string) *executor.RunSpec {
	return spec(t, execRoot, "/bin/sh", "-c", script)
}

// run runs s and returns the result and the command's stdout and stderr.
func run(t testing.TB, sb *sandbox.Sandbox, s *executor.RunSpec) (*executor.RunResult, string, string) {
	t.Helper()
	res, err := sb.Run(context.Background(), s)
	if err != nil {
		t.Fatalf("Run(%q): %v", s.Args, err)
	}
	stdout, _ := os.ReadFile(s.StdoutPath)
	stderr, _ := os.ReadFile(s.StderrPath)
	t.Logf("%q: exit=%d timedOut=%v oom=%v enforced=%q msg=%q wall=%v\nstdout:\n%s\nstderr:\n%s",
		s.Args, res.ExitCode, res.TimedOut, res.OOMKilled, res.Enforced, res.Message, res.Wall, stdout, stderr)
	return res, string(stdout), string(stderr)
}

// mustSucceed runs s and fails the test unless it exits 0.
func mustSucceed(t testing.TB, sb *sandbox.Sandbox, s *executor.RunSpec) string {
	t.Helper()
	res, stdout, stderr := run(t, sb, s)
	if res.ExitCode != 0 {
		t.Fatalf("%q exited %d: %s", s.Args, res.ExitCode, stderr)
	}
	return stdout
}
