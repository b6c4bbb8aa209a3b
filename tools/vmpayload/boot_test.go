package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
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
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/actiond/actiond/guest"
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
	src, err := vmpayload.ModuleRoot(".")
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

// newCASImage creates a sparse raw disk image.
func newCASImage(t *testing.T, dir string, size int64) string {
	t.Helper()
	p := filepath.Join(dir, "cas.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return p
}

// preparedCASImage copies the CAS image with the payload's runtimes
// prepared (internal/vmtest) into dir: these tests are about booting and
// serving, not about the first boot's runtime preparation (package guest
// tests that).
func preparedCASImage(t *testing.T, arch, dir string) string {
	t.Helper()
	p := filepath.Join(dir, "cas.img")
	vmtest.CopyPreparedCASImage(t, arch, p)
	return p
}

var readyRE = `msg="actiond guest ready".* boot=([0-9.]+)s`

// bootReady starts a VM and waits for the guest server; it returns the
// guest's boot-to-ready time (from its own log) and the host's.
func bootReady(t *testing.T, cfg vmConfig, timeout time.Duration) (*vm, float64, time.Duration) {
	t.Helper()
	v := startVM(t, cfg)
	m, err := v.waitConsole(readyRE, timeout)
	if err != nil {
		t.Fatal(err)
	}
	guestBoot, _ := strconv.ParseFloat(m[1], 64)
	return v, guestBoot, time.Since(v.started)
}

// client is the REAPI side of a test.
type client struct {
	t    *testing.T
	cc   *grpc.ClientConn
	sess *streammux.Session
	cas  repb.ContentAddressableStorageClient
	bs   bspb.ByteStreamClient
	exec repb.ExecutionClient
	ac   repb.ActionCacheClient
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
	return &client{t: t, cc: cc, sess: sess,
		cas:  repb.NewContentAddressableStorageClient(cc),
		bs:   bspb.NewByteStreamClient(cc),
		exec: repb.NewExecutionClient(cc),
		ac:   repb.NewActionCacheClient(cc)}
}

// close disconnects from the guest (the host end of the link closes).
func (c *client) close() {
	c.cc.Close()
	c.sess.Close()
}

func digestOf(data []byte) *repb.Digest {
	sum := sha256.Sum256(data)
	return &repb.Digest{Hash: hex.EncodeToString(sum[:]), SizeBytes: int64(len(data))}
}

func (c *client) write(ctx context.Context, data []byte) *repb.Digest {
	c.t.Helper()
	d := digestOf(data)
	stream, err := c.bs.Write(ctx)
	if err != nil {
		c.t.Fatal(err)
	}
	name := fmt.Sprintf("uploads/%x/blobs/%s/%d", time.Now().UnixNano(), d.Hash, d.SizeBytes)
	const chunk = 256 << 10
	for off := 0; ; off += chunk {
		end := min(off+chunk, len(data))
		req := &bspb.WriteRequest{WriteOffset: int64(off), Data: data[off:end], FinishWrite: end == len(data)}
		if off == 0 {
			req.ResourceName = name
		}
		if err := stream.Send(req); err != nil {
			c.t.Fatalf("bytestream write: %v", err)
		}
		if end == len(data) {
			break
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		c.t.Fatalf("bytestream write: %v", err)
	}
	if resp.CommittedSize != d.SizeBytes {
		c.t.Fatalf("committed %d bytes, want %d", resp.CommittedSize, d.SizeBytes)
	}
	return d
}

func (c *client) read(ctx context.Context, d *repb.Digest) []byte {
	c.t.Helper()
	stream, err := c.bs.Read(ctx, &bspb.ReadRequest{ResourceName: fmt.Sprintf("blobs/%s/%d", d.Hash, d.SizeBytes)})
	if err != nil {
		c.t.Fatal(err)
	}
	var out bytes.Buffer
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			c.t.Fatalf("bytestream read: %v", err)
		}
		out.Write(resp.Data)
	}
	return out.Bytes()
}

func (c *client) putProto(ctx context.Context, m proto.Message) *repb.Digest {
	c.t.Helper()
	data, err := proto.Marshal(m)
	if err != nil {
		c.t.Fatal(err)
	}
	d := digestOf(data)
	resp, err := c.cas.BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{Requests: []*repb.BatchUpdateBlobsRequest_Request{{Digest: d, Data: data}}})
	if err != nil {
		c.t.Fatal(err)
	}
	if code := resp.Responses[0].GetStatus().GetCode(); code != 0 {
		c.t.Fatalf("BatchUpdateBlobs: %v", resp.Responses[0].Status)
	}
	return d
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
	action := &repb.Action{CommandDigest: c.putProto(ctx, cmd), InputRootDigest: c.putProto(ctx, &repb.Directory{})}
	return c.putProto(ctx, action)
}

func (c *client) execute(ctx context.Context, action *repb.Digest) *repb.ExecuteResponse {
	c.t.Helper()
	stream, err := c.exec.Execute(ctx, &repb.ExecuteRequest{ActionDigest: action, SkipCacheLookup: true})
	if err != nil {
		c.t.Fatal(err)
	}
	for {
		op, err := stream.Recv()
		if err != nil {
			c.t.Fatalf("execute: %v", err)
		}
		if !op.Done {
			continue
		}
		if e := op.GetError(); e != nil {
			c.t.Fatalf("execute: %v", e)
		}
		resp := new(repb.ExecuteResponse)
		if err := op.GetResponse().UnmarshalTo(resp); err != nil {
			c.t.Fatal(err)
		}
		if s := resp.GetStatus(); s.GetCode() != 0 {
			c.t.Fatalf("execute: status %v", s)
		}
		return resp
	}
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
		c.t.Fatalf("exit code %d, stderr %q", r.ExitCode, c.read(ctx, r.StderrDigest))
	}
	if got := string(c.read(ctx, r.StdoutDigest)); got != "hi\n" {
		c.t.Fatalf("stdout %q, want \"hi\\n\"", got)
	}
	if len(r.OutputFiles) != 1 {
		c.t.Fatalf("output files %v", r.OutputFiles)
	}
	out := string(c.read(ctx, r.OutputFiles[0].Digest))
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
// and is killed; the third finds both blobs after the journal replay and
// powers off through the power button (QMP system_powerdown).
func TestBootAmd64(t *testing.T) {
	payload, m := payloadForTest(t, "amd64")
	dir := t.TempDir()
	cfg := vmConfig{Arch: "amd64", Payload: payload, Manifest: m, CASImage: preparedCASImage(t, "amd64", dir), Dir: dir}
	cfg.Accel = pickAccel(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// Boot 1: a disk with the runtimes prepared and an empty CAS.
	v, guestBoot, hostBoot := bootReady(t, cfg, 2*time.Minute)
	t.Logf("boot 1: ready %.3fs after kernel start, %s after qemu start", guestBoot, hostBoot.Round(time.Millisecond))
	c := newClient(t, v)
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
	for _, name := range m.RuntimeNames {
		if rt, _ := info["runtimes_prepared"].(map[string]any)[name].(map[string]any); rt["reused"] != true {
			t.Errorf("runtime %s was not reused from the prepared disk: %v", name, rt)
		}
	}
	blob := make([]byte, 3<<20)
	rand.Read(blob)
	t0 := time.Now()
	d := c.write(ctx, blob)
	up := time.Since(t0)
	t0 = time.Now()
	if got := c.read(ctx, d); !bytes.Equal(got, blob) {
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

	// Boot 2: same disk, no mkfs; the data is still there.
	v, guestBoot, hostBoot = bootReady(t, cfg, 2*time.Minute)
	t.Logf("boot 2: ready %.3fs after kernel start, %s after qemu start", guestBoot, hostBoot.Round(time.Millisecond))
	c = newClient(t, v)
	c.checkBlob(ctx, d, blob)
	if _, err := c.ac.GetActionResult(ctx, &repb.GetActionResultRequest{ActionDigest: action}); err != nil {
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
	d2 := c.write(ctx, blob2)
	// Power cut right after the acknowledgement: the CAS syncs the blob
	// and its directory entry before answering, so the disk must mount
	// again (journal replay, e2fsck -p) with every acknowledged blob.
	v.cmd.Process.Kill()
	v.wait(time.Minute)

	// Boot 3: after the crash the journal is replayed (e2fsck -p), both
	// blobs are there; power off with the power button (QMP
	// system_powerdown).
	v, guestBoot, hostBoot = bootReady(t, cfg, 2*time.Minute)
	t.Logf("boot 3 (after a power cut): ready %.3fs after kernel start, %s after qemu start", guestBoot, hostBoot.Round(time.Millisecond))
	c = newClient(t, v)
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
	missing, err := c.cas.FindMissingBlobs(ctx, &repb.FindMissingBlobsRequest{BlobDigests: []*repb.Digest{d}})
	if err != nil {
		c.t.Fatal(err)
	}
	if len(missing.MissingBlobDigests) != 0 {
		c.t.Fatalf("blob %s/%d lost", d.Hash, d.SizeBytes)
	}
	if got := c.read(ctx, d); !bytes.Equal(got, blob) {
		c.t.Fatalf("blob %s/%d changed", d.Hash, d.SizeBytes)
	}
}

// TestBootArm64 boots the arm64 payload once under qemu-system-aarch64
// (-M virt, cortex-a72, TCG) with virtio-pci devices as
// Virtualization.framework attaches them, and runs one action.
func TestBootArm64(t *testing.T) {
	payload, m := payloadForTest(t, "arm64")
	dir := t.TempDir()
	cfg := vmConfig{Arch: "arm64", Payload: payload, Manifest: m, CASImage: preparedCASImage(t, "arm64", dir), Dir: dir}
	cfg.Accel = pickAccel(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	v, guestBoot, hostBoot := bootReady(t, cfg, 3*time.Minute)
	t.Logf("arm64 boot: ready %.3fs after kernel start, %s after qemu start", guestBoot, hostBoot.Round(time.Millisecond))
	c := newClient(t, v)
	info, err := guest.Info(ctx, c.cc)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest info: %v", info)
	c.checkExecute(ctx, m.RuntimeNames[0])
	if err := guest.PowerOff(ctx, c.cc); err != nil {
		t.Fatal(err)
	}
	if err := v.wait(time.Minute); err != nil {
		t.Fatalf("power off: %v", err)
	}
}
