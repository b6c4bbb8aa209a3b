package e2e

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/actiond/actiond/internal/testutil"
)

// vmRuntimes are the runtimes in the VM payload's runtimes disk and the
// glibc version `ldd --version` must report in each.
var vmRuntimes = map[string]string{
	"glibc2.31": "2.31",
	"glibc2.36": "2.36",
	"glibc2.41": "2.41",
}

// vmRemoteTimeout is the VM tests' remote call timeout (see
// remoteExecFlags): generous, since TCG is slow.
const vmRemoteTimeout = 600 * time.Second

// vmSplitRuntimes splits OutputsHash's result into the //runtimes outputs
// and the rest.
func vmSplitRuntimes(h map[string]string) (rest, rts map[string]string) {
	rest, rts = map[string]string{}, map[string]string{}
	for k, v := range h {
		if strings.HasPrefix(k, "runtimes/") {
			rts[k] = v
		} else {
			rest[k] = v
		}
	}
	return rest, rts
}

// TestBazelServeVM: `actiond serve-vm` (QEMU, TCG by default) boots the
// amd64 payload and Bazel builds through it.
//
//  1. Cold: //:agg_shell and //runtimes execute remotely in the guest;
//     //:agg_shell's outputs are byte-identical to a local build, each
//     runtime reports its glibc (2.31, 2.36, 2.41).
//  2. SIGTERM, start again on the same --root: after `bazel clean
//     --expunge` the rebuild is all remote cache hits (from the persisted
//     ext4 image) with the same bytes.
//  3. SIGKILL of QEMU during a build (salted so that every action executes
//     and uploads again), restart: the guest recovers the filesystem, no
//     blob reads back with wrong bytes (missing is acceptable: the CAS
//     does not fsync directories), and the rebuild succeeds with the same
//     outputs.
func TestBazelServeVM(t *testing.T) {
	RequireBazel(t)
	testutil.RequireRoot(t)
	RequireVMPayload(t, "amd64")

	ws := CopyWorkspace(t, WorkspaceDir(t))
	our := t.TempDir()
	root := filepath.Join(t.TempDir(), "vm-root")
	bazel := func(args ...string) string {
		t.Helper()
		return MustBazel(t, ws, our, args...)
	}
	timed := func(args ...string) (string, time.Duration) {
		t.Helper()
		start := time.Now()
		out := bazel(args...)
		return out, time.Since(start)
	}

	// The reference: a local, unsandboxed build of //:agg_shell.
	out, localTook := timed("build", "--spawn_strategy=local", "//:agg_shell")
	if p := ParseProcesses(out); p == nil || p["local"] == 0 {
		t.Fatalf("local build: want local processes, got %v (%s)", p, strings.TrimSpace(lines(out, " processes")))
	}
	local := OutputsHash(t, ws)
	if len(local) < 10 {
		t.Fatalf("local build: only %d outputs: %v", len(local), local)
	}
	bazel("clean")

	// 1. Cold, through the VM. The CAS image starts with the payload's
	// runtimes prepared and nothing else (internal/vmtest: the first boot
	// that prepares them takes many minutes under TCG; package guest tests
	// it).
	seedPreparedCASImage(t, "amd64", root, "")
	vm := StartServeVM(t, "", root)
	t.Logf("first boot (empty CAS, runtimes prepared): boot-to-ready %v", vm.BootToReady.Round(10*time.Millisecond))
	remote := remoteExecFlags(vm.Addr, vmRemoteTimeout)
	build := func(extra ...string) (string, time.Duration) {
		t.Helper()
		return timed(append(append([]string{"build"}, remote...), extra...)...)
	}
	out, vmTook := build("//:agg_shell", "//runtimes")
	p := requireAllRemote(t, "cold build in the VM", out)
	got, rts := vmSplitRuntimes(OutputsHash(t, ws))
	requireSameOutputs(t, "cold build in the VM", local, got)
	if len(rts) != len(vmRuntimes) {
		t.Errorf("cold build in the VM: runtime outputs %v, want one per runtime %v", rts, vmRuntimes)
	}
	checkRuntimeOutputs(t, ws, vmRuntimes)
	t.Logf("wall time: local build of //:agg_shell %v; VM build of //:agg_shell + //runtimes %v (%d remote)",
		localTook.Round(10*time.Millisecond), vmTook.Round(10*time.Millisecond), p["remote"])
	coldOutputs := OutputsHash(t, ws)
	blobs := FileBlobs(t, mustEvalSymlinks(t, filepath.Join(ws, "bazel-bin")))

	// 2. Graceful restart on the same root: all remote cache hits.
	t.Logf("SIGTERM: serve-vm stopped in %v", vm.Stop().Round(10*time.Millisecond))
	vm = StartServeVM(t, vm.Addr, root)
	t.Logf("restart (persisted CAS image): boot-to-ready %v", vm.BootToReady.Round(10*time.Millisecond))
	present, missing, err := CheckBlobs(t, vm.Addr, blobs)
	if err != nil {
		t.Fatalf("after a clean restart: %v", err)
	}
	if missing != 0 {
		t.Errorf("after a clean restart: %d of %d output blobs missing (a clean shutdown must keep them all)", missing, present+missing)
	}
	bazel("clean", "--expunge")
	out, hitTook := build("//:agg_shell", "//runtimes")
	requireAllCacheHits(t, "rebuild after restart and clean --expunge", out)
	requireSameOutputs(t, "rebuild after restart and clean --expunge", coldOutputs, OutputsHash(t, ws))
	t.Logf("wall time: all-cache-hit rebuild through the VM %v", hitTook.Round(10*time.Millisecond))

	// 3. SIGKILL QEMU mid-build. The salt changes every action key, so
	// every action executes again: new Action/Command blobs and action
	// cache entries are being written when the VM dies.
	salt := "--action_env=ACTIOND_E2E_VM_SALT=" + strconv.FormatInt(time.Now().UnixNano(), 36)
	bazel("clean")
	type result struct {
		out string
		err error
	}
	done := make(chan result, 1)
	go func() {
		args := append(append([]string{"build"}, remote...), salt, "//:agg_shell")
		out, err := Bazel(t, ws, our, args...)
		done <- result{out, err}
	}()
	// Kill at about a third of the cold build's wall time (it had more
	// targets, so this is early in the salted build), at least 3 s in.
	delay := vmTook / 3
	if delay < 3*time.Second {
		delay = 3 * time.Second
	}
	var res result
	select {
	case res = <-done:
		t.Logf("the salted build finished within %v, before the kill: the kill hits an idle VM (%v)", delay, res.err)
	case <-time.After(delay):
	}
	qpid, err := vm.QEMUPid()
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(qpid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill qemu %d: %v", qpid, err)
	}
	t.Logf("SIGKILLed qemu (pid %d, child of serve-vm pid %d) %v into the salted build", qpid, vm.Pid(), delay)
	exitErr := vm.WaitExit(time.Minute)
	if exitErr == nil {
		t.Errorf("serve-vm exited with status 0 after its VM was killed; want an error status")
	} else {
		t.Logf("serve-vm after the VM's death: %v", exitErr)
	}
	if res.out == "" && res.err == nil {
		res = <-done
		if res.err == nil {
			t.Logf("the salted build succeeded despite the kill")
		} else {
			t.Logf("the salted build failed, as expected with its executor gone: %s", strings.TrimSpace(lines(res.out, "ERROR")))
		}
	}

	// Restart: the guest must recover the filesystem (journal replay).
	vm = StartServeVM(t, vm.Addr, root)
	t.Logf("restart after SIGKILL: boot-to-ready %v", vm.BootToReady.Round(10*time.Millisecond))
	present, missing, err = CheckBlobs(t, vm.Addr, blobs)
	if err != nil {
		t.Fatalf("after the kill: %v", err)
	}
	t.Logf("after the kill: %d output blobs of the cold build present and correct, %d missing", present, missing)

	// The rebuild succeeds, remotely (executed or cached), same bytes.
	out, _ = build(salt, "//:agg_shell")
	p = ParseProcesses(out)
	if p == nil || p["remote"]+p["remote cache hit"] != p["total"]-p["internal"] {
		t.Fatalf("rebuild after the kill: want remote executions and cache hits only, got %v", p)
	}
	t.Logf("rebuild after the kill: %v", p)
	got, _ = vmSplitRuntimes(OutputsHash(t, ws))
	requireSameOutputs(t, "rebuild after the kill", local, got)
	after := FileBlobs(t, mustEvalSymlinks(t, filepath.Join(ws, "bazel-bin")))
	present, missing, err = CheckBlobs(t, vm.Addr, after)
	if err != nil {
		t.Fatalf("after the rebuild: %v", err)
	}
	if missing != 0 {
		t.Errorf("after the rebuild: %d of %d output blobs missing from the CAS", missing, present+missing)
	}
	t.Logf("after the rebuild: all %d output blobs read back with the right hashes", present)
}

func mustEvalSymlinks(t testing.TB, p string) string {
	t.Helper()
	r, err := filepath.EvalSymlinks(p)
	if err != nil {
		t.Fatal(fmt.Errorf("resolve %s: %w", p, err))
	}
	return r
}
