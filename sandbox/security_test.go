//go:build linux

package sandbox_test

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Each test here attempts an escape and asserts that it failed. The
// attempts are harmless if the sandbox were broken: they send no traffic
// beyond loopback, write only under t.TempDir() and signal nothing the test
// did not start.

func TestCannotReadHostFiles(t *testing.T) {
	sb := newSandbox(t)
	secretDir := t.TempDir() // outside the execroot
	secret := filepath.Join(secretDir, "secret.txt")
	writeFile(t, secret, "TOPSECRET\n", 0o644)
	root := newExecRoot(t, false)
	script := fmt.Sprintf(`
for p in /etc/shadow /etc/gshadow /root %[1]s %[2]s /proc/1/root%[1]s /proc/1/root/etc/shadow /proc/1/environ /proc/1/fd/3 /proc/1/mountinfo /sys/kernel; do
	if [ -d "$p" ]; then ls -A "$p" >/dev/null 2>&1 && echo "LEAK $p"; else cat "$p" 2>/dev/null && echo "LEAK $p"; fi
done
ls -a /`, secret, secretDir)
	res, stdout, _ := run(t, sb, shSpec(t, root, script))
	if res.ExitCode != 0 {
		t.Fatalf("exit %d", res.ExitCode)
	}
	if strings.Contains(stdout, "LEAK") || strings.Contains(stdout, "TOPSECRET") {
		t.Errorf("host data visible in the sandbox:\n%s", stdout)
	}
	allowed := []string{".", "..", "bin", "dev", "etc", "execroot", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp", "usr"}
	for _, name := range strings.Fields(stdout) {
		if !slices.Contains(allowed, name) {
			t.Errorf("unexpected entry /%s in the sandbox root", name)
		}
	}
}

func TestNetworkIsLoopbackOnly(t *testing.T) {
	sb := newSandbox(t)
	// A server on the host's loopback that the action must not reach:
	// its 127.0.0.1 is its own.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var accepted atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			c.Close()
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port

	root := newExecRoot(t, true)
	script := fmt.Sprintf(`
echo INTERFACES; tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '
echo ROUTES; tail -n +2 /proc/net/route
echo ROUTES6; grep -v ' lo$' /proc/net/ipv6_route
echo ROUTE_GET; ip route get 192.0.2.1 2>&1
echo CONNECT; ./probe dial 127.0.0.1:%d 2>&1
if (exec 3<>/dev/tcp/127.0.0.1/%d) 2>/dev/null; then echo BASH_CONNECTED; fi
echo END`, port, port)
	res, stdout, _ := run(t, sb, spec(t, root, "/bin/bash", "-c", script))
	if res.ExitCode != 0 {
		t.Fatalf("exit %d", res.ExitCode)
	}
	section := func(name, next string) string {
		_, after, _ := strings.Cut(stdout, name+"\n")
		before, _, _ := strings.Cut(after, next+"\n")
		return before
	}
	if got := section("INTERFACES", "ROUTES"); got != "lo\n" {
		t.Errorf("interfaces = %q; want only lo", got)
	}
	if got := section("ROUTES", "ROUTES6"); got != "" {
		t.Errorf("IPv4 routes: %q; want none", got)
	}
	if got := section("ROUTES6", "ROUTE_GET"); got != "" {
		t.Errorf("IPv6 routes off loopback: %q; want none", got)
	}
	if got := section("ROUTE_GET", "CONNECT"); !strings.Contains(got, "unreachable") {
		t.Errorf("route lookup for 192.0.2.1: %q; want unreachable", got)
	}
	if got := section("CONNECT", "END"); !strings.Contains(got, "connection refused") || strings.Contains(got, "CONNECTED") {
		t.Errorf("connecting to the host's listener: %q; want connection refused", got)
	}
	time.Sleep(50 * time.Millisecond)
	if n := accepted.Load(); n != 0 {
		t.Errorf("the host listener accepted %d connections from the sandbox", n)
	}
}

func TestInputsAndSystemAreReadOnly(t *testing.T) {
	sb := newSandbox(t)
	root := newExecRoot(t, false)
	// World-writable input file and directory: only the read-only mount
	// stops writes to them, not permissions.
	writeFile(t, filepath.Join(root, "open.txt"), "open\n", 0o666)
	if err := os.Chmod(filepath.Join(root, "pkg"), 0o777); err != nil {
		t.Fatal(err)
	}
	tag := fmt.Sprintf("sbtest-%d", time.Now().UnixNano())
	// Were /tmp and /dev/shm not private, the probe files would land on the host.
	t.Cleanup(func() { os.Remove("/tmp/" + tag); os.Remove("/dev/shm/" + tag) })
	script := fmt.Sprintf(`# Refuse to try anything if the privilege drop failed.
[ "$(id -u)" = %[2]s ] || { echo "NOT SANDBOXED"; exit 99; }
try() { if "$@" 2>/dev/null; then echo "ESCAPED: $*"; fi; }
try sh -c 'echo x > in.txt'
try sh -c 'echo x > open.txt'
try sh -c 'echo x >> open.txt'
try touch pkg/new newfile /newfile /usr/newfile /etc/newfile /etc/passwd /dev/newfile /proc/newfile
try rm -f in.txt
try mv open.txt out/
try ln in.txt out/link
ln -s /etc out/x; try touch out/x/y
try chmod 666 in.txt
try mkdir /execroot/newdir
try truncate -s 0 open.txt
echo ok > out/result && echo OUT_OK
echo ok > /tmp/%[1]s && echo TMP_OK
echo ok > /dev/shm/%[1]s && echo SHM_OK
echo ok > /dev/null && head -c 4 /dev/zero | wc -c && head -c 4 /dev/urandom | wc -c`, tag, actionUID)
	res, stdout, _ := run(t, sb, shSpec(t, root, script))
	if res.ExitCode != 0 {
		t.Fatalf("exit %d", res.ExitCode)
	}
	if strings.Contains(stdout, "ESCAPED") {
		t.Errorf("writes succeeded:\n%s", stdout)
	}
	if want := "OUT_OK\nTMP_OK\nSHM_OK\n4\n4\n"; !strings.HasSuffix(stdout, want) {
		t.Errorf("stdout ends %q; want %q", stdout, want)
	}
	for name, want := range map[string]string{"in.txt": "input\n", "open.txt": "open\n", "out/result": "ok\n"} {
		if b, err := os.ReadFile(filepath.Join(root, name)); err != nil || string(b) != want {
			t.Errorf("%s = %q, %v; want %q", name, b, err, want)
		}
	}
	if fi, err := os.Stat(filepath.Join(root, "in.txt")); err != nil || fi.Mode().Perm() != 0o444 || fi.Sys().(*syscall.Stat_t).Uid != 0 {
		t.Errorf("in.txt changed: %v %v", fi.Mode(), err)
	}
	for _, p := range []string{filepath.Join(root, "pkg/new"), filepath.Join(root, "newfile"), "/tmp/" + tag, "/dev/shm/" + tag} {
		if _, err := os.Lstat(p); err == nil {
			t.Errorf("%s exists on the host", p)
		}
	}
}

func TestWritableInputsNeverModifyInputFilesInPlace(t *testing.T) {
	sb := newSandbox(t)
	root := newExecRoot(t, false)
	// The input is a hard link to a CAS blob, as the executor stages it.
	blob := filepath.Join(t.TempDir(), "blob")
	writeFile(t, blob, "blob\n", 0o444)
	if err := os.Link(blob, filepath.Join(root, "pkg/input.txt")); err != nil {
		t.Fatal(err)
	}
	s := shSpec(t, root, `
if echo x > pkg/input.txt 2>/dev/null; then echo ESCAPED; fi
echo new > pkg/created.txt && echo CREATED
cat pkg/input.txt > /tmp/copy && rm -f pkg/input.txt && echo changed > pkg/input.txt && echo REPLACED`)
	s.WritableInputs = true
	s.WritableDirs = nil
	if got := mustSucceed(t, sb, s); got != "CREATED\nREPLACED\n" {
		t.Errorf("stdout = %q", got)
	}
	if b, _ := os.ReadFile(blob); string(b) != "blob\n" {
		t.Errorf("the CAS blob changed: %q", b)
	}
	if fi, _ := os.Stat(blob); fi.Mode().Perm() != 0o444 || fi.Sys().(*syscall.Stat_t).Uid != 0 {
		t.Errorf("the CAS blob's mode or owner changed: %v", fi.Mode())
	}
	if b, _ := os.ReadFile(filepath.Join(root, "pkg/input.txt")); string(b) != "changed\n" {
		t.Errorf("replaced input = %q", b)
	}
}

func TestMountAndNamespaceCommandsFail(t *testing.T) {
	sb := newSandbox(t)
	script := `
# Refuse to try anything if the privilege drop failed.
[ "$(id -u)" = ` + actionUID + ` ] || { echo "NOT SANDBOXED"; exit 99; }
try() { if "$@" 2>/dev/null; then echo "ESCAPED: $*"; fi; }
try mount -t tmpfs x /tmp
try unshare -r true
try unshare -U true
try unshare -m true
try umount /proc
echo END`
	if got := mustSucceed(t, sb, shSpec(t, newExecRoot(t, false), script)); got != "END\n" {
		t.Errorf("stdout = %q", got)
	}
}

func TestSeccompFilter(t *testing.T) {
	sb := newSandbox(t)
	got := mustSucceed(t, sb, spec(t, newExecRoot(t, true), "./probe", "syscalls"))
	results := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(got))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			results[k] = v
		}
	}
	want := map[string]string{"clone3": "ENOSYS", "socket_inet": "ok"}
	for _, name := range []string{"unshare", "mount", "umount2", "pivot_root", "fsopen", "open_tree", "setns",
		"bpf", "io_uring_setup", "keyctl", "add_key", "ptrace", "process_vm_readv", "perf_event_open",
		"userfaultfd", "init_module", "kexec_load", "clone_newuser", "socket_vsock"} {
		want[name] = "EPERM"
	}
	for name, w := range want {
		if results[name] != w {
			t.Errorf("%s: got %q, want %q", name, results[name], w)
		}
	}

	// The same probe as the same user outside the sandbox: some of these
	// calls succeed there, so it is the filter that refuses them above.
	cmd := exec.Command(probeBinary(t), "syscalls")
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: firstID, Gid: firstID}}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("probe outside the sandbox: %v", err)
	}
	t.Logf("outside the sandbox:\n%s", out)
	if !strings.Contains(string(out), "keyctl=ok") && !strings.Contains(string(out), "process_vm_readv=ok") {
		t.Errorf("neither keyctl nor process_vm_readv succeeds outside the sandbox; the probe proves nothing")
	}
}

func TestSetuidBinariesDoNotElevate(t *testing.T) {
	sb := newSandbox(t)
	root := newExecRoot(t, false)
	// A setuid-root copy of id among the inputs, as if an action's inputs
	// carried one.
	suid := filepath.Join(root, "pkg/suid-id")
	copyFile(t, "/usr/bin/id", suid, 0o755)
	if err := os.Chmod(suid, 0o4755); err != nil {
		t.Fatal(err)
	}
	script := `pkg/suid-id -u; pkg/suid-id -G
cut -d' ' -f5,6 /proc/self/mountinfo`
	got := mustSucceed(t, sb, shSpec(t, root, script))
	lines := strings.Split(strings.TrimSpace(got), "\n")
	if len(lines) < 2 || lines[0] != actionUID || lines[1] != actionUID {
		t.Fatalf("setuid binary ran with ids %q; want %s", lines, actionUID)
	}
	// Every mount in the sandbox is nosuid.
	for _, l := range lines[2:] {
		mountpoint, opts, _ := strings.Cut(l, " ")
		if !slices.Contains(strings.Split(opts, ","), "nosuid") {
			t.Errorf("mount %s is not nosuid: %s", mountpoint, opts)
		}
	}
}
