package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/internal/streammux"
	"github.com/actiond/actiond/internal/tsc"
	"github.com/actiond/actiond/vmhost/vmpayload"
)

// The QEMU side of the boot tests, kept in one place: vmhost/qemu will
// replace it.

// qemuBinary is the system emulator for a payload architecture.
var qemuBinary = map[string]string{"amd64": "qemu-system-x86_64", "arm64": "qemu-system-aarch64"}

// vmConfig is one boot.
type vmConfig struct {
	Arch     string
	Payload  string              // payload directory
	Manifest *vmpayload.Manifest // its manifest
	CASImage string              // raw disk image for the CAS (created sparse by the caller)
	Dir      string              // for the sockets
	Extra    string              // more kernel command line
	Accel    string              // QEMU accelerator: tcg (default) or kvm
}

var (
	accelOnce sync.Once
	accelKVM  bool
)

// pickAccel returns ACTIOND_QEMU_ACCEL if set; otherwise kvm if a probe
// boot with KVM reaches the guest's init within 10 s (here /dev/kvm is
// PVM-backed and a stock kernel hangs under it), else tcg. Only a guest of
// the host's architecture can use KVM.
func pickAccel(t *testing.T, cfg vmConfig) string {
	if a := os.Getenv("ACTIOND_QEMU_ACCEL"); a != "" {
		return a
	}
	if cfg.Arch != runtime.GOARCH {
		return "tcg"
	}
	if _, err := os.Stat("/dev/kvm"); err != nil {
		return "tcg"
	}
	accelOnce.Do(func() {
		probe := cfg
		probe.Accel = "kvm"
		probe.Dir = t.TempDir()
		probe.CASImage = filepath.Join(probe.Dir, "none.img")
		os.WriteFile(probe.CASImage, nil, 0o644)
		v := startVM(t, probe)
		_, err := v.waitConsole(`msg="actiond guest starting"`, 10*time.Second)
		v.cmd.Process.Kill()
		v.wait(time.Minute)
		accelKVM = err == nil
		t.Logf("KVM probe: usable=%v (%v); set ACTIOND_QEMU_ACCEL=tcg|kvm to skip the probe", accelKVM, err)
	})
	if accelKVM {
		return "kvm"
	}
	return "tcg"
}

// vm is a running QEMU.
type vm struct {
	t       *testing.T
	cmd     *exec.Cmd
	sock    string
	qmpSock string
	started time.Time

	mu      sync.Mutex
	console []string
	changed chan struct{} // closed and replaced on every new line
	done    chan struct{} // closed when QEMU has exited
	waitErr error
}

// qemuArgs returns the command line: the machine (microvm for amd64, virt
// with virtio-pci like Virtualization.framework for arm64), TCG unless
// ACTIOND_QEMU_ACCEL says otherwise (KVM here is PVM-backed and breaks a
// stock kernel), the console on stdio, the CAS and runtimes disks, a
// virtio-serial port named "actiond" on a unix socket, entropy, and QMP.
func qemuArgs(cfg vmConfig, sock, qmp string) []string {
	accel := cfg.Accel
	if accel == "" {
		accel = "tcg"
	}
	kernel := filepath.Join(cfg.Payload, cfg.Manifest.Kernel)
	initrd := filepath.Join(cfg.Payload, cfg.Manifest.Initramfs)
	var args []string
	var dev func(kind string) string
	var cmdline string
	switch cfg.Arch {
	case "amd64":
		cpu := "max"
		if accel == "kvm" {
			cpu = "host"
		}
		args = []string{"-M", "microvm,rtc=on", "-cpu", cpu}
		dev = func(kind string) string { return kind + "-device" }
		cmdline = cfg.Manifest.Cmdlines["qemu-microvm"]
	case "arm64":
		args = []string{"-M", "virt", "-cpu", "cortex-a72"}
		dev = func(kind string) string { return kind + "-pci" }
		cmdline = cfg.Manifest.Cmdlines["qemu-virt"]
	}
	if cfg.Arch == "amd64" && accel == "tcg" {
		if khz := tsc.HostKHz(); khz > 0 {
			cmdline += fmt.Sprintf(" tsc_early_khz=%d", khz)
		}
	}
	if cfg.Extra != "" {
		cmdline += " " + cfg.Extra
	}
	args = append(args,
		"-accel", accel, "-m", "1024", "-smp", "2",
		"-display", "none", "-nodefaults", "-no-reboot", "-serial", "stdio",
		"-kernel", kernel, "-initrd", initrd, "-append", cmdline,
		"-drive", "id=cas,file="+cfg.CASImage+",format=raw,if=none,cache=writeback",
		"-device", dev("virtio-blk")+",drive=cas",
	)
	if cfg.Manifest.Runtimes != "" {
		args = append(args,
			"-drive", "id=rt,file="+filepath.Join(cfg.Payload, cfg.Manifest.Runtimes)+",format=raw,if=none,readonly=on",
			"-device", dev("virtio-blk")+",drive=rt")
	}
	args = append(args,
		"-device", dev("virtio-serial"),
		"-chardev", "socket,path="+sock+",server=on,wait=off,id=c0",
		"-device", "virtserialport,chardev=c0,name=actiond",
		"-device", dev("virtio-rng"),
		"-qmp", "unix:"+qmp+",server=on,wait=off",
	)
	return args
}

// startVM boots a VM; it is killed at the end of the test if still running.
func startVM(t *testing.T, cfg vmConfig) *vm {
	t.Helper()
	v := &vm{
		t:       t,
		sock:    filepath.Join(cfg.Dir, "actiond.sock"),
		qmpSock: filepath.Join(cfg.Dir, "qmp.sock"),
		changed: make(chan struct{}),
		done:    make(chan struct{}),
	}
	os.Remove(v.sock)
	os.Remove(v.qmpSock)
	args := qemuArgs(cfg, v.sock, v.qmpSock)
	t.Logf("%s %s", qemuBinary[cfg.Arch], strings.Join(args, " "))
	v.cmd = exec.Command(qemuBinary[cfg.Arch], args...)
	stdout, err := v.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	v.cmd.Stderr = v.cmd.Stdout
	v.started = time.Now()
	if err := v.cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := strings.TrimRight(sc.Text(), "\r")
			t.Logf("console %6.2fs| %s", time.Since(v.started).Seconds(), line)
			v.mu.Lock()
			v.console = append(v.console, line)
			close(v.changed)
			v.changed = make(chan struct{})
			v.mu.Unlock()
		}
	}()
	go func() {
		<-readDone
		v.waitErr = v.cmd.Wait()
		close(v.done)
	}()
	t.Cleanup(func() {
		select {
		case <-v.done:
		default:
			t.Logf("killing qemu")
			v.cmd.Process.Kill()
			<-v.done
		}
	})
	return v
}

// waitConsole waits for a console line matching re and returns its
// submatches.
func (v *vm) waitConsole(re string, timeout time.Duration) ([]string, error) {
	rx := regexp.MustCompile(re)
	deadline := time.After(timeout)
	seen := 0
	for {
		v.mu.Lock()
		lines, changed := v.console[seen:], v.changed
		seen = len(v.console)
		v.mu.Unlock()
		for _, l := range lines {
			if m := rx.FindStringSubmatch(l); m != nil {
				return m, nil
			}
		}
		select {
		case <-changed:
		case <-v.done:
			// Read whatever arrived last.
			v.mu.Lock()
			lines = v.console[seen:]
			v.mu.Unlock()
			for _, l := range lines {
				if m := rx.FindStringSubmatch(l); m != nil {
					return m, nil
				}
			}
			return nil, fmt.Errorf("qemu exited (%v) before the console showed %q", v.waitErr, re)
		case <-deadline:
			return nil, fmt.Errorf("console did not show %q within %s", re, timeout)
		}
	}
}

func (v *vm) consoleText() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return strings.Join(v.console, "\n")
}

// dial connects to the guest over the virtio-serial socket and returns a
// gRPC client whose every connection is a new streammux stream.
func (v *vm) dial() (*grpc.ClientConn, *streammux.Session, error) {
	link, err := net.Dial("unix", v.sock)
	if err != nil {
		return nil, nil, fmt.Errorf("connect to %s: %w", v.sock, err)
	}
	sess, err := streammux.Dial(link)
	if err != nil {
		link.Close()
		return nil, nil, err
	}
	cc, err := grpc.NewClient("passthrough:///actiond-guest",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return sess.Open() }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(actiond.MaxMessageSize), grpc.MaxCallSendMsgSize(actiond.MaxMessageSize)))
	if err != nil {
		sess.Close()
		return nil, nil, err
	}
	return cc, sess, nil
}

// qmp runs one QMP command (e.g. system_powerdown).
func (v *vm) qmp(command string) error {
	c, err := net.Dial("unix", v.qmpSock)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	dec := json.NewDecoder(c)
	var greeting map[string]any
	if err := dec.Decode(&greeting); err != nil {
		return fmt.Errorf("qmp greeting: %w", err)
	}
	for _, cmd := range []string{"qmp_capabilities", command} {
		if _, err := fmt.Fprintf(c, `{"execute":%q}`+"\n", cmd); err != nil {
			return err
		}
		for {
			var resp map[string]any
			if err := dec.Decode(&resp); err != nil {
				return fmt.Errorf("qmp %s: %w", cmd, err)
			}
			if e, ok := resp["error"]; ok {
				return fmt.Errorf("qmp %s: %v", cmd, e)
			}
			if _, ok := resp["return"]; ok {
				break
			}
			// an event; keep reading
		}
	}
	return nil
}

// wait waits for QEMU to exit.
func (v *vm) wait(timeout time.Duration) error {
	select {
	case <-v.done:
		return v.waitErr
	case <-time.After(timeout):
		return fmt.Errorf("qemu still running after %s", timeout)
	}
}
