//go:build linux

package guest

// VM tests of the guest's runtimes and limits: the payload's kernel and
// initramfs from tools/vmpayload (with /init replaced by this tree's
// actiond, appended as a second initramfs archive), booted under QEMU
// (TCG) through vmhost/qemu, with a tar runtimes disk written by the test
// in the payload builder's format.

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/testutil"
	"github.com/actiond/actiond/internal/vmtest"
	"github.com/actiond/actiond/vmhost"
	"github.com/actiond/actiond/vmhost/qemu"
)

// vmPayload returns the payload for arch, or skips (fails under CI).
func vmPayload(t *testing.T, arch string) vmhost.Payload {
	t.Helper()
	testutil.SkipIfShort(t, "boots a VM under emulation (minutes)")
	testutil.RequireRoot(t)
	_, err := exec.LookPath(qemu.Binary(arch))
	testutil.Require(t, err == nil, qemu.Binary(arch)+" not installed (Debian: qemu-system-x86 / qemu-system-arm)")
	dir := vmhost.DefaultPayloadDir(arch)
	p, err := vmhost.FindPayload(dir, arch)
	testutil.Require(t, err == nil && p.Runtimes != "", fmt.Sprintf("no VM payload with runtimes in %s (go run ./cmd/actiond vm payload --arch %s): %v", dir, arch, err))
	return p
}

// testInitrd returns the payload's initramfs with /init replaced by this
// tree's actiond (cross-built, static), so that the VM runs the code under
// test: the kernel unpacks concatenated archives in order, a later file
// replacing an earlier one.
func testInitrd(t *testing.T, p vmhost.Payload, arch string) string {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "actiond")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, "./cmd/actiond")
	cmd.Dir = ".."
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+arch)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/actiond for %s: %v\n%s", arch, err, out)
	}
	orig, err := os.ReadFile(p.Initrd)
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	b.Write(orig)
	for b.Len()%4 != 0 {
		b.WriteByte(0)
	}
	writeNewc(&b, "init", 0o100755, data)
	writeNewc(&b, "TRAILER!!!", 0, nil)
	out := filepath.Join(dir, "initrd")
	if err := os.WriteFile(out, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return out
}

// writeNewc appends one newc (SVR4, no CRC) cpio entry.
func writeNewc(b *bytes.Buffer, name string, mode uint32, data []byte) {
	fmt.Fprintf(b, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		0, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
	b.WriteString(name)
	b.WriteByte(0)
	for b.Len()%4 != 0 {
		b.WriteByte(0)
	}
	b.Write(data)
	for b.Len()%4 != 0 {
		b.WriteByte(0)
	}
}

// payloadRuntimeTree extracts runtime name from the payload's tar
// runtimes disk (the builder's first stage: unpacked, not configured) into
// a temporary directory, the way the guest does.
func payloadRuntimeTree(t *testing.T, p vmhost.Payload, name string) string {
	t.Helper()
	f, err := os.Open(p.Runtimes)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	if _, err := readRuntimesManifest(tr, ""); err != nil {
		t.Fatalf("%s: %v", p.Runtimes, err)
	}
	for {
		hdr, err := tr.Next()
		if err != nil {
			t.Fatalf("runtime %s not in %s: %v", name, p.Runtimes, err)
		}
		if filepath.Clean(hdr.Name) != name+".tar.zst" {
			continue
		}
		tree := filepath.Join(t.TempDir(), name)
		if err := os.Mkdir(tree, 0o755); err != nil {
			t.Fatal(err)
		}
		if _, err := extractTree(tr, tree); err != nil {
			t.Fatalf("extract %s from %s: %v", name, p.Runtimes, err)
		}
		// The builder's second stage is replaced by the test's.
		os.RemoveAll(filepath.Join(tree, ".actiond"))
		return tree
	}
}

// squashfsRuntimesDisk makes a SquashFS runtimes disk (a directory per
// runtime) holding tree as runtime name.
func squashfsRuntimesDisk(t *testing.T, tree, name string) string {
	t.Helper()
	_, err := exec.LookPath("mksquashfs")
	testutil.Require(t, err == nil, "mksquashfs not installed (apt-get install squashfs-tools)")
	parent := t.TempDir()
	if err := os.Rename(tree, filepath.Join(parent, name)); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "runtimes.squashfs")
	if out, err := exec.Command("mksquashfs", parent, img, "-noappend", "-quiet", "-no-progress").CombinedOutput(); err != nil {
		t.Fatalf("mksquashfs: %v\n%s", err, out)
	}
	return img
}

// testVM is one boot.
type testVM struct {
	t       *testing.T
	m       *qemu.Machine
	console *testutil.SyncBuffer
	cc      *grpc.ClientConn
	client  *vmtest.Client
}

func bootTestVM(t *testing.T, arch, initrd, kernel, cas, runtimes, extra string, wait bool) *testVM {
	t.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	console := vmhost.NewConsole(log, "guest", 0)
	buf := &testutil.SyncBuffer{}
	if testing.Verbose() {
		console.SetFile(io.MultiWriter(buf, os.Stderr))
	} else {
		console.SetFile(buf)
	}
	m := qemu.New(qemu.Config{
		Config: vmhost.Config{
			Kernel: kernel, Initrd: initrd, RuntimesImage: runtimes, CASImage: cas,
			Arch: arch, CPUs: 2, MemoryMiB: 1536, Logger: log, Console: console,
			ExtraCmdline: strings.TrimSpace("actiond.drain=5s " + extra),
		},
		Accel: qemu.AccelTCG,
	})
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	if err := m.Start(ctx); err != nil {
		t.Fatal(err)
	}
	v := &testVM{t: t, m: m, console: buf}
	t.Cleanup(func() {
		v.stop()
		if t.Failed() {
			t.Logf("console:\n%s", tailString(buf.String(), 64<<10))
		}
	})
	if !wait {
		return v
	}
	if _, err := vmhost.WaitReady(ctx, m.DialGuest, vmhost.ReadyOptions{Timeout: 14 * time.Minute, Done: m.Done()}); err != nil {
		t.Fatalf("%v\nconsole:\n%s", err, tailString(buf.String(), 32<<10))
	}
	cc, err := grpc.NewClient("passthrough:///guest",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return m.DialGuest(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	v.cc = cc
	v.client = vmtest.NewClient(t, cc)
	return v
}

func tailString(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// stop powers the guest off (a clean shutdown).
func (v *testVM) stop() {
	if v.cc != nil {
		v.cc.Close()
		v.cc = nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	v.m.Stop(ctx)
}

// kill ends QEMU at once, like a power cut.
func (v *testVM) kill() {
	if v.cc != nil {
		v.cc.Close()
		v.cc = nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	v.m.Stop(ctx) // an ended context: no power-off request, QEMU quits
}

// waitConsole waits for re on the console.
func (v *testVM) waitConsole(re string, timeout time.Duration) string {
	v.t.Helper()
	r := regexp.MustCompile(re)
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if m := r.FindString(v.console.String()); m != "" {
			return m
		}
		select {
		case <-v.m.Done():
			v.t.Fatalf("the VM ended before %q appeared", re)
		case <-time.After(200 * time.Millisecond):
		}
	}
	v.t.Fatalf("%q not on the console after %v", re, timeout)
	return ""
}

// execResult is an Execute's outcome.
type execResult struct {
	Code     codes.Code // the operation's or the response's status
	Message  string
	Exit     int32
	Stdout   string
	Stderr   string
	RespMsg  string // ExecuteResponse.message
	SrvLog   string // the "sandbox" server log (limits enforced)
	Duration time.Duration
}

// run executes `/bin/sh -c script` with the platform properties props.
func (v *testVM) run(ctx context.Context, script string, props ...string) execResult {
	v.t.Helper()
	var pp []*repb.Platform_Property
	for i := 0; i+1 < len(props); i += 2 {
		pp = append(pp, &repb.Platform_Property{Name: props[i], Value: props[i+1]})
	}
	cmd := &repb.Command{
		Arguments:            []string{"/bin/sh", "-c", script},
		EnvironmentVariables: []*repb.Command_EnvironmentVariable{{Name: "PATH", Value: "/usr/bin:/bin:/usr/sbin:/sbin"}},
		Platform:             &repb.Platform{Properties: pp},
	}
	c := v.client
	action := &repb.Action{CommandDigest: c.Put(ctx, cmd), InputRootDigest: c.Put(ctx, &repb.Directory{}), DoNotCache: true}
	t0 := time.Now()
	resp, err := c.Execute(ctx, c.Put(ctx, action))
	if err != nil {
		st := status.Convert(err)
		return execResult{Code: st.Code(), Message: st.Message(), Duration: time.Since(t0)}
	}
	r := execResult{Code: codes.Code(resp.GetStatus().GetCode()), Message: resp.GetStatus().GetMessage(), RespMsg: resp.Message, Duration: time.Since(t0)}
	if res := resp.Result; res != nil {
		r.Exit, r.Stdout, r.Stderr = res.ExitCode, string(c.Read(ctx, res.StdoutDigest)), string(c.Read(ctx, res.StderrDigest))
	}
	if l := resp.ServerLogs["sandbox"]; l != nil {
		r.SrvLog = string(c.Read(ctx, l.Digest))
	}
	return r
}

// realSecondStage is the second stage of the real runtime in the VM tests:
// what the builder's would do that a configured tree still needs
// (ldconfig), a marker file, a process left behind (the guest must kill
// it), and a hang when the kernel command line asks for one (to kill the
// VM in the middle).
const realSecondStage = `set -e
echo "second stage: start"
if grep -q 'guestrt.hang=1' /proc/cmdline; then echo "second stage: hanging"; sleep 3600; fi
sleep 1000 &
ldconfig
echo "configured by the second stage" > /etc/actiond-configured
echo "second stage: done"
`

// TestVMTarRuntimes boots the amd64 guest with a tar runtimes disk four
// times on one CAS disk, with a disk holding the payload's glibc2.36 tree
// (its second stage replaced by a quick one) and a broken runtime: (1)
// killed in the middle of glibc2.36's second stage, after the broken
// runtime failed; (2) the interrupted preparation is redone in the
// background while the guest serves, an action naming glibc2.36 waits for
// it and runs in the configured, sealed runtime, while the broken one gives
// FAILED_PRECONDITION; (3) the same disk is reused with no extraction; (4)
// a SquashFS runtimes disk still boots on the same CAS disk.
func TestVMTarRuntimes(t *testing.T) {
	testVMTarRuntimes(t, "amd64")
}

// TestVMTarRuntimesArm64 is the first and second boot on arm64 (what a Mac
// runs), for the first-boot time there.
func TestVMTarRuntimesArm64(t *testing.T) {
	testVMTarRuntimes(t, "arm64")
}

func testVMTarRuntimes(t *testing.T, arch string) {
	p := vmPayload(t, arch)
	initrd := testInitrd(t, p, arch)
	dir := t.TempDir()
	cas := filepath.Join(dir, "cas.img")
	if _, _, err := vmhost.EnsureDiskImage(cas, 4<<30); err != nil {
		t.Fatal(err)
	}
	tree := payloadRuntimeTree(t, p, "glibc2.36")
	rts := []testRuntime{{Name: "glibc2.36", Tree: tree, Script: realSecondStage}}
	if arch == "amd64" {
		// A runtime whose second stage fails (the host's dash: amd64 only).
		rts = append([]testRuntime{{Name: "broken", Tree: tinyHostTree(t), Script: "echo 'E: dpkg: error processing package base-files (--configure)' >&2\nexit 1\n"}}, rts...)
	}
	disk := filepath.Join(dir, "runtimes.tar")
	t0 := time.Now()
	writeRuntimesDisk(t, disk, arch, rts)
	fi, _ := os.Stat(disk)
	t.Logf("tar runtimes disk: %.1f MiB, written in %s", float64(fi.Size())/(1<<20), time.Since(t0).Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()

	if arch == "amd64" {
		// Boot 1: killed during glibc2.36's second stage.
		v := bootTestVM(t, arch, initrd, p.Kernel, cas, disk, "guestrt.hang=1", false)
		v.waitConsole(`runtime unavailable: preparing it failed.*runtime=broken.*exit status 1`, 5*time.Minute)
		v.waitConsole(`msg="runtime: running the second stage".* runtime=glibc2.36`, 10*time.Minute)
		time.Sleep(3 * time.Second) // into the script's sleep
		v.kill()
		t.Log("boot 1: killed in the middle of the second stage")
	}

	// Boot 2: redone from scratch; actions run.
	t0 = time.Now()
	v := bootTestVM(t, arch, initrd, p.Kernel, cas, disk, "", true)
	t.Logf("boot 2 (first configure): ready after %s", time.Since(t0).Round(time.Millisecond))
	con := v.console.String()
	if arch == "amd64" && !strings.Contains(con, "removing an interrupted runtime preparation") {
		t.Error("boot 2 did not remove the interrupted preparation")
	}
	for _, l := range regexp.MustCompile(`.*runtime: (extracted|configured|sealed).*`).FindAllString(con, -1) {
		t.Logf("boot 2: %s", strings.TrimSpace(l))
	}
	r := v.run(ctx, "cat /etc/actiond-configured; ldd --version | head -1; touch /usr/x 2>&1 || true; ls -d /.actiond 2>&1 || true", "libc", "glibc2.36")
	if r.Code != codes.OK || r.Exit != 0 {
		t.Fatalf("action in glibc2.36: %+v", r)
	}
	t.Logf("action in glibc2.36 (%s): %q", r.Duration.Round(time.Millisecond), r.Stdout)
	if !strings.HasPrefix(r.Stdout, "configured by the second stage\nldd (Debian GLIBC 2.36") {
		t.Errorf("action output %q: the second stage did not configure the runtime", r.Stdout)
	}
	if !strings.Contains(r.Stdout, "Read-only file system") || !strings.Contains(r.Stdout, "No such file") {
		t.Errorf("action output %q: want the runtime read-only and without /.actiond", r.Stdout)
	}
	if arch == "amd64" {
		r = v.run(ctx, "echo should not run", "libc", "broken")
		if r.Code != codes.FailedPrecondition || !strings.Contains(r.Message, `runtime "broken" is unavailable`) || !strings.Contains(r.Message, "error processing package base-files") {
			t.Errorf("action in the broken runtime: %+v; want FAILED_PRECONDITION naming it and why", r)
		}
		t.Logf("action in broken: %s: %s", r.Code, r.Message)
	}
	if strings.Contains(v.console.String(), "cannot remove its cgroup") {
		t.Error("the second stage's leftover process was not killed")
	}
	info, err := Info(ctx, v.cc)
	if err != nil {
		t.Fatal(err)
	}
	prepared, _ := info["runtimes_prepared"].(map[string]any)
	g, _ := prepared["glibc2.36"].(map[string]any)
	t.Logf("boot 2: glibc2.36 extract %vs, configure %vs, %v bytes", g["extract_s"], g["configure_s"], g["bytes"])
	if g["reused"] != false {
		t.Errorf("boot 2: runtimes_prepared %v", prepared)
	}
	v.stop()
	if arch != "amd64" {
		return
	}

	// Boot 3: reused, nothing extracted.
	t0 = time.Now()
	v = bootTestVM(t, arch, initrd, p.Kernel, cas, disk, "", true)
	t.Logf("boot 3 (reuse): ready after %s", time.Since(t0).Round(time.Millisecond))
	con = v.console.String()
	if !regexp.MustCompile(`runtime ready from an earlier boot \(not extracted\)".* runtime=glibc2.36`).MatchString(con) {
		t.Error("boot 3's log does not say glibc2.36 was reused")
	}
	if regexp.MustCompile(`runtime: extracting.* runtime=glibc2.36`).MatchString(con) {
		t.Error("boot 3 extracted glibc2.36 again")
	}
	if r := v.run(ctx, "cat /etc/actiond-configured", "libc", "glibc2.36"); r.Code != codes.OK || r.Stdout != "configured by the second stage\n" {
		t.Errorf("boot 3: action in glibc2.36: %+v", r)
	}
	v.stop()

	// Boot 4: a SquashFS runtimes disk on the same CAS disk.
	v = bootTestVM(t, arch, initrd, p.Kernel, cas, squashfsRuntimesDisk(t, tree, "glibc2.36"), "", true)
	if r := v.run(ctx, "ldd --version | head -1", "libc", "glibc2.36"); r.Code != codes.OK || !strings.Contains(r.Stdout, "2.36") {
		t.Errorf("boot 4 (SquashFS runtimes): %+v", r)
	}
}

// preparedBoot is the amd64 payload with a copy of its CAS image on which
// the payload's runtimes are prepared (once, see internal/vmtest), for
// tests that boot it, once or again on the same disk.
type preparedBoot struct{ initrd, kernel, runtimes, casImage string }

func newPreparedBoot(t *testing.T) preparedBoot {
	t.Helper()
	p := vmPayload(t, "amd64")
	b := preparedBoot{initrd: testInitrd(t, p, "amd64"), kernel: p.Kernel, runtimes: p.Runtimes, casImage: filepath.Join(t.TempDir(), "cas.img")}
	vmtest.CopyPreparedCASImage(t, "amd64", b.casImage)
	return b
}

// boot boots it and waits for the guest's server.
func (b preparedBoot) boot(t *testing.T) *testVM {
	t.Helper()
	return bootTestVM(t, "amd64", b.initrd, b.kernel, b.casImage, b.runtimes, "", true)
}

// TestVMCgroupLimits proves the memory and pids limits on the guest's pure
// cgroup v2 (all controllers, unlike this host's): an allocation over
// "memory" is OOM-killed and reported so, a fork bomb stays under "pids".
func TestVMCgroupLimits(t *testing.T) {
	v := newPreparedBoot(t).boot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	// The classic shell version: a reader that buffers everything.
	r := v.run(ctx, "head -c 300M /dev/zero | tail > /dev/null", "libc", "glibc2.36", "memory", "64M")
	t.Logf("memory: %+v", r)
	if r.Code != codes.OK || r.Exit != 137 || r.RespMsg != "killed: exceeded memory limit of 64 MiB" {
		t.Errorf("300 MiB under memory=64M: %+v; want an OOM kill reported as such", r)
	}
	if !strings.Contains(r.SrvLog, "memory=64 MiB via cgroup v2") {
		t.Errorf("server log %q: want the memory limit enforced by cgroup v2", r.SrvLog)
	}
	r = v.run(ctx, "head -c 16M /dev/zero | tail > /dev/null && echo fine", "libc", "glibc2.36", "memory", "64M")
	if r.Code != codes.OK || r.Exit != 0 || r.Stdout != "fine\n" {
		t.Errorf("16 MiB under memory=64M: %+v; want success", r)
	}

	// A fork bomb, bounded: perl (Essential in Debian) forks 100 children
	// that wait, and counts the forks that fail.
	const bomb = `perl -e 'my ($s, $f, @k) = (0, 0); for (1..100) { my $p = fork; if (!defined $p) { $f++ } elsif ($p == 0) { sleep 60; exit 0 } else { $s++; push @k, $p } } print "started=$s failed=$f\n"; kill 9, @k'`
	r = v.run(ctx, bomb, "libc", "glibc2.36", "pids", "32")
	t.Logf("pids: %+v", r)
	var started, failed int
	if _, err := fmt.Sscanf(r.Stdout, "started=%d failed=%d", &started, &failed); err != nil || r.Code != codes.OK || r.Exit != 0 || started >= 32 || failed == 0 {
		t.Errorf("100 forks under pids=32: %+v; want fewer than 32 started and the rest refused", r)
	}
	if !strings.Contains(r.SrvLog, "pids=32 via cgroup v2") {
		t.Errorf("server log %q: want the pids limit enforced by cgroup v2", r.SrvLog)
	}
	// The guest is unaffected: another action runs.
	if r := v.run(ctx, "echo ok", "libc", "glibc2.36"); r.Code != codes.OK || r.Stdout != "ok\n" {
		t.Errorf("an action after the fork bomb: %+v", r)
	}
	// A CPU quota is set for each action and lifted after it. Without
	// the static-keys cgroup each quota turned the kernel's
	// __cfs_bandwidth_used key on and off again, rewriting the scheduler's
	// code while the other vCPU ran it; under TCG that livelocked the guest
	// within 50 such actions beside a busy one (pinStaticKeys). 150 here.
	t.Cleanup(func() { // before the VM is stopped
		if t.Failed() {
			st, err := v.m.CPUState(context.Background())
			t.Logf("vCPUs at the end of the failed test: %s %v", st, err)
		}
	})
	burner := make(chan execResult, 1)
	go func() {
		b := execResult{Code: codes.Unknown, Message: "the call failed (reported above)"}
		defer func() { burner <- b }() // also when the client gives up on the test
		b = v.run(ctx, "end=$(($(date +%s)+20)); while [ $(date +%s) -lt $end ]; do :; done; echo burnt", "libc", "glibc2.36")
	}()
	for i := range 150 {
		actx, acancel := context.WithTimeout(ctx, time.Minute)
		r = v.run(actx, "echo quota", "libc", "glibc2.36", "cpu", "0.5")
		acancel()
		if r.Code != codes.OK || r.Stdout != "quota\n" || !strings.Contains(r.SrvLog, "cpu=500m via cgroup v2") {
			t.Fatalf("action %d under cpu=0.5: %+v; want it run with its quota enforced by cgroup v2", i, r)
		}
	}
	if b := <-burner; b.Code != codes.OK || b.Stdout != "burnt\n" {
		t.Errorf("the busy action beside them: %+v", b)
	}

	// init made the cgroup that keeps the kernel's cgroup static keys on
	// before the server started (see pinStaticKeys): the values are read
	// back from the kernel.
	info, err := Info(ctx, v.cc)
	if err != nil {
		t.Fatal(err)
	}
	keys, _ := info["static_keys"].(map[string]any)
	t.Logf("static keys: %v", keys)
	if keys["cgroup"] != "/sys/fs/cgroup/"+staticKeysCgroup || keys["cpu_max"] != staticKeysQuota {
		t.Errorf("static_keys %v: want the cgroup %s with cpu.max %q", keys, staticKeysCgroup, staticKeysQuota)
	}
	if ctrl, _ := keys["controllers"].(string); !slices.Contains(strings.Fields(ctrl), "memory") {
		t.Errorf("static_keys %v: want a memory controller in the pinning cgroup", keys)
	}
	if _, ok := info["boot_steps_s"].(map[string]any)["static keys"]; !ok {
		t.Errorf("boot_steps_s %v: no static keys step", info["boot_steps_s"])
	}
}

// TestVMWriteBackPowerCut is a power cut under the default write-back
// durability. Two batches of blobs are acknowledged by the guest: the
// first some seconds before the VM is killed (its flusher, once a second,
// has made them durable by then), the second just before, so the guest's
// page cache with them is lost as in a power loss. The next boot must
// check what was placed after the last flush before it serves. From then
// on every blob it reports present reads back intact (reads are verified:
// a damaged one fails the read, and the test), every blob of the first
// batch is there, and those it lost can be uploaded again.
func TestVMWriteBackPowerCut(t *testing.T) {
	b := newPreparedBoot(t)
	v := b.boot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	var reqs []*repb.BatchUpdateBlobsRequest_Request
	var digests []*repb.Digest
	upload := func(from, n int) {
		t.Helper()
		var batch []*repb.BatchUpdateBlobsRequest_Request
		for i := from; i < from+n; i++ {
			data := testutil.Data(7000+i, 1000+37*i)
			d := cas.DigestOf(data).Proto()
			batch = append(batch, &repb.BatchUpdateBlobsRequest_Request{Digest: d, Data: data})
			digests = append(digests, d)
		}
		reqs = append(reqs, batch...)
		resp, err := v.client.CAS.BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{Requests: batch})
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range resp.Responses {
			if r.GetStatus().GetCode() != 0 {
				t.Fatalf("upload: %v", r.Status)
			}
		}
	}
	const early, late = 100, 300
	upload(0, early)
	time.Sleep(5 * time.Second) // five flush intervals
	upload(early, late)
	v.kill()

	v = b.boot(t)
	if m := regexp.MustCompile(`CAS: (unclean stop before a reboot|checked the blobs placed after the last flush)[^\n]*`).FindAllString(v.console.String(), -1); len(m) == 0 {
		t.Error("the boot after the power cut did not check the blobs placed after the last flush")
	} else {
		t.Logf("boot after the power cut: %s", strings.Join(m, "; "))
	}
	fm, err := v.client.CAS.FindMissingBlobs(ctx, &repb.FindMissingBlobsRequest{BlobDigests: digests})
	if err != nil {
		t.Fatal(err)
	}
	missing := map[string]bool{}
	for _, d := range fm.MissingBlobDigests {
		missing[d.Hash] = true
	}
	var again []*repb.BatchUpdateBlobsRequest_Request
	for i, d := range digests {
		if missing[d.Hash] {
			if i < early {
				t.Errorf("blob %d, acknowledged 5 s before the power cut, was lost", i)
			}
			again = append(again, reqs[i])
			continue
		}
		if got := v.client.Read(ctx, d); !bytes.Equal(got, reqs[i].Data) {
			t.Errorf("blob %d reported present reads back wrong (%d bytes)", i, len(got))
		}
	}
	t.Logf("%d of the %d blobs acknowledged just before the power cut were lost", len(again), late)
	if len(again) > 0 {
		if _, err := v.client.CAS.BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{Requests: again}); err != nil {
			t.Fatal(err)
		}
		fm, err := v.client.CAS.FindMissingBlobs(ctx, &repb.FindMissingBlobsRequest{BlobDigests: digests})
		if err != nil || len(fm.MissingBlobDigests) != 0 {
			t.Errorf("after uploading the lost blobs again: %v missing, %v", len(fm.GetMissingBlobDigests()), err)
		}
	}
}
