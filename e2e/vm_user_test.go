package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/actiond/actiond/internal/testutil"
)

// The acceptance test of issue 12: the VM payload is built by actiond
// itself, as an unprivileged user (uid 65534) whose PATH holds only the Go
// toolchain and QEMU, into that user's cache dir, and serve-vm started
// with no payload flags in the same environment boots it.
//
// The build part (TestUserVMPayload*) needs root only to switch to the
// user; the boot part (TestUserServeVM*) also needs QEMU, Bazel and a
// guest that reads runtimes.tar. Everything is cached outside the clone
// under userVMDir (like /var/cache/actiond/vm), so the first run starts
// from an empty cache and later runs reuse it.

// userVMDir holds the unprivileged user's home, cache and module cache.
const userVMDir = "/var/cache/actiond/user-vm"

const userID = "65534"

// userEnv prepares the user's environment: a home and XDG cache owned by
// the user, a read-only Go module cache with this module's dependencies
// (the user has no network but Debian's archive, and cannot read root's
// module cache), a PATH directory with only go and the QEMU binaries, and
// a copy of the actiond binary the user can run. It returns the command
// prefix that runs a program as the user, the binary, and the user's
// payload directory for arch.
func userEnv(t *testing.T, arch string) (wrap []string, bin, payloadDir string) {
	t.Helper()
	testutil.SkipIfShort(t, "builds a VM payload as another user (minutes on a first run)")
	testutil.RequireRoot(t)
	setpriv, err := exec.LookPath("setpriv")
	testutil.Require(t, err == nil, "setpriv not on PATH (util-linux)")
	goTool, err := exec.LookPath("go")
	testutil.Require(t, err == nil, "go not on PATH")
	root := ModuleRoot(t)

	home := filepath.Join(userVMDir, "home")
	cache := filepath.Join(userVMDir, "cache")
	gomod := filepath.Join(userVMDir, "gomod")
	for _, d := range []string{home, cache} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("chown", "-R", userID+":"+userID, d).CombinedOutput(); err != nil {
			t.Fatalf("chown %s: %v %s", d, err, out)
		}
	}
	// The module cache, filled offline from root's (GOPROXY=file://).
	srcCache, err := exec.Command(goTool, "env", "GOMODCACHE").Output()
	if err != nil {
		t.Fatal(err)
	}
	dl := exec.Command(goTool, "mod", "download")
	dl.Dir = root
	dl.Env = append(os.Environ(), "GOMODCACHE="+gomod, "GOFLAGS=-mod=mod",
		"GOPROXY=file://"+filepath.Join(strings.TrimSpace(string(srcCache)), "cache", "download"))
	if out, err := dl.CombinedOutput(); err != nil {
		t.Fatalf("go mod download into %s: %v\n%s", gomod, err, out)
	}
	if out, err := exec.Command("chmod", "-R", "a+rX", gomod).CombinedOutput(); err != nil {
		t.Fatalf("chmod %s: %v %s", gomod, err, out)
	}

	binDir, err := os.MkdirTemp("", "actiond-user-bin-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(binDir) })
	os.Chmod(binDir, 0o755)
	pathDir := filepath.Join(binDir, "path")
	os.Mkdir(pathDir, 0o755)
	real, _ := filepath.EvalSymlinks(goTool)
	os.Symlink(real, filepath.Join(pathDir, "go"))
	for _, q := range []string{"qemu-system-x86_64", "qemu-system-aarch64"} {
		if p, err := exec.LookPath(q); err == nil {
			os.Symlink(p, filepath.Join(pathDir, q))
		}
	}
	bin = filepath.Join(binDir, "actiond")
	if err := copyFile(actiondBinary(t), bin, 0o755); err != nil {
		t.Fatal(err)
	}
	wrap = []string{setpriv, "--reuid=" + userID, "--regid=" + userID, "--clear-groups",
		"env", "-i", "PATH=" + pathDir, "HOME=" + home, "XDG_CACHE_HOME=" + cache,
		"GOMODCACHE=" + gomod, "GOPROXY=off", "GOFLAGS=-mod=readonly", "GOTOOLCHAIN=local"}
	if m := os.Getenv("ACTIOND_DEBIAN_MIRROR"); m != "" {
		wrap = append(wrap, "ACTIOND_DEBIAN_MIRROR="+m)
	}
	// What vmhost.DefaultPayloadDir gives the user: its XDG cache.
	return wrap, bin, filepath.Join(cache, "actiond", "vm", arch)
}

// runAsUser runs bin args... as the user in the module root (the guest
// binary is built from the source around the current directory).
func runAsUser(t *testing.T, wrap []string, bin string, args ...string) (string, error) {
	t.Helper()
	full := append(append(append([]string{}, wrap...), bin), args...)
	cmd := exec.Command(full[0], full[1:]...)
	cmd.Dir = ModuleRoot(t)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

type userManifest struct {
	Format       int                 `json:"format"`
	Arch         string              `json:"arch"`
	Kernel       string              `json:"kernel"`
	Runtimes     string              `json:"runtimes"`
	RuntimeNames []string            `json:"runtime_names"`
	Packages     map[string][]string `json:"packages"`
	ContentHash  string              `json:"content_hash"`
	Files        map[string]struct {
		Size int64 `json:"size"`
	} `json:"files"`
}

// buildUserPayload runs `actiond vm payload --arch arch` as the user and
// checks the result; a second run must download and write nothing.
func buildUserPayload(t *testing.T, arch string) (wrap []string, bin, dir string) {
	wrap, bin, dir = userEnv(t, arch)
	start := time.Now()
	out, err := runAsUser(t, wrap, bin, "vm", "payload", "--arch", arch)
	if err != nil {
		t.Fatalf("actiond vm payload --arch %s as uid %s: %v\n%s", arch, userID, err, tail(out, 64<<10))
	}
	t.Logf("payload for %s built/checked as uid %s in %v (%d download lines)", arch, userID, time.Since(start).Round(time.Second), strings.Count(out, "downloading "))
	if verbose() {
		t.Log(out)
	}
	data, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		t.Fatalf("no manifest in the user's cache dir %s: %v\n%s", dir, err, tail(out, 16<<10))
	}
	var m userManifest
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatal(err)
	}
	if m.Arch != arch || m.Runtimes != "runtimes.tar" || strings.Join(m.RuntimeNames, ",") != "glibc2.31,glibc2.36,glibc2.41" || len(m.Packages["kernel"]) != 1 {
		t.Fatalf("manifest: %+v", m)
	}
	for name := range m.Files {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if uid := fmt.Sprint(fileUID(st)); uid != userID {
			t.Errorf("%s is owned by uid %s, want the user %s", name, uid, userID)
		}
	}
	// Again: everything is cached; nothing is downloaded or rewritten.
	out, err = runAsUser(t, wrap, bin, "vm", "payload", "--arch", arch)
	if err != nil {
		t.Fatalf("second run: %v\n%s", err, tail(out, 16<<10))
	}
	for _, bad := range []string{"downloading ", "payload: wrote "} {
		if strings.Contains(out, bad) {
			t.Errorf("second run of vm payload logged %q:\n%s", bad, tail(out, 16<<10))
		}
	}
	if !strings.Contains(out, m.ContentHash) {
		t.Errorf("second run: content hash %s not in the log:\n%s", m.ContentHash, tail(out, 4<<10))
	}
	return wrap, bin, dir
}

func TestUserVMPayloadAmd64(t *testing.T) { buildUserPayload(t, "amd64") }
func TestUserVMPayloadArm64(t *testing.T) { buildUserPayload(t, "arm64") }

// --- Boot part: needs the guest side of runtimes.tar (package guest). ---

// userServeVM starts serve-vm as the user with no payload flags (the
// payload comes from the user's cache dir), checks that it neither
// downloads nor builds, and returns it.
func userServeVM(t *testing.T, arch string) *VMServer {
	wrap, bin, _ := buildUserPayload(t, arch)
	qemuBin := map[string]string{"amd64": "qemu-system-x86_64", "arm64": "qemu-system-aarch64"}[arch]
	_, err := exec.LookPath(qemuBin)
	testutil.Require(t, err == nil, qemuBin+" not on PATH")
	root, err := os.MkdirTemp("", "actiond-user-vm-root-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	os.Chmod(root, 0o755)
	exec.Command("chown", userID+":"+userID, root).Run()
	// The runtimes prepared once (internal/vmtest, from root's payload of
	// the same runtimes): the guest reuses them when the user's runtimes
	// disk has the same runtimes, else prepares them on this first boot.
	seedPreparedCASImage(t, arch, root, userID+":"+userID)
	args := []string{"--memory", "2G"}
	if arch != "amd64" {
		args = append(args, "--arch", arch)
	}
	s := startServeVMWrapped(t, "", root, wrap, bin, args...)
	log := s.Log()
	if !strings.Contains(log, "payload up to date: no download, no build") || strings.Contains(log, "downloading ") {
		t.Errorf("serve-vm on a built payload did not just reuse it:\n%s", tail(log, 16<<10))
	}
	return s
}

// amd64: the workspace builds through serve-vm with every action remote,
// one action in each runtime (//runtimes) reporting its glibc.
func TestUserServeVMAmd64(t *testing.T) {
	RequireBazel(t)
	s := userServeVM(t, "amd64")
	ws := CopyWorkspace(t, WorkspaceDir(t))
	out := MustBazel(t, ws, t.TempDir(), append(append([]string{"build"}, remoteExecFlags(s.Addr, vmRemoteTimeout)...), "//:agg_shell", "//runtimes")...)
	requireAllRemote(t, "build in the user's VM", out)
	checkRuntimeOutputs(t, ws, vmRuntimes)
}

// arm64 (what a Mac boots): one action in each runtime reports the right
// ldd --version.
func TestUserServeVMArm64(t *testing.T) {
	RequireBazel(t)
	s := userServeVM(t, "arm64")
	ws := CopyWorkspace(t, WorkspaceDir(t))
	out := MustBazel(t, ws, t.TempDir(), append(append([]string{"build"}, remoteExecFlags(s.Addr, vmRemoteTimeout)...), "//runtimes")...)
	requireAllRemote(t, "//runtimes in the user's arm64 VM", out)
	checkRuntimeOutputs(t, ws, vmRuntimes)
}
