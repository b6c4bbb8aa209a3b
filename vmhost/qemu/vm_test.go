package qemu

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/actiond/actiond/internal/testutil"
	"github.com/actiond/actiond/vmhost"
	"google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// payload returns the amd64 guest payload built by `actiond vm payload`, or
// skips (fails under CI) when it or QEMU is missing.
func payload(t testing.TB) vmhost.Payload {
	t.Helper()
	_, err := exec.LookPath(Binary("amd64"))
	testutil.Require(t, err == nil, "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
	testutil.Require(t, runtime.GOOS == "linux", "the qemu backend runs on Linux")
	dir := vmhost.DefaultPayloadDir("amd64")
	p, err := vmhost.FindPayload(dir, "amd64")
	testutil.Require(t, err == nil, "no guest payload: build it with `go run ./cmd/actiond vm payload` ("+errString(err)+")")
	return p
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// bootVM boots the payload under TCG with a fresh CAS image and waits
// until the guest is ready.
func bootVM(t testing.TB, casDir string) (*Machine, time.Duration) {
	t.Helper()
	p := payload(t)
	cas := filepath.Join(casDir, "cas.ext4")
	if _, _, err := vmhost.EnsureDiskImage(cas, 4<<30); err != nil {
		t.Fatal(err)
	}
	log := testLogger(t)
	console := vmhost.NewConsole(log, "guest", 0)
	m := New(Config{
		Config: vmhost.Config{
			Kernel: p.Kernel, Initrd: p.Initrd, RuntimesImage: p.Runtimes, CASImage: cas,
			Arch: "amd64", CPUs: 2, MemoryMiB: 1024, Logger: log, Console: console,
			ExtraCmdline: "actiond.drain=5s",
		},
		Accel:    AccelTCG,
		CPUModel: os.Getenv("ACTIOND_TEST_QEMU_CPU"), // e.g. qemu64, to compare CPU models
	})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	start := time.Now()
	if err := m.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		m.Stop(sctx)
	})
	if _, err := vmhost.WaitReady(ctx, m.DialGuest, vmhost.ReadyOptions{Timeout: 2 * time.Minute, Done: m.Done()}); err != nil {
		t.Fatalf("%v\nconsole:\n%s", err, console.Tail(60))
	}
	return m, time.Since(start)
}

// serveProxy serves a vmhost.Proxy to m's guest on a loopback port until
// the test ends and returns its address.
func serveProxy(t testing.TB, m *Machine) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &vmhost.Proxy{Dial: m.DialGuest}
	go p.Serve(l)
	t.Cleanup(func() { p.Close() })
	return l.Addr().String()
}

// TestBootServeStop boots the real payload under TCG over virtio-serial,
// proxies a health check through Serve's pieces, and powers the guest off.
func TestBootServeStop(t *testing.T) {
	m, took := bootVM(t, t.TempDir())
	t.Logf("boot to ready: %v (plan: accel=%s transport=%s)", took.Round(time.Millisecond), m.Plan().Accel, m.Plan().Transport)
	if !strings.Contains(m.Console().Tail(400), `msg="formatted the CAS disk"`) {
		t.Errorf("the guest did not format the blank CAS image:\n%s", m.Console().Tail(60))
	}
	if !strings.Contains(m.Plan().Cmdline, "tsc_early_khz=") {
		t.Errorf("TCG x86 command line lacks tsc_early_khz: %q", m.Plan().Cmdline)
	}
	// Through the proxy, over real TCP.
	addr := serveProxy(t, m)
	for i := range 3 {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := vmhost.CheckHealth(ctx, func(ctx context.Context) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", addr)
		})
		cancel()
		if err != nil {
			t.Fatalf("health check %d through the proxy: %v", i, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	t0 := time.Now()
	if err := m.Stop(ctx); err != nil {
		t.Fatalf("stop: %v\nconsole:\n%s", err, m.Console().Tail(40))
	}
	if err := m.Wait(); err != nil {
		t.Fatalf("wait after stop: %v", err)
	}
	t.Logf("power off took %v", time.Since(t0).Round(time.Millisecond))
}

// TestGuestFailureReportsConsole boots a guest that cannot start (its CAS
// disk is blank and formatting is forbidden): the VM powers off by itself
// and Wait returns an ExitError quoting the console.
func TestGuestFailureReportsConsole(t *testing.T) {
	p := payload(t)
	cas := filepath.Join(t.TempDir(), "cas.ext4")
	vmhost.EnsureDiskImage(cas, 1<<30)
	log := testLogger(t)
	m := New(Config{
		Config: vmhost.Config{Kernel: p.Kernel, Initrd: p.Initrd, CASImage: cas, Arch: "amd64", CPUs: 1, MemoryMiB: 512,
			Logger: log, ExtraCmdline: "actiond.format=never"},
		Accel: AccelTCG,
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := m.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer m.Stop(context.Background())
	select {
	case <-m.Done():
	case <-ctx.Done():
		t.Fatalf("the VM did not end; console:\n%s", m.Console().Tail(40))
	}
	err := m.Wait()
	var ee *vmhost.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("Wait = %v, want an ExitError", err)
	}
	if !strings.Contains(ee.Console, "format") {
		t.Errorf("the console tail does not say why:\n%s", ee.Console)
	}
	if _, err := m.DialGuest(ctx); !errors.Is(err, vmhost.ErrStopped) {
		t.Errorf("DialGuest after the end = %v", err)
	}
	t.Logf("reported: %v", err)
}

// TestPowerButton checks the fallback shutdown path: QMP system_powerdown
// (the microvm's ACPI GED power button), which the guest obeys too.
func TestPowerButton(t *testing.T) {
	m, _ := bootVM(t, t.TempDir())
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// What serve-vm reports of a guest that does not become ready: one
	// entry per vCPU, each with its program counter.
	st, err := m.CPUState(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("vCPUs: %s", st)
	cpus := strings.Split(st, "; ")
	if len(cpus) != m.cfg.CPUs {
		t.Errorf("CPUState %q: want an entry for each of %d vCPUs", st, m.cfg.CPUs)
	}
	for i, c := range cpus {
		if !strings.HasPrefix(c, fmt.Sprintf("cpu%d ", i)) || !(strings.Contains(c, " RIP=") || strings.Contains(c, " PC=")) {
			t.Errorf("CPUState entry %q: want cpu%d with its program counter", c, i)
		}
	}
	m.exit.Stopping()
	if _, err := m.qmp.execute(ctx, "system_powerdown", nil); err != nil {
		t.Fatal(err)
	}
	select {
	case <-m.Done():
	case <-ctx.Done():
		t.Fatalf("the guest ignored the power button; console:\n%s", m.Console().Tail(30))
	}
	if err := m.Wait(); err != nil {
		t.Fatal(err)
	}
}

// BenchmarkBootToReady measures QEMU start to a SERVING health check under
// TCG, with a fresh (blank, formatted on boot) CAS image each time.
func BenchmarkBootToReady(b *testing.B) {
	payload(b)
	for range b.N {
		m, took := bootVM(b, b.TempDir())
		b.ReportMetric(took.Seconds(), "s/boot")
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		m.Stop(ctx)
		cancel()
	}
}

// BenchmarkByteStreamUpload256M uploads a 256 MiB blob through the proxy
// and the virtio-serial transport into the guest's CAS (ByteStream.Write
// in 1 MiB chunks), as Bazel does.
func BenchmarkByteStreamUpload256M(b *testing.B) {
	m, _ := bootVM(b, b.TempDir())
	addr := serveProxy(b, m)
	const size = 256 << 20
	data := make([]byte, size)
	b.SetBytes(size)
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		binary.LittleEndian.PutUint64(data, uint64(i)+uint64(time.Now().UnixNano())) // a new blob each time
		sum := sha256.Sum256(data)
		b.StartTimer()
		uploadBlob(b, addr, data, hex.EncodeToString(sum[:]))
	}
}

func uploadBlob(b *testing.B, addr string, data []byte, hash string) {
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20), grpc.MaxCallSendMsgSize(64<<20)))
	if err != nil {
		b.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	w, err := bytestream.NewByteStreamClient(cc).Write(ctx)
	if err != nil {
		b.Fatal(err)
	}
	name := fmt.Sprintf("uploads/%d/blobs/%s/%d", time.Now().UnixNano(), hash, len(data))
	const chunk = 1 << 20
	for off := 0; off < len(data); off += chunk {
		end := min(off+chunk, len(data))
		req := &bytestream.WriteRequest{WriteOffset: int64(off), Data: data[off:end], FinishWrite: end == len(data)}
		if off == 0 {
			req.ResourceName = name
		}
		if err := w.Send(req); err != nil {
			b.Fatalf("send at %d: %v", off, err)
		}
	}
	resp, err := w.CloseAndRecv()
	if err != nil {
		b.Fatal(err)
	}
	if resp.CommittedSize != int64(len(data)) {
		b.Fatalf("committed %d of %d", resp.CommittedSize, len(data))
	}
}
