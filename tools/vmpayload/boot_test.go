package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"

	"github.com/actiond/actiond/guest"
	"github.com/actiond/actiond/internal/srctree"
	"github.com/actiond/actiond/internal/streammux"
	"github.com/actiond/actiond/internal/testutil"
	"github.com/actiond/actiond/internal/vmtest"
	"github.com/actiond/actiond/vmhost"
	"github.com/actiond/actiond/vmhost/vmpayload"
)

// payloadForTest builds (or finds up to date) the payload for arch in the
// default payload directory, or uses ACTIOND_VM_PAYLOAD_<ARCH> if set.
func payloadForTest(t *testing.T, arch string) (string, *vmpayload.Manifest) {
	t.Helper()
	testutil.SkipIfShort(t, "boots a VM under emulation (tens of seconds)")
	_, err := exec.LookPath(qemuBinary[arch])
	pkg := map[string]string{"amd64": "qemu-system-x86", "arm64": "qemu-system-arm"}[arch]
	testutil.Require(t, err == nil, qemuBinary[arch]+" not installed (apt-get install "+pkg+")")
	_, err = exec.LookPath("go")
	testutil.Require(t, err == nil, "go not on PATH")
	src, err := srctree.ModuleRoot(".")
	if err != nil {
		t.Fatal(err)
	}
	opts := vmpayload.Options{
		Arch:   arch,
		Dir:    vmhost.DefaultPayloadDir(arch),
		Src:    src,
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil)),
	}
	if d := os.Getenv("ACTIOND_VM_PAYLOAD_" + map[string]string{"amd64": "AMD64", "arm64": "ARM64"}[arch]); d != "" {
		opts.Dir = d
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	t0 := time.Now()
	m, err := vmpayload.Build(ctx, opts)
	if err != nil {
		t.Fatalf("build the %s payload: %v", arch, err)
	}
	t.Logf("payload %s ready in %s: kernel %s %s, initramfs %s %s (%s uncompressed), runtimes %v",
		opts.Dir, time.Since(t0).Round(time.Millisecond), m.Kernel, mib(m.Files[m.Kernel].Size),
		m.Initramfs, mib(m.Files[m.Initramfs].Size), mib(m.InitramfsRawSize), m.RuntimeNames)
	return opts.Dir, m
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// newCASImage creates a blank sparse raw disk image (the guest formats
// it).
func newCASImage(t *testing.T, dir string, size int64) string {
	t.Helper()
	p := filepath.Join(dir, "cas.img")
	if _, _, err := vmhost.EnsureDiskImage(p, size); err != nil {
		t.Fatal(err)
	}
	return p
}

// preparedConfig is a boot of arch's payload on a copy of the CAS image
// with the payload's runtimes prepared (internal/vmtest): these tests are
// about booting and serving, not about the first boot's runtime
// preparation (package guest tests that).
func preparedConfig(t *testing.T, arch string) vmConfig {
	t.Helper()
	payload, m := payloadForTest(t, arch)
	dir := t.TempDir()
	cfg := vmConfig{Arch: arch, Payload: payload, Manifest: m, CASImage: filepath.Join(dir, "cas.img"), Dir: dir}
	vmtest.CopyPreparedCASImage(t, arch, cfg.CASImage)
	cfg.Accel = pickAccel(t, cfg)
	return cfg
}

var readyRE = `msg="actiond guest ready".* boot=([0-9.]+)s`

// bootReady starts a VM, waits for the guest server and connects to it;
// it logs the guest's boot-to-ready time (from its own log) and the
// host's, for the boot named boot.
func bootReady(t *testing.T, cfg vmConfig, timeout time.Duration, boot string) (*vm, *client) {
	t.Helper()
	v := startVM(t, cfg)
	m, err := v.waitConsole(readyRE, timeout)
	if err != nil {
		t.Fatal(err)
	}
	guestBoot, _ := strconv.ParseFloat(m[1], 64)
	t.Logf("%s: ready %.3fs after kernel start, %s after qemu start", boot, guestBoot, time.Since(v.started).Round(time.Millisecond))
	return v, newClient(t, v)
}

// client is the REAPI side of a test, on one connection to the guest.
type client struct {
	*vmtest.Client
	t    *testing.T
	cc   *grpc.ClientConn
	sess *streammux.Session
}

func newClient(t *testing.T, v *vm) *client {
	t.Helper()
	cc, sess, err := v.dial()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close(); sess.Close() })
	if rtt, err := sess.Ping(); err != nil {
		t.Fatalf("streammux ping: %v", err)
	} else {
		t.Logf("host↔guest ping: %s", rtt)
	}
	return &client{Client: vmtest.NewClient(t, cc), t: t, cc: cc, sess: sess}
}

// close disconnects from the guest (the host end of the link closes).
func (c *client) close() {
	c.cc.Close()
	c.sess.Close()
}

// shellAction uploads a /bin/sh -c script action for runtime and returns
// its digest.
func (c *client) shellAction(ctx context.Context, script, runtime string) *repb.Digest {
	cmd := &repb.Command{
		Arguments:            []string{"/bin/sh", "-c", script},
		EnvironmentVariables: []*repb.Command_EnvironmentVariable{{Name: "PATH", Value: "/usr/bin:/bin"}},
		OutputFiles:          []string{"out.txt"},
		Platform:             &repb.Platform{Properties: []*repb.Platform_Property{{Name: "libc", Value: runtime}}},
	}
	action := &repb.Action{CommandDigest: c.Put(ctx, cmd), InputRootDigest: c.Put(ctx, &repb.Directory{})}
	return c.Put(ctx, action)
}

// execute runs action and fails the test unless it finished with an OK
// status.
func (c *client) execute(ctx context.Context, action *repb.Digest) *repb.ExecuteResponse {
	c.t.Helper()
	resp, err := c.Execute(ctx, action)
	if err != nil {
		c.t.Fatalf("execute: %v", err)
	}
	if s := resp.GetStatus(); s.GetCode() != 0 {
		c.t.Fatalf("execute: status %v", s)
	}
	return resp
}

// checkExecute runs `echo hi` in runtime and checks stdout and the output
// file; it returns the action digest.
func (c *client) checkExecute(ctx context.Context, runtime string) *repb.Digest {
	c.t.Helper()
	// The last line counts the guest's initramfs (rootfs) in the action's
	// mount table: the sandbox must have pivoted away from it.
	action := c.shellAction(ctx, "echo hi; { cat /etc/debian_version; uname -m; grep -c ' - rootfs ' /proc/self/mountinfo || true; } > out.txt", runtime)
	t0 := time.Now()
	resp := c.execute(ctx, action)
	r := resp.Result
	if r.ExitCode != 0 {
		c.t.Fatalf("exit code %d, stderr %q", r.ExitCode, c.Read(ctx, r.StderrDigest))
	}
	if got := string(c.Read(ctx, r.StdoutDigest)); got != "hi\n" {
		c.t.Fatalf("stdout %q, want \"hi\\n\"", got)
	}
	if len(r.OutputFiles) != 1 {
		c.t.Fatalf("output files %v", r.OutputFiles)
	}
	out := string(c.Read(ctx, r.OutputFiles[0].Digest))
	c.t.Logf("Execute in %s took %s; out.txt: %q", runtime, time.Since(t0).Round(time.Millisecond), out)
	if !strings.HasSuffix(out, "\n0\n") {
		c.t.Errorf("the action sees the guest's rootfs in its mount table (out.txt %q)", out)
	}
	return action
}

// TestBootAmd64 boots the amd64 payload under QEMU (microvm, TCG) three
// times on one CAS image (its runtimes prepared): the first boot reuses
// the runtimes and runs REAPI calls
// over the virtio-serial transport (Capabilities, ByteStream upload and
// download, an Execute in glibc2.36) and powers off through the guest
// control service; the second finds the blob and the action result on the
// persisted ext4 disk, survives the host reconnecting, stores another blob
// (under actiond.durability=group) and is killed; the third finds both
// blobs after the journal replay and
// powers off through the power button (QMP system_powerdown).
func TestBootAmd64(t *testing.T) {
	cfg := preparedConfig(t, "amd64")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// Boot 1: a disk with the runtimes prepared and an empty CAS.
	v, c := bootReady(t, cfg, 2*time.Minute, "boot 1")
	caps, err := repb.NewCapabilitiesClient(c.cc).GetCapabilities(ctx, &repb.GetCapabilitiesRequest{})
	if err != nil {
		t.Fatalf("GetCapabilities: %v", err)
	}
	if !caps.GetExecutionCapabilities().GetExecEnabled() {
		t.Fatalf("execution not enabled: %v", caps)
	}
	info, err := guest.Info(ctx, c.cc)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest info: %v", info)
	if info["cas_formatted"] != false {
		t.Errorf("boot 1 formatted a CAS disk that has a file system: %v", info)
	}
	for _, name := range cfg.Manifest.RuntimeNames {
		if rt, _ := info["runtimes_prepared"].(map[string]any)[name].(map[string]any); rt["reused"] != true {
			t.Errorf("runtime %s was not reused from the prepared disk: %v", name, rt)
		}
	}
	blob := make([]byte, 3<<20)
	rand.Read(blob)
	t0 := time.Now()
	d := c.Write(ctx, blob)
	up := time.Since(t0)
	t0 = time.Now()
	if got := c.Read(ctx, d); !bytes.Equal(got, blob) {
		t.Fatalf("read back %d bytes, differ from the %d written", len(got), len(blob))
	}
	t.Logf("ByteStream 3 MiB: write %s, read %s", up.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
	action := c.checkExecute(ctx, "glibc2.36")

	t0 = time.Now()
	if err := guest.PowerOff(ctx, c.cc); err != nil {
		t.Fatal(err)
	}
	if err := v.wait(time.Minute); err != nil {
		t.Fatalf("power off: %v", err)
	}
	t.Logf("power off (control service) took %s", time.Since(t0).Round(time.Millisecond))
	if _, err := v.waitConsole(`msg="powering off"`, time.Second); err != nil {
		t.Fatal(err)
	}

	// Boot 2: same disk, no mkfs; the data is still there. It runs with
	// group commit, the durability that keeps every acknowledged blob
	// through a power cut, which is what its end checks (the default,
	// writeback, may lose the last second's: TestVMWriteBackPowerCut in
	// ./guest covers that).
	cfg.Extra = "actiond.durability=group"
	v, c = bootReady(t, cfg, 2*time.Minute, "boot 2")
	c.checkBlob(ctx, d, blob)
	if _, err := c.ActionCache.GetActionResult(ctx, &repb.GetActionResultRequest{ActionDigest: action}); err != nil {
		t.Fatalf("action result lost across reboot: %v", err)
	}
	info, err = guest.Info(ctx, c.cc)
	if err != nil {
		t.Fatal(err)
	}
	if info["cas_formatted"] != false {
		t.Errorf("second boot formatted the CAS disk again: %v", info)
	}
	// The host goes away and comes back (serve-vm restarting): the
	// guest takes the new connection on the same virtio-serial port.
	c.close()
	time.Sleep(200 * time.Millisecond)
	c = newClient(t, v)
	if _, err := v.waitConsole(`msg="host connected".* session=2`, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	blob2 := make([]byte, 1<<20)
	rand.Read(blob2)
	d2 := c.Write(ctx, blob2)
	// Power cut right after the acknowledgement: under group commit the
	// CAS syncs the blob and its directory entry before answering, so the
	// disk must mount
	// again (journal replay, e2fsck -p) with every acknowledged blob.
	v.cmd.Process.Kill()
	v.wait(time.Minute)

	// Boot 3: after the crash the journal is replayed (e2fsck -p), both
	// blobs are there; power off with the power button (QMP
	// system_powerdown).
	v, c = bootReady(t, cfg, 2*time.Minute, "boot 3 (after a power cut)")
	c.checkBlob(ctx, d, blob)
	c.checkBlob(ctx, d2, blob2)
	info, err = guest.Info(ctx, c.cc)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("boot 3: e2fsck exit %v in %vs", info["fsck_exit"], info["fsck_s"])
	t0 = time.Now()
	if err := v.qmp("system_powerdown"); err != nil {
		t.Fatal(err)
	}
	if err := v.wait(time.Minute); err != nil {
		t.Fatalf("power button: %v", err)
	}
	t.Logf("power off (power button) took %s", time.Since(t0).Round(time.Millisecond))
	if _, err := v.waitConsole(`reason="power button`, time.Second); err != nil {
		t.Error(err)
	}
	if regexp.MustCompile(`level=(ERROR|WARN)`).MatchString(v.consoleText()) {
		t.Errorf("warnings or errors on the console (see the log)")
	}
}

// TestBootAmd64Crash checks that crashes reach the console and power the
// VM off instead of leaving it hung (or panicking the kernel): a panic in
// PID 1 (recovered, printed) and one in the server (a Go crash on another
// goroutine: PID 1 sees it exit).
func TestBootAmd64Crash(t *testing.T) {
	payload, m := payloadForTest(t, "amd64")
	for _, tc := range []struct{ where, want string }{
		{"init", `PANIC in init: actiond.crash=init`},
		{"server", `msg="shutting down after a failure".*the server exited unexpectedly: exit status 2`},
	} {
		t.Run(tc.where, func(t *testing.T) {
			dir := t.TempDir()
			cfg := vmConfig{Arch: "amd64", Payload: payload, Manifest: m, CASImage: newCASImage(t, dir, 1<<30), Dir: dir,
				Extra: "actiond.crash=" + tc.where}
			cfg.Accel = pickAccel(t, cfg)
			v := startVM(t, cfg)
			if err := v.wait(2 * time.Minute); err != nil {
				t.Fatalf("the VM did not power off after the crash: %v", err)
			}
			if _, err := v.waitConsole(tc.want, time.Second); err != nil {
				t.Error(err)
			}
			if _, err := v.waitConsole(`msg="powering off"`, time.Second); err != nil {
				t.Error(err)
			}
			if strings.Contains(v.consoleText(), "Kernel panic") {
				t.Error("kernel panic")
			}
		})
	}
}

// checkBlob checks that the guest has blob under d.
func (c *client) checkBlob(ctx context.Context, d *repb.Digest, blob []byte) {
	c.t.Helper()
	missing, err := c.CAS.FindMissingBlobs(ctx, &repb.FindMissingBlobsRequest{BlobDigests: []*repb.Digest{d}})
	if err != nil {
		c.t.Fatal(err)
	}
	if len(missing.MissingBlobDigests) != 0 {
		c.t.Fatalf("blob %s/%d lost", d.Hash, d.SizeBytes)
	}
	if got := c.Read(ctx, d); !bytes.Equal(got, blob) {
		c.t.Fatalf("blob %s/%d changed", d.Hash, d.SizeBytes)
	}
}

// TestBootArm64 boots the arm64 payload once under qemu-system-aarch64
// (-M virt, cortex-a72, TCG) with virtio-pci devices as
// Virtualization.framework attaches them, and runs one action.
func TestBootArm64(t *testing.T) {
	cfg := preparedConfig(t, "arm64")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	v, c := bootReady(t, cfg, 3*time.Minute, "arm64 boot")
	info, err := guest.Info(ctx, c.cc)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest info: %v", info)
	c.checkExecute(ctx, cfg.Manifest.RuntimeNames[0])
	if err := guest.PowerOff(ctx, c.cc); err != nil {
		t.Fatal(err)
	}
	if err := v.wait(time.Minute); err != nil {
		t.Fatalf("power off: %v", err)
	}
}
