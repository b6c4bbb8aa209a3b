package e2e

// Helpers for the VM-mode end-to-end test (vm_test.go): start and stop
// `actiond serve-vm`, find and kill its QEMU child, and read blobs back
// from the server with a plain gRPC client.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/actiond/actiond/internal/testutil"
	"github.com/actiond/actiond/internal/vmtest"
	"github.com/actiond/actiond/vmhost"
)

const (
	// vmReadyTimeout bounds serve-vm's start-up: boot under TCG, the
	// guest formatting or recovering the CAS image, health SERVING.
	vmReadyTimeout = 3 * time.Minute
	// vmStopGrace is how long serve-vm gets to exit after SIGTERM (its
	// own bound is --drain-timeout + 15 s).
	vmStopGrace = 90 * time.Second
)

// vmAccel is the QEMU accelerator the VM tests use: $ACTIOND_VM_ACCEL, by
// default tcg (the CI machines' /dev/kvm cannot run Debian's kernel, and
// skipping the KVM probe saves a boot).
func vmAccel() string {
	if a := os.Getenv("ACTIOND_VM_ACCEL"); a != "" {
		return a
	}
	return "tcg"
}

// RequireVMPayload skips (fails under CI) unless QEMU for arch and the
// payload (`actiond vm payload`, `make vm-payload`) are present; it returns the payload
// directory.
func RequireVMPayload(t testing.TB, arch string) string {
	t.Helper()
	qemuBin := "qemu-system-x86_64"
	if arch == "arm64" {
		qemuBin = "qemu-system-aarch64"
	}
	_, err := exec.LookPath(qemuBin)
	testutil.Require(t, err == nil, qemuBin+" not on PATH (Debian: qemu-system-x86 / qemu-system-arm)")
	dir := vmhost.DefaultPayloadDir(arch)
	_, err = vmhost.FindPayload(dir, arch)
	testutil.Require(t, err == nil, fmt.Sprintf("no VM payload in %s (go run ./cmd/actiond vm payload --arch %s): %v", dir, arch, err))
	return dir
}

// VMServer is one `actiond serve-vm` process started by StartServeVM.
type VMServer struct {
	Addr string
	Root string
	// BootToReady is the time from process start to health SERVING.
	BootToReady time.Duration

	t      testing.TB
	name   string
	cmd    *exec.Cmd
	log    *testutil.SyncBuffer
	exited chan struct{}
	err    error // cmd.Wait's result, valid once exited is closed
}

// Log returns serve-vm's output so far.
func (s *VMServer) Log() string { return s.log.String() }

// Pid is serve-vm's process id.
func (s *VMServer) Pid() int { return s.cmd.Process.Pid }

// Exited reports whether the process has ended.
func (s *VMServer) Exited() bool {
	select {
	case <-s.exited:
		return true
	default:
		return false
	}
}

// WaitExit waits up to d for the process to end and returns its exit error
// (nil for status 0); it fails the test on timeout.
func (s *VMServer) WaitExit(d time.Duration) error {
	s.t.Helper()
	select {
	case <-s.exited:
		return s.err
	case <-time.After(d):
		s.t.Fatalf("%s still running %v later", s.name, d)
		return nil
	}
}

// Stop sends SIGTERM and waits for a clean exit (status 0); after
// vmStopGrace it kills the process and fails the test. It returns how long
// the stop took. Stopping a stopped server is a no-op.
func (s *VMServer) Stop() time.Duration {
	s.t.Helper()
	if s.Exited() {
		return 0
	}
	start := time.Now()
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
		if s.err != nil {
			s.t.Errorf("%s exited after SIGTERM: %v", s.name, s.err)
		}
	case <-time.After(vmStopGrace):
		s.cmd.Process.Kill()
		<-s.exited
		s.t.Errorf("%s did not exit within %v of SIGTERM; killed", s.name, vmStopGrace)
	}
	return time.Since(start)
}

// QEMUPid returns the pid of serve-vm's QEMU child: the child process
// (from /proc/<pid>/task/*/children) whose comm starts with "qemu-system".
// Only the process this test started is looked at; nothing is matched by
// name system-wide.
func (s *VMServer) QEMUPid() (int, error) {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", s.Pid()))
	if err != nil {
		return 0, err
	}
	var found []int
	for _, f := range tasks {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // the thread ended
		}
		for _, field := range strings.Fields(string(b)) {
			pid, err := strconv.Atoi(field)
			if err != nil {
				continue
			}
			comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
			if err == nil && strings.HasPrefix(strings.TrimSpace(string(comm)), "qemu-system") {
				found = append(found, pid)
			}
		}
	}
	switch len(found) {
	case 0:
		return 0, fmt.Errorf("%s has no qemu-system child", s.name)
	case 1:
		return found[0], nil
	default:
		return 0, fmt.Errorf("%s has several qemu-system children: %v", s.name, found)
	}
}

// StartServeVM starts `actiond serve-vm --listen ADDR --root root --accel
// vmAccel() args...` and waits until the gRPC health service answers
// SERVING through the proxy. addr "" picks a free loopback port. At
// cleanup the server is stopped (Stop) and its log written to the test log
// when the test failed (or ACTIOND_E2E_VERBOSE=1).
func StartServeVM(t testing.TB, addr, root string, args ...string) *VMServer {
	t.Helper()
	return startServeVMWrapped(t, addr, root, nil, actiondBinary(t), args...)
}

// startServeVMWrapped is StartServeVM running bin through wrap (e.g.
// setpriv ... env -i ...: serve-vm as an unprivileged user).
func startServeVMWrapped(t testing.TB, addr, root string, wrap []string, bin string, args ...string) *VMServer {
	t.Helper()
	if addr == "" {
		port, err := freePort()
		if err != nil {
			t.Fatal(err)
		}
		addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	}
	argv := append([]string{"serve-vm", "--listen", addr, "--root", root, "--accel", vmAccel()}, args...)
	s := &VMServer{Addr: addr, Root: root, t: t, log: &testutil.SyncBuffer{}, exited: make(chan struct{})}
	full := append(append(append([]string{}, wrap...), bin), argv...)
	s.cmd = exec.Command(full[0], full[1:]...)
	s.cmd.Stdout = s.log
	s.cmd.Stderr = s.log
	// No orphan if the test binary dies (QEMU has its own Pdeathsig).
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s.name = fmt.Sprintf("actiond serve-vm (pid %d, %s)", s.cmd.Process.Pid, addr)
	go func() {
		s.err = s.cmd.Wait()
		close(s.exited)
	}()
	t.Cleanup(func() {
		s.Stop()
		if t.Failed() || verbose() {
			t.Logf("%s log:\n%s", s.name, tail(s.Log(), 256<<10))
			if b, err := os.ReadFile(filepath.Join(root, "console.log")); err == nil {
				t.Logf("%s console.log (tail):\n%s", s.name, tail(string(b), 32<<10))
			}
		}
	})

	deadline := start.Add(vmReadyTimeout)
	for {
		if s.Exited() {
			t.Fatalf("%s exited during start-up: %v\n%s", s.name, s.err, s.Log())
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not serving after %v", s.name, vmReadyTimeout)
		}
		if err := checkServing(addr); err == nil {
			s.BootToReady = time.Since(start)
			t.Logf("%s serving after %v: %s", s.name, s.BootToReady.Round(10*time.Millisecond), strings.Join(argv, " "))
			return s
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// BlobRef is a blob's digest: lowercase hex SHA-256 and size.
type BlobRef struct {
	Hash string
	Size int64
}

// FileBlobs returns the digest of every regular file under dir.
func FileBlobs(t testing.TB, dir string) map[string]BlobRef {
	t.Helper()
	res := map[string]BlobRef{}
	err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		sum, err := fileSHA256(path)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		res[filepath.ToSlash(rel)] = BlobRef{Hash: sum, Size: info.Size()}
		return nil
	})
	if err != nil {
		t.Fatalf("FileBlobs %s: %v", dir, err)
	}
	return res
}

// errBlobMismatch marks a blob whose bytes do not match its digest.
var errBlobMismatch = errors.New("wrong blob")

// CheckBlobs asks the server at addr which of blobs it has
// (FindMissingBlobs) and reads every present one back through ByteStream,
// hashing it. It returns how many were present and how many missing; a
// blob read back with other bytes than its digest says is an error that
// wraps errBlobMismatch. A blob that FindMissingBlobs reported present and
// whose read says NotFound counts as missing (it may have vanished in a
// crash) but is logged.
func CheckBlobs(t testing.TB, addr string, blobs map[string]BlobRef) (present, missing int, err error) {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)))
	if err != nil {
		return 0, 0, err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	uniq := map[BlobRef]string{}
	var digests []*repb.Digest
	for name, b := range blobs {
		if _, ok := uniq[b]; ok {
			continue
		}
		uniq[b] = name
		digests = append(digests, &repb.Digest{Hash: b.Hash, SizeBytes: b.Size})
	}
	resp, err := repb.NewContentAddressableStorageClient(conn).FindMissingBlobs(ctx, &repb.FindMissingBlobsRequest{BlobDigests: digests})
	if err != nil {
		return 0, 0, fmt.Errorf("FindMissingBlobs: %w", err)
	}
	isMissing := map[BlobRef]bool{}
	for _, d := range resp.GetMissingBlobDigests() {
		isMissing[BlobRef{Hash: d.GetHash(), Size: d.GetSizeBytes()}] = true
	}
	bs := bspb.NewByteStreamClient(conn)
	var errs []error
	for b, name := range uniq {
		if isMissing[b] {
			missing++
			continue
		}
		if b.Size == 0 {
			present++ // the empty blob is always present; nothing to read
			continue
		}
		stream, err := bs.Read(ctx, &bspb.ReadRequest{ResourceName: fmt.Sprintf("blobs/%s/%d", b.Hash, b.Size)})
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: Read: %w", name, err))
			continue
		}
		h := sha256.New()
		var n int64
		var rerr error
		for {
			msg, err := stream.Recv()
			if err == io.EOF {
				break
			}
			if err != nil {
				rerr = err
				break
			}
			h.Write(msg.GetData())
			n += int64(len(msg.GetData()))
		}
		if rerr != nil {
			if strings.Contains(rerr.Error(), "NotFound") {
				t.Logf("%s (%s/%d): FindMissingBlobs said present, Read says %v", name, b.Hash, b.Size, rerr)
				missing++
				continue
			}
			errs = append(errs, fmt.Errorf("%s: Read: %w", name, rerr))
			continue
		}
		got := hex.EncodeToString(h.Sum(nil))
		if got != b.Hash || n != b.Size {
			errs = append(errs, fmt.Errorf("%s: %w: want %s/%d, read %s/%d", name, errBlobMismatch, b.Hash, b.Size, got, n))
			continue
		}
		present++
	}
	return present, missing, errors.Join(errs...)
}

// seedPreparedCASImage puts a copy of the CAS image with arch's runtimes
// prepared (internal/vmtest) where serve-vm --root root looks for its CAS
// image, owned by owner ("uid:gid", or "" for root).
func seedPreparedCASImage(t *testing.T, arch, root, owner string) {
	t.Helper()
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(root, "cas.ext4")
	vmtest.CopyPreparedCASImage(t, arch, img)
	if owner != "" {
		if out, err := exec.Command("chown", owner, img).CombinedOutput(); err != nil {
			t.Fatalf("chown %s: %v %s", img, err, out)
		}
	}
}
