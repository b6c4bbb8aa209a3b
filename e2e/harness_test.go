// Package e2e runs the real Bazel (Debian's bazel-bootstrap, 4.2.3) against
// a real `actiond serve` process, on the workspace in testdata/bazel.
//
// The helpers here are shared by the end-to-end tests: RequireBazel,
// CopyWorkspace, Bazel, ParseProcesses, OutputsHash and StartServer.
//
// Environment:
//
//	ACTIOND_BIN           use this actiond binary instead of building ./cmd/actiond
//	ACTIOND_BAZEL         the bazel binary (default: bazel on PATH)
//	ACTIOND_E2E_VERBOSE=1 log every Bazel invocation's output and the server log,
//	                      also when the test passes
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/bazelws"
	"github.com/actiond/actiond/internal/grpctest"
	"github.com/actiond/actiond/internal/srctree"
	"github.com/actiond/actiond/internal/testutil"
)

const (
	// bazelTimeout bounds one Bazel invocation.
	bazelTimeout = 10 * time.Minute
	// bazelMaxIdle is a safety net: Bazel() also runs `bazel shutdown` at
	// cleanup, but a test binary killed by -timeout cannot.
	bazelMaxIdle = 60
	// serverStartTimeout bounds the wait for the server to report SERVING.
	serverStartTimeout = 30 * time.Second
	// serverStopGrace is how long the server gets to exit after SIGTERM.
	serverStopGrace = 15 * time.Second
)

func verbose() bool { return os.Getenv("ACTIOND_E2E_VERBOSE") == "1" }

// TestMain removes the actiond binary built for this test binary.
func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// ModuleRoot is the directory holding go.mod, found by walking up from the
// test's working directory.
func ModuleRoot(t testing.TB) string {
	t.Helper()
	dir, err := srctree.ModuleRoot(".")
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// WorkspaceDir is the committed test workspace, testdata/bazel.
func WorkspaceDir(t testing.TB) string {
	t.Helper()
	return filepath.Join(ModuleRoot(t), "testdata", "bazel")
}

func bazelPath() string {
	if b := os.Getenv("ACTIOND_BAZEL"); b != "" {
		return b
	}
	return "bazel"
}

// RequireBazel skips the test (fails it under CI) when bazel is not
// available, and skips it under -short (a Bazel test takes a minute).
func RequireBazel(t testing.TB) {
	t.Helper()
	testutil.SkipIfShort(t, "a Bazel end-to-end test takes a minute")
	_, err := exec.LookPath(bazelPath())
	testutil.Require(t, err == nil, fmt.Sprintf("%s not on PATH (Debian: apt-get install bazel-bootstrap)", bazelPath()))
}

// CopyWorkspace copies the workspace src (normally WorkspaceDir) into a new
// temporary directory, leaving out bazel-* convenience symlinks and
// generated inputs, and runs its gen_inputs.sh there. It returns the copy's
// path.
func CopyWorkspace(t testing.TB, src string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "ws")
	if err := bazelws.Copy(src, dst); err != nil {
		t.Fatal(err)
	}
	return dst
}

// copyFile copies a regular file; see srctree.CopyFile.
var copyFile = srctree.CopyFile

var (
	bazelServersMu sync.Mutex
	bazelServers   = map[string]bool{} // "ws\x00outputUserRoot" with a cleanup registered
)

// Bazel runs `bazel <startup flags> args...` in the workspace ws and returns
// its combined stdout and stderr. args start with the command ("build",
// "test", "clean", ...).
//
// Startup flags: --output_user_root=outputUserRoot (use a per-test
// directory: a fresh Bazel server, output base and local caches), --nohome_rc
// (the caller's ~/.bazelrc stays out of it) and --max_idle_secs. The system
// rc file /etc/bazel/bazelrc is kept: Debian's Bazel needs its
// --install_base; its --sandbox_debug is undone by the workspace's .bazelrc.
// The first call for a (ws, outputUserRoot) pair registers a cleanup that
// runs `bazel shutdown` and makes the output tree deletable.
//
// The output is logged when the command fails or ACTIOND_E2E_VERBOSE=1.
func Bazel(t testing.TB, ws, outputUserRoot string, args ...string) (string, error) {
	t.Helper()
	startup := []string{
		"--output_user_root=" + outputUserRoot,
		"--nohome_rc",
		"--max_idle_secs=" + strconv.Itoa(bazelMaxIdle),
	}
	key := ws + "\x00" + outputUserRoot
	bazelServersMu.Lock()
	first := !bazelServers[key]
	bazelServers[key] = true
	bazelServersMu.Unlock()
	if first {
		t.Cleanup(func() {
			bazelServersMu.Lock()
			delete(bazelServers, key)
			bazelServersMu.Unlock()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, bazelPath(), append(startup, "shutdown")...)
			cmd.Dir = ws
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Logf("bazel shutdown: %v\n%s", err, out)
			}
			bazelws.MakeWritable(outputUserRoot)
		})
	}

	ctx, cancel := context.WithTimeout(context.Background(), bazelTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bazelPath(), append(startup, args...)...)
	cmd.Dir = ws
	cmd.Env = os.Environ()
	var buf bytes.Buffer
	cmd.Stdout = &buf
	cmd.Stderr = &buf
	cmd.WaitDelay = 10 * time.Second
	start := time.Now()
	err := cmd.Run()
	took := time.Since(start).Round(10 * time.Millisecond)
	out := buf.String()
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("bazel %s: timed out after %v: %w", strings.Join(args, " "), bazelTimeout, err)
		} else {
			err = fmt.Errorf("bazel %s: %w", strings.Join(args, " "), err)
		}
		t.Logf("$ bazel %s  (%v, %v)\n%s", strings.Join(args, " "), took, err, out)
	} else if verbose() {
		t.Logf("$ bazel %s  (%v)\n%s", strings.Join(args, " "), took, out)
	} else {
		t.Logf("$ bazel %s  (%v)", strings.Join(args, " "), took)
	}
	return out, err
}

// MustBazel is Bazel, failing the test when bazel fails.
func MustBazel(t testing.TB, ws, outputUserRoot string, args ...string) string {
	t.Helper()
	out, err := Bazel(t, ws, outputUserRoot, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// ParseProcesses parses Bazel's last process summary line in output; see
// bazelws.ParseProcesses.
func ParseProcesses(output string) map[string]int { return bazelws.ParseProcesses(output) }

// OutputsHash returns the sha256 (hex) of every regular file under the
// workspace's bazel-bin, keyed by its path relative to bazel-bin. Symlinks
// (runfiles trees) are not followed. With targets, only those outputs are
// hashed: each is a path relative to bazel-bin ("tree/tree") or a label of
// an output file or directory ("//tree:tree", "//cc:hello"); every one must
// exist.
func OutputsHash(t testing.TB, ws string, targets ...string) map[string]string {
	t.Helper()
	bin, err := filepath.EvalSymlinks(filepath.Join(ws, "bazel-bin"))
	if err != nil {
		t.Fatalf("OutputsHash: %v", err)
	}
	hashes := map[string]string{}
	hashTree := func(root string) {
		err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if !d.Type().IsRegular() {
				return nil
			}
			rel, err := filepath.Rel(bin, path)
			if err != nil {
				return err
			}
			sum, err := fileSHA256(path)
			if err != nil {
				return err
			}
			hashes[filepath.ToSlash(rel)] = sum
			return nil
		})
		if err != nil {
			t.Fatalf("OutputsHash: %v", err)
		}
	}
	if len(targets) == 0 {
		hashTree(bin)
		return hashes
	}
	for _, tgt := range targets {
		rel := labelToPath(tgt)
		p := filepath.Join(bin, filepath.FromSlash(rel))
		fi, err := os.Lstat(p)
		if err != nil {
			t.Fatalf("OutputsHash: output %s: %v", tgt, err)
		}
		if fi.Mode().IsRegular() || fi.IsDir() {
			hashTree(p)
		} else {
			t.Fatalf("OutputsHash: output %s is neither a file nor a directory (%v)", tgt, fi.Mode())
		}
	}
	return hashes
}

// labelToPath maps "//pkg:name" (or "//pkg", meaning "//pkg:pkg's last
// component") to "pkg/name"; anything else is returned as is.
func labelToPath(label string) string {
	if !strings.HasPrefix(label, "//") {
		return label
	}
	l := strings.TrimPrefix(label, "//")
	pkg, name, ok := strings.Cut(l, ":")
	if !ok {
		name = pkg[strings.LastIndex(pkg, "/")+1:]
	}
	if pkg == "" {
		return name
	}
	return pkg + "/" + name
}

func fileSHA256(path string) (string, error) {
	d, err := cas.DigestFile(path)
	return d.Hash, err
}

// DiffHashes describes how got differs from want (two OutputsHash results),
// one line per differing path, at most max lines; empty when they are equal.
func DiffHashes(want, got map[string]string, max int) []string {
	var keys []string
	seen := map[string]bool{}
	for k := range want {
		keys = append(keys, k)
		seen[k] = true
	}
	for k := range got {
		if !seen[k] {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	var diffs []string
	for _, k := range keys {
		w, inW := want[k]
		g, inG := got[k]
		var d string
		switch {
		case !inG:
			d = "missing: " + k
		case !inW:
			d = "unexpected: " + k
		case w != g:
			d = fmt.Sprintf("differs: %s (want %.12s, got %.12s)", k, w, g)
		default:
			continue
		}
		if len(diffs) == max {
			diffs = append(diffs, "...")
			break
		}
		diffs = append(diffs, d)
	}
	return diffs
}

// Server binary, built once per test binary.
var (
	buildOnce sync.Once
	buildDir  string
	buildBin  string
	buildErr  error
)

func actiondBinary(t testing.TB) string {
	t.Helper()
	if b := os.Getenv("ACTIOND_BIN"); b != "" {
		return b
	}
	root := ModuleRoot(t)
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "actiond-e2e-bin-")
		if buildErr != nil {
			return
		}
		goTool, err := exec.LookPath("go")
		if err != nil {
			goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
		}
		bin := filepath.Join(buildDir, "actiond")
		cmd := exec.Command(goTool, "build", "-o", bin, "./cmd/actiond")
		cmd.Dir = root
		start := time.Now()
		out, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build ./cmd/actiond: %v\n%s", err, out)
			return
		}
		t.Logf("built %s in %v", bin, time.Since(start).Round(time.Millisecond))
		buildBin = bin
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildBin
}

// StartServer starts `actiond serve --listen 127.0.0.1:PORT --root DIR
// args...` on a free port and returns its address once the gRPC health
// service reports SERVING. DIR is a new temporary directory unless args
// contain --root. At cleanup the server gets SIGTERM, then SIGKILL after a
// grace period (which fails the test: the server must stop on SIGTERM); its
// log is written to the test log when the test failed (or
// ACTIOND_E2E_VERBOSE=1).
func StartServer(t testing.TB, args ...string) string {
	t.Helper()
	addr, _ := StartServerWithLog(t, args...)
	return addr
}

// StartServerWithLog is StartServer, also returning a function that
// returns the server's output so far.
func StartServerWithLog(t testing.TB, args ...string) (addr string, log func() string) {
	t.Helper()
	bin := actiondBinary(t)
	hasRoot := false
	for _, a := range args {
		if a == "--root" || a == "-root" || strings.HasPrefix(a, "--root=") || strings.HasPrefix(a, "-root=") {
			hasRoot = true
		}
	}
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		addr, buf, err := startServer(t, bin, hasRoot, args)
		if err == nil {
			return addr, buf.String
		}
		lastErr = err
		if !errors.Is(err, errAddrInUse) {
			break
		}
	}
	t.Fatalf("starting actiond: %v", lastErr)
	return "", nil
}

var errAddrInUse = errors.New("address already in use")

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func startServer(t testing.TB, bin string, hasRoot bool, args []string) (string, *testutil.SyncBuffer, error) {
	t.Helper()
	port, err := freePort()
	if err != nil {
		return "", nil, err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	argv := []string{"serve", "--listen", addr}
	if !hasRoot {
		argv = append(argv, "--root", filepath.Join(t.TempDir(), "actiond-root"))
	}
	argv = append(argv, args...)

	log := &testutil.SyncBuffer{}
	cmd := exec.Command(bin, argv...)
	cmd.Stdout = log
	cmd.Stderr = log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // no orphan if the test binary dies
	if err := cmd.Start(); err != nil {
		return "", nil, err
	}
	exited := make(chan struct{})
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		close(exited)
	}()
	name := fmt.Sprintf("actiond serve (pid %d, %s)", cmd.Process.Pid, addr)

	// Stop the server when the test is done, and show its log if the test failed.
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		select {
		case <-exited:
			t.Logf("%s had already exited: %v", name, waitErr)
			return
		default:
		}
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
			if waitErr != nil {
				t.Logf("%s exited after SIGTERM: %v", name, waitErr)
			}
		case <-time.After(serverStopGrace):
			cmd.Process.Kill()
			<-exited
			t.Errorf("%s did not exit within %v of SIGTERM; killed", name, serverStopGrace)
		}
	}
	t.Cleanup(func() {
		stop()
		if t.Failed() || verbose() {
			t.Logf("%s log:\n%s", name, tail(log.String(), 1<<20))
		}
	})

	// Wait for TCP, then for SERVING.
	deadline := time.Now().Add(serverStartTimeout)
	for {
		select {
		case <-exited:
			out := log.String()
			if strings.Contains(out, "address already in use") {
				return "", nil, fmt.Errorf("%s: %w", name, errAddrInUse)
			}
			return "", nil, fmt.Errorf("%s exited during start-up: %v\n%s", name, waitErr, out)
		default:
		}
		if time.Now().After(deadline) {
			stop()
			return "", nil, fmt.Errorf("%s not serving after %v\n%s", name, serverStartTimeout, log.String())
		}
		if err := checkServing(addr); err == nil {
			t.Logf("%s serving: %s", name, strings.Join(argv, " "))
			return addr, log, nil
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// checkServing dials addr and asks the gRPC health service for the overall
// status.
func checkServing(addr string) error { return grpctest.Serving(addr, 2*time.Second) }

// tail returns at most the last max bytes of s, starting at a line.
func tail(s string, max int) string {
	if len(s) <= max {
		return s
	}
	s = s[len(s)-max:]
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	return "...\n" + s
}

// lines returns the lines of s that contain substr (for error messages).
func lines(s, substr string) string {
	var b strings.Builder
	sc := bufio.NewScanner(strings.NewReader(s))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		if strings.Contains(sc.Text(), substr) {
			b.WriteString(sc.Text())
			b.WriteByte('\n')
		}
	}
	return b.String()
}
