package vmhost

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/known/emptypb"
)

func TestKernelParams(t *testing.T) {
	got := KernelParams{Console: "ttyS0", Transport: TransportSerial, Runtimes: true}.String()
	want := "console=ttyS0 panic=-1 loglevel=4 actiond.transport=serial actiond.serial=actiond actiond.cas=id:actiond-cas actiond.runtimes=id:actiond-runtimes"
	if got != want {
		t.Errorf("serial:\n got %s\nwant %s", got, want)
	}
	got = KernelParams{Console: "hvc0", Transport: TransportVsock, Extra: []string{"x=1"}}.String()
	want = "console=hvc0 actiond.console=hvc0 panic=-1 loglevel=4 actiond.transport=vsock actiond.port=8980 actiond.cas=id:actiond-cas actiond.runtimes=none x=1"
	if got != want {
		t.Errorf("vsock:\n got %s\nwant %s", got, want)
	}
	c := Config{RuntimesImage: "/r", ExtraCmdline: " actiond.loglevel=debug "}
	if s := c.CmdlineFor(KernelParams{Console: "ttyAMA0", Transport: TransportSerial}); !strings.HasSuffix(s, "actiond.runtimes=id:actiond-runtimes actiond.loglevel=debug") {
		t.Errorf("CmdlineFor = %q", s)
	}
	c.Cmdline = "console=ttyS0 init=/init"
	if s := c.CmdlineFor(KernelParams{}); s != "console=ttyS0 init=/init actiond.loglevel=debug" {
		t.Errorf("CmdlineFor with Cmdline = %q", s)
	}
	if len(CASDiskID) > 20 || len(RuntimesDiskID) > 20 {
		t.Error("virtio-blk serials are limited to 20 bytes")
	}
}

func TestConfigValidate(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "f")
	os.WriteFile(f, nil, 0o644)
	good := Config{Kernel: f, Initrd: f, CASImage: f}.WithDefaults()
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	bad := good
	bad.Arch, bad.Kernel, bad.MemoryMiB = "riscv64", filepath.Join(dir, "missing"), 64
	err := bad.Validate()
	for _, want := range []string{"riscv64", "kernel", "memory"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate() = %v, want a mention of %q", err, want)
		}
	}
}

func TestRunStepsAndCleanups(t *testing.T) {
	var order []string
	var c Cleanups
	steps := []Step{
		{"one", func(context.Context) error {
			order = append(order, "one")
			c.Add("undo one", func() error { order = append(order, "undo one"); return nil })
			return nil
		}},
		{"two", func(context.Context) error {
			c.Add("undo two", func() error { order = append(order, "undo two"); return errors.New("boom") })
			return errors.New("broken")
		}},
		{"three", func(context.Context) error { order = append(order, "three"); return nil }},
	}
	err := RunSteps(context.Background(), nil, steps)
	if err == nil || err.Error() != "two: broken" {
		t.Fatalf("RunSteps = %v", err)
	}
	cerr := c.Run()
	if cerr == nil || cerr.Error() != "undo two: boom" {
		t.Fatalf("Cleanups.Run = %v", cerr)
	}
	if got := strings.Join(order, ","); got != "one,undo two,undo one" {
		t.Fatalf("order %s", got)
	}
	if c.Run() != nil {
		t.Fatal("cleanups ran twice")
	}
}

func TestExitVerdicts(t *testing.T) {
	con := NewConsole(nil, "t", 0)
	con.Write([]byte("Kernel panic - not syncing: oops\n"))
	e := NewExit(con)
	e.Exited(nil) // nobody asked
	var ee *ExitError
	if err := e.Wait(); !errors.As(err, &ee) || !strings.Contains(err.Error(), "Kernel panic") {
		t.Fatalf("unexpected end: %v", err)
	}
	e = NewExit(con)
	e.Stopping()
	e.Exited(nil)
	if err := e.Wait(); err != nil {
		t.Fatalf("requested end: %v", err)
	}
	e = NewExit(nil)
	e.Exited(errors.New("exit status 1"))
	if err := e.Wait(); !errors.As(err, &ee) || !strings.Contains(err.Error(), "printed nothing") {
		t.Fatalf("failed VMM: %v", err)
	}
}

func TestGracefulStop(t *testing.T) {
	// The guest obeys.
	e := NewExit(nil)
	err := GracefulStop(context.Background(), e, func() error { go e.Exited(nil); return nil }, func() error { t.Error("killed"); return nil })
	if err != nil || e.Wait() != nil {
		t.Fatalf("obeying guest: %v, %v", err, e.Wait())
	}
	// The guest ignores the request: killed at the deadline.
	e = NewExit(nil)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	killed := false
	err = GracefulStop(ctx, e, func() error { return nil }, func() error { killed = true; go e.Exited(errors.New("signal: killed")); return nil })
	if err != nil || !killed {
		t.Fatalf("stubborn guest: err %v killed %v", err, killed)
	}
	if werr := e.Wait(); werr == nil || !strings.Contains(werr.Error(), "did not power off in time") {
		t.Fatalf("Wait after kill = %v", werr)
	}
	// The request fails: killed at once.
	e = NewExit(nil)
	err = GracefulStop(context.Background(), e, func() error { return errors.New("no route") }, func() error { go e.Exited(nil); return nil })
	if err == nil || !strings.Contains(err.Error(), "no route") {
		t.Fatalf("failed request: %v", err)
	}
	// Already ended: nothing to do.
	if err := GracefulStop(context.Background(), e, nil, nil); err != nil {
		t.Fatal(err)
	}
}

func TestFindPayload(t *testing.T) {
	dir := t.TempDir()
	if _, err := FindPayload(dir, "amd64"); err == nil || !strings.Contains(err.Error(), "actiond vm payload") {
		t.Fatalf("empty dir: %v", err)
	}
	for _, f := range []string{"vmlinux", "initramfs.cpio.gz", "runtimes.squashfs", "Image", "k2", "i2"} {
		os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o644)
	}
	p, err := FindPayload(dir, "amd64")
	if err != nil || filepath.Base(p.Kernel) != "vmlinux" || filepath.Base(p.Initrd) != "initramfs.cpio.gz" || filepath.Base(p.Runtimes) != "runtimes.squashfs" {
		t.Fatalf("amd64: %+v, %v", p, err)
	}
	// runtimes.tar (what vmhost/vmpayload makes) is preferred.
	os.WriteFile(filepath.Join(dir, "runtimes.tar"), []byte("x"), 0o644)
	if p, err := FindPayload(dir, "amd64"); err != nil || filepath.Base(p.Runtimes) != "runtimes.tar" {
		t.Fatalf("with runtimes.tar: %+v, %v", p, err)
	}
	if p, _ := FindPayload(dir, "arm64"); filepath.Base(p.Kernel) != "Image" {
		t.Fatalf("arm64: %+v", p)
	}
	os.WriteFile(filepath.Join(dir, "manifest.json"), []byte(`{"arch":"amd64","kernel":"k2","initramfs":"i2"}`), 0o644)
	if p, err := FindPayload(dir, "amd64"); err != nil || filepath.Base(p.Kernel) != "k2" || filepath.Base(p.Initrd) != "i2" {
		t.Fatalf("manifest: %+v, %v", p, err)
	}
	if _, err := FindPayload(dir, "arm64"); err == nil || !strings.Contains(err.Error(), "is for amd64") {
		t.Fatalf("manifest of another arch: %v", err)
	}
}

func TestEnsureDiskImageIsSparseAndKept(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "cas.ext4")
	created, size, err := EnsureDiskImage(path, 8<<30)
	if err != nil || !created || size != 8<<30 {
		t.Fatalf("create: %v %v %v", created, size, err)
	}
	st, _ := os.Stat(path)
	if st.Size() != 8<<30 {
		t.Fatalf("size %d", st.Size())
	}
	if blocks := st.Sys().(*syscall.Stat_t).Blocks; blocks > 8 {
		t.Fatalf("not sparse: %d blocks allocated", blocks)
	}
	created, size, err = EnsureDiskImage(path, 1<<30)
	if err != nil || created || size != 8<<30 {
		t.Fatalf("existing: %v %v %v", created, size, err)
	}
	unlock, err := LockFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := LockFile(path); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second lock: %v", err)
	}
	unlock()
	unlock2, err := LockFile(path)
	if err != nil {
		t.Fatalf("lock after unlock: %v", err)
	}
	unlock2()
}

// guestServer is a real gRPC server with health and a PowerOff method,
// standing in for the guest: tests of the host's lifecycle need a guest
// that answers, not a VM.
type guestServer struct {
	l        net.Listener
	g        *grpc.Server
	health   *health.Server
	poweroff chan struct{}
	once     sync.Once
}

func newGuestServer(t testing.TB) *guestServer {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &guestServer{l: l, g: grpc.NewServer(), health: health.NewServer(), poweroff: make(chan struct{})}
	healthpb.RegisterHealthServer(s.g, s.health)
	s.g.RegisterService(&grpc.ServiceDesc{
		ServiceName: GuestControlService,
		HandlerType: (*any)(nil),
		Methods: []grpc.MethodDesc{{MethodName: "PowerOff", Handler: func(srv any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			if err := dec(new(emptypb.Empty)); err != nil {
				return nil, err
			}
			s.once.Do(func() { close(s.poweroff) })
			return &emptypb.Empty{}, nil
		}}},
	}, struct{}{})
	go s.g.Serve(l)
	t.Cleanup(s.g.Stop)
	return s
}

func (s *guestServer) dial(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp", s.l.Addr().String())
}

func TestWaitReady(t *testing.T) {
	s := newGuestServer(t)
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	go func() {
		time.Sleep(200 * time.Millisecond)
		s.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	}()
	took, err := WaitReady(context.Background(), s.dial, ReadyOptions{Timeout: 10 * time.Second})
	if err != nil || took < 150*time.Millisecond {
		t.Fatalf("WaitReady = %v, %v", took, err)
	}
	// Timeout, naming the last error.
	_, err = WaitReady(context.Background(), func(ctx context.Context) (net.Conn, error) { return nil, errors.New("refused") },
		ReadyOptions{Timeout: 200 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "refused") || !strings.Contains(err.Error(), "timed out") {
		t.Fatalf("timeout: %v", err)
	}
	// The VM ends: the wait ends at once.
	done := make(chan struct{})
	close(done)
	t0 := time.Now()
	_, err = WaitReady(context.Background(), func(ctx context.Context) (net.Conn, error) { return nil, errors.New("refused") },
		ReadyOptions{Timeout: time.Minute, Done: done})
	if err == nil || !strings.Contains(err.Error(), "VM ended") || time.Since(t0) > 5*time.Second {
		t.Fatalf("vm ended: %v after %v", err, time.Since(t0))
	}
}

// stubMachine is a Machine whose "guest" is a guestServer: Start and the
// end of the VM are simulated, the guest traffic is real.
type stubMachine struct {
	s    *guestServer
	exit *Exit
}

func (m *stubMachine) Start(ctx context.Context) error {
	go func() {
		<-m.s.poweroff
		m.exit.Exited(nil)
	}()
	return nil
}
func (m *stubMachine) DialGuest(ctx context.Context) (net.Conn, error) { return m.s.dial(ctx) }
func (m *stubMachine) Wait() error                                     { return m.exit.Wait() }
func (m *stubMachine) Stop(ctx context.Context) error {
	return GracefulStop(ctx, m.exit, func() error { return RequestPowerOff(ctx, m.DialGuest) }, func() error { m.exit.Exited(nil); return nil })
}

func TestServeLifecycle(t *testing.T) {
	s := newGuestServer(t)
	m := &stubMachine{s: s, exit: NewExit(nil)}
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- Serve(ctx, m, l, ServeOptions{OnReady: func(time.Duration) { close(ready) }})
	}()
	<-ready
	// Clients reach the guest through the proxy.
	err := CheckHealth(context.Background(), func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", l.Addr().String())
	})
	if err != nil {
		t.Fatal(err)
	}
	cancel() // SIGTERM
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve after shutdown = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after shutdown")
	}
	select {
	case <-s.poweroff:
	default:
		t.Fatal("the guest was not asked to power off")
	}
}

func TestServeVMDies(t *testing.T) {
	s := newGuestServer(t)
	con := NewConsole(nil, "t", 0)
	m := &stubMachine{s: s, exit: NewExit(con)}
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	done := make(chan error, 1)
	go func() {
		done <- Serve(context.Background(), m, l, ServeOptions{OnReady: func(time.Duration) {
			con.Write([]byte("Kernel panic - not syncing: Attempted to kill init!\n"))
			m.exit.Exited(nil)
		}})
	}()
	select {
	case err := <-done:
		var ee *ExitError
		if !errors.As(err, &ee) || !strings.Contains(err.Error(), "Attempted to kill init") {
			t.Fatalf("Serve = %v, want an ExitError quoting the console", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return when the VM died")
	}
}

// cpuReportingMachine is a stubMachine that can say where its vCPUs are.
type cpuReportingMachine struct{ *stubMachine }

func (m cpuReportingMachine) CPUState(ctx context.Context) (string, error) {
	return "cpu0 RIP=ffffffff812f67b8 CPL=0 HLT=0; cpu1 RIP=ffffffff812f67b8 CPL=0 HLT=0", nil
}

// TestServeNotReadyReportsCPUs: a guest that never answers is stopped, and
// the error says where its vCPUs were.
func TestServeNotReadyReportsCPUs(t *testing.T) {
	s := newGuestServer(t)
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	m := cpuReportingMachine{&stubMachine{s: s, exit: NewExit(nil)}}
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	err := Serve(context.Background(), m, l, ServeOptions{Ready: ReadyOptions{Timeout: 300 * time.Millisecond}, StopTimeout: 10 * time.Second})
	if err == nil || !strings.Contains(err.Error(), "timed out") || !strings.Contains(err.Error(), "vCPUs: cpu0 RIP=ffffffff812f67b8 CPL=0 HLT=0; cpu1") {
		t.Fatalf("Serve = %v; want the readiness timeout with the vCPUs' state", err)
	}
}
