//go:build linux

package sandbox_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/actiond/actiond/executor"
)

func TestRunBasics(t *testing.T) {
	sb := newSandbox(t)
	root := newExecRoot(t, false)
	s := shSpec(t, root, `echo hello; pwd; cat in.txt; echo oops >&2; echo data > out/o.txt; exit 0`)
	stdout := mustSucceed(t, sb, s)
	if stdout != "hello\n/execroot\ninput\n" {
		t.Errorf("stdout = %q", stdout)
	}
	if b, _ := os.ReadFile(s.StderrPath); string(b) != "oops\n" {
		t.Errorf("stderr = %q", b)
	}
	if b, err := os.ReadFile(filepath.Join(root, "out/o.txt")); err != nil || string(b) != "data\n" {
		t.Errorf("output file: %q, %v", b, err)
	}
	if got := sb.Runtimes(); !slices.Equal(got, []string{"host"}) {
		t.Errorf("Runtimes() = %q", got)
	}
}

func TestWorkingDirectoryAndRelativeCommand(t *testing.T) {
	sb := newSandbox(t)
	root := newExecRoot(t, false)
	writeFile(t, filepath.Join(root, "pkg/tool.sh"), "#!/bin/sh\necho \"tool in $(pwd) with $1\"\n", 0o555)
	s := spec(t, root, "./tool.sh", "arg")
	s.WorkingDirectory = "pkg"
	if got := mustSucceed(t, sb, s); got != "tool in /execroot/pkg with arg\n" {
		t.Errorf("stdout = %q", got)
	}
}

func TestSameFileForStdoutAndStderr(t *testing.T) {
	sb := newSandbox(t)
	s := shSpec(t, newExecRoot(t, false), `echo one; echo two >&2; echo three`)
	s.StderrPath = s.StdoutPath
	if got := mustSucceed(t, sb, s); got != "one\ntwo\nthree\n" {
		t.Errorf("combined output = %q", got)
	}
}

func TestEnvironmentIsExactlyEnv(t *testing.T) {
	sb := newSandbox(t)
	s := spec(t, newExecRoot(t, false), "env") // also resolves argv[0] through PATH
	s.Env = []string{"PATH=/usr/bin:/bin", "FOO=bar baz", "EMPTY="}
	got := strings.Split(strings.TrimSpace(mustSucceed(t, sb, s)), "\n")
	slices.Sort(got)
	want := slices.Sorted(slices.Values(s.Env))
	if !slices.Equal(got, want) {
		t.Errorf("environment = %q, want %q", got, want)
	}
}

func TestCommandNotFound(t *testing.T) {
	sb := newSandbox(t)
	res, _, _ := run(t, sb, spec(t, newExecRoot(t, false), "no-such-tool-xyz"))
	if res.ExitCode != 127 || !strings.Contains(res.Message, "not found") {
		t.Errorf("exit %d, message %q; want 127 and a not-found message", res.ExitCode, res.Message)
	}
}

func TestExitCodes(t *testing.T) {
	sb := newSandbox(t)
	root := newExecRoot(t, false)
	for _, tc := range []struct {
		script string
		code   int
		msg    string
	}{
		{"exit 0", 0, ""},
		{"exit 3", 3, ""},
		{"kill -TERM $$", 128 + 15, "killed by signal SIGTERM"},
		{"kill -KILL $$", 128 + 9, "killed by signal SIGKILL"},
		{"kill -SEGV $$", 128 + 11, "killed by signal SIGSEGV"},
	} {
		res, _, _ := run(t, sb, shSpec(t, root, tc.script))
		if res.ExitCode != tc.code || res.Message != tc.msg || res.TimedOut || res.OOMKilled {
			t.Errorf("%q: exit %d, message %q; want %d, %q", tc.script, res.ExitCode, res.Message, tc.code, tc.msg)
		}
	}
}

func TestIdentityAndPrivileges(t *testing.T) {
	sb := newSandbox(t)
	s := shSpec(t, newExecRoot(t, false),
		`id -u; id -g; id -G; hostname; grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/self/status`)
	got := mustSucceed(t, sb, s)
	want := actionUID + "\n" + actionUID + "\n" + actionUID + "\nlocalhost\n" +
		"CapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n" +
		"CapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\n"
	if got != want {
		t.Errorf("got:\n%s\nwant:\n%s", got, want)
	}
}

func TestGeneratedEtc(t *testing.T) {
	sb := newSandbox(t)
	got := mustSucceed(t, sb, shSpec(t, newExecRoot(t, false), `ls /etc; cat /etc/hosts; getent passwd nobody; getent group nogroup; id -un`))
	for _, want := range []string{
		"alternatives\ngroup\nhosts\nld.so.cache\npasswd\n",
		"127.0.0.1\tlocalhost\n::1\tlocalhost\n",
		"nobody:x:65534:65534:",
		"nogroup:x:65534:",
		"\nactiond\n", // the action's own user has a name
	} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q:\n%s", want, got)
		}
	}
}

func TestUnknownRuntime(t *testing.T) {
	sb := newSandbox(t)
	s := shSpec(t, newExecRoot(t, false), "true")
	s.Runtime = "glibc9.99"
	_, err := sb.Run(context.Background(), s)
	var ure *executor.UnknownRuntimeError
	if !errors.As(err, &ure) || ure.Name != "glibc9.99" || !slices.Equal(ure.Available, []string{"host"}) {
		t.Fatalf("err = %v; want UnknownRuntimeError listing host", err)
	}
}

func TestInvalidSpecs(t *testing.T) {
	sb := newSandbox(t)
	root := newExecRoot(t, false)
	outside := t.TempDir()
	if err := os.Symlink(outside, filepath.Join(root, "link")); err != nil {
		t.Fatal(err)
	}
	for name, mod := range map[string]func(*executor.RunSpec){
		"relative execroot":       func(s *executor.RunSpec) { s.ExecRoot = "execroot" },
		"escaping writable dir":   func(s *executor.RunSpec) { s.WritableDirs = []string{"../x"} },
		"symlinked writable dir":  func(s *executor.RunSpec) { s.WritableDirs = []string{"link"} },
		"missing writable dir":    func(s *executor.RunSpec) { s.WritableDirs = []string{"nope"} },
		"escaping working dir":    func(s *executor.RunSpec) { s.WorkingDirectory = "../.." },
		"missing working dir":     func(s *executor.RunSpec) { s.WorkingDirectory = "nope" },
		"empty command":           func(s *executor.RunSpec) { s.Args = nil },
		"absolute working dir":    func(s *executor.RunSpec) { s.WorkingDirectory = "/etc" },
		"absolute writable dir":   func(s *executor.RunSpec) { s.WritableDirs = []string{"/tmp"} },
		"unwritable stdout":       func(s *executor.RunSpec) { s.StdoutPath = filepath.Join(outside, "no/such/dir") },
		"execroot is not a dir":   func(s *executor.RunSpec) { s.ExecRoot = filepath.Join(root, "in.txt") },
		"execroot does not exist": func(s *executor.RunSpec) { s.ExecRoot = filepath.Join(root, "missing") },
	} {
		s := shSpec(t, root, "true")
		mod(s)
		if _, err := sb.Run(context.Background(), s); err == nil {
			t.Errorf("%s: Run succeeded", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
}

func TestTimeoutKeepsPartialOutput(t *testing.T) {
	sb := newSandbox(t)
	s := shSpec(t, newExecRoot(t, false), `echo before; sleep 100; echo after`)
	s.Timeout = time.Second
	start := time.Now()
	res, stdout, _ := run(t, sb, s)
	if !res.TimedOut || res.ExitCode != 137 || !strings.Contains(res.Message, "timed out after 1s") {
		t.Errorf("result %+v; want a timeout", res)
	}
	if stdout != "before\n" {
		t.Errorf("stdout = %q; want the output written before the timeout", stdout)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Run took %v with a 1s timeout", d)
	}
}

func TestContextCancellation(t *testing.T) {
	sb := newSandbox(t)
	root := newExecRoot(t, false)
	marker := uniqueSleep()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := sb.Run(ctx, shSpec(t, root, "sleep "+marker+" & sleep "+marker))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("err = %v; want context.DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Run took %v after cancellation", d)
	}
	assertNoProcess(t, marker)

	cancelled, cancel2 := context.WithCancel(context.Background())
	cancel2()
	if _, err := sb.Run(cancelled, shSpec(t, root, "true")); !errors.Is(err, context.Canceled) {
		t.Errorf("err = %v; want context.Canceled", err)
	}
}

func TestBackgroundProcessesDieWithTheAction(t *testing.T) {
	sb := newSandbox(t)
	marker := uniqueSleep()
	// Plain, new-session, double-forked and nohup'ed: none may survive.
	script := fmt.Sprintf(`sleep %[1]s & setsid sleep %[1]s & (sleep %[1]s &) ; nohup sleep %[1]s >/dev/null 2>&1 & echo started`, marker)
	start := time.Now()
	if got := mustSucceed(t, sb, shSpec(t, newExecRoot(t, false), script)); got != "started\n" {
		t.Errorf("stdout = %q", got)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Run took %v; it must not wait for background processes", d)
	}
	assertNoProcess(t, marker)
}

// uniqueSleep returns a sleep duration (in seconds, about 1000) that
// identifies this test's processes in /proc.
func uniqueSleep() string {
	return fmt.Sprintf("1000.%09d", time.Now().UnixNano()%1e9)
}

// assertNoProcess fails if any process's command line contains marker.
func assertNoProcess(t *testing.T, marker string) {
	t.Helper()
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && strings.Contains(string(b), marker) {
			t.Errorf("process %s survived: %q", filepath.Dir(p), strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
}

func TestConcurrentRuns(t *testing.T) {
	sb := newSandbox(t)
	const n = 8
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			root := newExecRoot(t, false)
			s := shSpec(t, root, fmt.Sprintf("echo %d > out/id; cat out/id", i))
			res, err := sb.Run(context.Background(), s)
			if err != nil || res.ExitCode != 0 {
				t.Errorf("run %d: %v %+v", i, err, res)
				return
			}
			if b, _ := os.ReadFile(s.StdoutPath); string(b) != fmt.Sprintf("%d\n", i) {
				t.Errorf("run %d: stdout %q", i, b)
			}
		})
	}
	wg.Wait()
}

func BenchmarkRunTrivial(b *testing.B) {
	sb := newSandbox(b)
	s := spec(b, newExecRoot(b, false), "/bin/true")
	ctx := context.Background()
	for b.Loop() {
		res, err := sb.Run(ctx, s)
		if err != nil || res.ExitCode != 0 {
			b.Fatalf("%v %+v", err, res)
		}
	}
}
