package payload_test

import (
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/grpctest"
	"github.com/actiond/actiond/internal/payload"
	"github.com/actiond/actiond/internal/srctree"
	"github.com/actiond/actiond/internal/testutil"
	"github.com/actiond/actiond/vmhost"
)

// TestStandaloneBinary builds the standalone actiond (-tags
// actiond_standalone) from a copy of the module with the payload of
// vmhost.DefaultPayloadDir staged into its embed directory (the clone's
// own embed directory is not touched), then checks that:
//   - serve-vm extracts the payload under --root/payload/<arch>,
//     byte-identical to the payload directory, and a second start writes
//     nothing (QEMU is pointed at a missing binary so that it stops there);
//   - as root with QEMU: serve-vm boots the extracted payload to SERVING
//     and stops on SIGTERM;
//   - as root: serve with no runtime directory mounts the embedded host
//     runtime images (`make runtimes`, staged beside the VM payload) and
//     offers their runtimes, and unmounts them on SIGTERM.
func TestStandaloneBinary(t *testing.T) {
	testutil.SkipIfShort(t, "builds a ~200 MB binary")
	arch := runtime.GOARCH
	payloadDir := vmhost.DefaultPayloadDir(arch)
	p, err := vmhost.FindPayload(payloadDir, arch)
	testutil.Require(t, err == nil && p.Runtimes != "", fmt.Sprintf("no VM payload with a runtimes disk in %s (make vm-payload): %v", payloadDir, err))
	// A snapshot: tools/vmpayload may rewrite the payload directory while
	// this test runs.
	payloadDir, p = snapshotPayload(t, payloadDir, p)
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}

	// The host runtime images `make runtimes` built, embedded for serve.
	rtDir := os.Getenv("ACTIOND_RUNTIME_DIR")
	if rtDir == "" {
		rtDir = "/var/cache/actiond/runtimes"
	}
	hostRuntimes, _ := filepath.Glob(filepath.Join(rtDir, "*.squashfs"))

	// Build from a copy of the module with the payload staged.
	mod := copyModule(t)
	start := time.Now()
	if err := payload.Stage(payloadDir, filepath.Join(mod, filepath.FromSlash(payload.StageDir)), hostRuntimes...); err != nil {
		t.Fatal(err)
	}
	t.Logf("staged the payload in %v", time.Since(start).Round(time.Millisecond))
	bin := filepath.Join(t.TempDir(), "actiond")
	start = time.Now()
	build := exec.Command(goTool, "build", "-trimpath", "-tags", "actiond_standalone", "-o", bin, "./cmd/actiond")
	build.Dir = mod
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build -tags actiond_standalone: %v\n%s", err, out)
	}
	st, err := os.Stat(bin)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("built the standalone binary in %v: %.1f MiB", time.Since(start).Round(time.Millisecond), float64(st.Size())/(1<<20))
	os.RemoveAll(mod) // 200 MB of staged files

	// Extraction, then no rewrite.
	root := filepath.Join(t.TempDir(), "vm")
	extracted := filepath.Join(root, "payload", arch)
	run := func() string {
		t.Helper()
		cmd := exec.Command(bin, "serve-vm", "--root", root, "--listen", "127.0.0.1:0", "--accel", "tcg", "--qemu", "/nonexistent/qemu-for-test")
		out, err := cmd.CombinedOutput()
		if err == nil {
			t.Fatalf("serve-vm with a missing qemu succeeded:\n%s", out)
		}
		return string(out)
	}
	start = time.Now()
	out := run()
	took := time.Since(start)
	if !strings.Contains(out, "extracted the embedded payload") {
		t.Fatalf("first start: no extraction logged:\n%s", out)
	}
	if !strings.Contains(out, "kernel="+filepath.Join(extracted, filepath.Base(p.Kernel))) {
		t.Fatalf("first start: serve-vm does not use the extracted kernel:\n%s", out)
	}
	t.Logf("first start (extraction) took %v", took.Round(time.Millisecond))
	mtimes := map[string]time.Time{}
	for _, src := range []string{p.Kernel, p.Initrd, p.Runtimes} {
		dst := filepath.Join(extracted, filepath.Base(src))
		if a, b := fileHash(t, src), fileHash(t, dst); a != b {
			t.Fatalf("%s: extracted sha256 %s, payload has %s", dst, b, a)
		}
		st, err := os.Stat(dst)
		if err != nil {
			t.Fatal(err)
		}
		mtimes[dst] = st.ModTime()
	}
	start = time.Now()
	out = run()
	if !strings.Contains(out, "embedded payload already extracted and unchanged") {
		t.Fatalf("second start: want no extraction:\n%s", out)
	}
	t.Logf("second start (nothing to extract) took %v", time.Since(start).Round(time.Millisecond))
	for dst, mt := range mtimes {
		if st, err := os.Stat(dst); err != nil || !st.ModTime().Equal(mt) {
			t.Fatalf("%s was rewritten by the second start", dst)
		}
	}

	testutil.RequireRoot(t) // the rest needs root (sandbox, mounts)

	t.Run("serve-vm boots", func(t *testing.T) {
		_, err := exec.LookPath("qemu-system-x86_64")
		testutil.Require(t, err == nil || arch != "amd64", "qemu-system-x86_64 not on PATH")
		addr, log, _ := startAndWait(t, bin, 3*time.Minute, "serve-vm", "--root", root, "--accel", "tcg")
		t.Logf("standalone serve-vm serving on %s", addr)
		if !strings.Contains(log(), "embedded payload already extracted and unchanged") {
			t.Errorf("serve-vm extracted again:\n%s", log())
		}
	})

	t.Run("serve uses the embedded runtimes", func(t *testing.T) {
		testutil.Require(t, len(hostRuntimes) > 0, "no host runtime images in "+rtDir+" to embed (make runtimes)")
		sroot := filepath.Join(t.TempDir(), "serve")
		_, log, stop := startAndWait(t, bin, time.Minute, "serve", "--root", sroot, "--runtime-dir", filepath.Join(t.TempDir(), "none"))
		l := log()
		if !strings.Contains(l, "using the embedded runtimes disk") {
			t.Fatalf("serve does not use the embedded runtimes disk:\n%s", l)
		}
		for _, rt := range []string{"glibc2.31", "glibc2.36", "glibc2.41"} {
			if !strings.Contains(l, rt) {
				t.Errorf("serve does not offer runtime %s:\n%s", rt, l)
			}
		}
		stop()
		mi, _ := os.ReadFile("/proc/self/mountinfo")
		if bytes.Contains(mi, []byte(filepath.Join(sroot, "runtimes-embedded"))) {
			t.Errorf("the embedded runtimes disk is still mounted after serve stopped")
		}
	})
}

// startAndWait starts bin args... --listen 127.0.0.1:PORT, waits until
// gRPC health says SERVING, and stops it with SIGTERM at cleanup (failing
// the test if it does not exit cleanly within a minute); stop does that
// earlier.
func startAndWait(t *testing.T, bin string, timeout time.Duration, args ...string) (addr string, log func() string, stop func()) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr = l.Addr().String()
	l.Close()
	var mu sync.Mutex
	var buf bytes.Buffer
	w := writerFunc(func(p []byte) (int, error) { mu.Lock(); defer mu.Unlock(); return buf.Write(p) })
	log = func() string { mu.Lock(); defer mu.Unlock(); return buf.String() }
	cmd := exec.Command(bin, append(args, "--listen", addr)...)
	cmd.Stdout, cmd.Stderr = w, w
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	var exitErr error
	done := false
	stop = func() {
		if done {
			return
		}
		done = true
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case exitErr = <-exited:
		case <-time.After(time.Minute):
			cmd.Process.Kill()
			exitErr = fmt.Errorf("killed: no exit within a minute of SIGTERM: %v", <-exited)
		}
		if exitErr != nil {
			t.Errorf("%s: %v", args[0], exitErr)
		}
	}
	t.Cleanup(func() {
		stop()
		if t.Failed() {
			t.Logf("%s log:\n%s", args[0], log())
		}
	})
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		select {
		case exitErr = <-exited:
			done = true
			t.Fatalf("%s exited during start-up: %v\n%s", args[0], exitErr, log())
		default:
		}
		if grpctest.Serving(addr, 2*time.Second) == nil {
			return addr, log, stop
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("%s not serving after %v", args[0], timeout)
	return "", nil, nil
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

func fileHash(t *testing.T, path string) string {
	t.Helper()
	d, err := cas.DigestFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return d.Hash
}

// copyModule copies this module's files (no .git, no bazel-* output links,
// nothing staged in the embed directory, no sockets or other special
// files) into a temporary directory.
func copyModule(t *testing.T) string {
	t.Helper()
	src, err := srctree.ModuleRoot(".")
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "mod")
	stage := filepath.Join(src, filepath.FromSlash(payload.StageDir))
	err = srctree.Copy(src, dst, func(rel string, d fs.DirEntry) bool {
		staged := filepath.Dir(filepath.Join(src, rel)) == stage && !d.IsDir() && d.Name() != ".gitignore" && d.Name() != "README"
		special := !d.IsDir() && !d.Type().IsRegular() && d.Type()&fs.ModeSymlink == 0
		return d.Name() == ".git" || strings.HasPrefix(d.Name(), "bazel-") || staged || special
	})
	if err != nil {
		t.Fatalf("copy module: %v", err)
	}
	return dst
}

// snapshotPayload copies the payload's manifest and files into a temporary
// directory and returns it with the copied payload's paths.
func snapshotPayload(t *testing.T, dir string, p vmhost.Payload) (string, vmhost.Payload) {
	t.Helper()
	snap := filepath.Join(t.TempDir(), "payload")
	if err := os.MkdirAll(snap, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, src := range []string{filepath.Join(dir, payload.ManifestName), p.Kernel, p.Initrd, p.Runtimes} {
		in, err := os.Open(src)
		if err != nil {
			t.Fatal(err)
		}
		out, err := os.Create(filepath.Join(snap, filepath.Base(src)))
		if err == nil {
			_, err = io.Copy(out, in)
			if cerr := out.Close(); err == nil {
				err = cerr
			}
		}
		in.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	return snap, vmhost.Payload{
		Kernel:   filepath.Join(snap, filepath.Base(p.Kernel)),
		Initrd:   filepath.Join(snap, filepath.Base(p.Initrd)),
		Runtimes: filepath.Join(snap, filepath.Base(p.Runtimes)),
	}
}
