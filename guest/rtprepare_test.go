//go:build linux

package guest

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/internal/testutil"
)

func TestProbeContentTar(t *testing.T) {
	img := filepath.Join(t.TempDir(), "rt.tar")
	writeRuntimesDisk(t, img, "", []testRuntime{{Name: "x", Entries: []testEntry{{Hdr: tar.Header{Name: "./etc/", Typeflag: tar.TypeDir, Mode: 0o755}}}}})
	head, err := readHead(img)
	if err != nil {
		t.Fatal(err)
	}
	if got := probeContent(head); got != contentTar {
		t.Fatalf("probeContent = %s, want %s", got, contentTar)
	}
	if fi, _ := os.Stat(img); fi.Size()%(1<<20) != 0 {
		t.Errorf("disk size %d is not a MiB multiple", fi.Size())
	}
	if !runtimesCandidate(disk{Content: contentTar}) || casCandidate(disk{Content: contentTar}) {
		t.Error("a tar disk must be a runtimes candidate and never a CAS candidate")
	}
}

// TestExtractTree checks that ownership, modes, devices, links and times
// are applied and that no name or symlink reaches outside the tree.
func TestExtractTree(t *testing.T) {
	testutil.RequireRoot(t)
	mtime := time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)
	entries := []testEntry{
		{Hdr: tar.Header{Name: "./", Typeflag: tar.TypeDir, Mode: 0o755}},
		{Hdr: tar.Header{Name: "./usr/", Typeflag: tar.TypeDir, Mode: 0o755}},
		{Hdr: tar.Header{Name: "./usr/bin/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: mtime}},
		{Hdr: tar.Header{Name: "./usr/bin/su", Typeflag: tar.TypeReg, Mode: 0o4755, ModTime: mtime}, Data: "#!/bin/sh\n"},
		{Hdr: tar.Header{Name: "./usr/bin/owned", Typeflag: tar.TypeReg, Mode: 0o640, Uid: 12, Gid: 34}, Data: "x"},
		{Hdr: tar.Header{Name: "./usr/bin/hard", Typeflag: tar.TypeLink, Linkname: "./usr/bin/su"}},
		{Hdr: tar.Header{Name: "./bin", Typeflag: tar.TypeSymlink, Linkname: "usr/bin", Uid: 5, Gid: 6}},
		{Hdr: tar.Header{Name: "./var/", Typeflag: tar.TypeDir, Mode: 0o1777, Uid: 7, Gid: 8}},
		{Hdr: tar.Header{Name: "./var/ro/", Typeflag: tar.TypeDir, Mode: 0o555}},
		{Hdr: tar.Header{Name: "./var/ro/file", Typeflag: tar.TypeReg, Mode: 0o444}, Data: "in a read-only dir"},
		{Hdr: tar.Header{Name: "./dev/", Typeflag: tar.TypeDir, Mode: 0o755}},
		{Hdr: tar.Header{Name: "./dev/null", Typeflag: tar.TypeChar, Mode: 0o666, Devmajor: 1, Devminor: 3}},
		{Hdr: tar.Header{Name: "./dev/fifo", Typeflag: tar.TypeFifo, Mode: 0o600}},
		// Hostile names: ".." is clamped to the root, and a symlink to /
		// (or outside) is resolved inside the tree.
		{Hdr: tar.Header{Name: "../../escape-dotdot", Typeflag: tar.TypeReg, Mode: 0o644}, Data: "dotdot"},
		{Hdr: tar.Header{Name: "./abs", Typeflag: tar.TypeSymlink, Linkname: "/"}},
		{Hdr: tar.Header{Name: "./abs/escape-symlink", Typeflag: tar.TypeReg, Mode: 0o644}, Data: "symlink"},
		{Hdr: tar.Header{Name: "./up", Typeflag: tar.TypeSymlink, Linkname: "../../../.."}},
		{Hdr: tar.Header{Name: "./up/escape-up", Typeflag: tar.TypeReg, Mode: 0o644}, Data: "up"},
	}
	data, _ := memberBytes(t, testRuntime{Entries: entries})
	root := filepath.Join(t.TempDir(), "tree")
	os.Mkdir(root, 0o700)
	st, err := extractTree(bytes.NewReader(data), root)
	if err != nil {
		t.Fatal(err)
	}
	if st.Entries != len(entries) {
		t.Errorf("extracted %d entries, want %d", st.Entries, len(entries))
	}
	check := func(rel string, mode os.FileMode, uid, gid uint32) *syscall.Stat_t {
		t.Helper()
		fi, err := os.Lstat(filepath.Join(root, rel))
		if err != nil {
			t.Error(err)
			return nil
		}
		s := fi.Sys().(*syscall.Stat_t)
		if fi.Mode() != mode || s.Uid != uid || s.Gid != gid {
			t.Errorf("%s: mode %v uid %d gid %d, want %v %d %d", rel, fi.Mode(), s.Uid, s.Gid, mode, uid, gid)
		}
		return s
	}
	su := check("usr/bin/su", 0o755|os.ModeSetuid, 0, 0)
	check("usr/bin/owned", 0o640, 12, 34)
	hard := check("usr/bin/hard", 0o755|os.ModeSetuid, 0, 0)
	if su != nil && hard != nil && su.Ino != hard.Ino {
		t.Error("usr/bin/hard is not a hard link of usr/bin/su")
	}
	check("bin", 0o777|os.ModeSymlink, 5, 6)
	check("var", 0o777|os.ModeDir|os.ModeSticky, 7, 8)
	check("var/ro", 0o555|os.ModeDir, 0, 0)
	check("dev/fifo", 0o600|os.ModeNamedPipe, 0, 0)
	if s := check("dev/null", 0o666|os.ModeDevice|os.ModeCharDevice, 0, 0); s != nil && s.Rdev != unix.Mkdev(1, 3) {
		t.Errorf("dev/null: rdev %#x", s.Rdev)
	}
	if fi, err := os.Stat(filepath.Join(root, "usr/bin")); err != nil || !fi.ModTime().Equal(mtime) {
		t.Errorf("usr/bin mtime: %v %v, want %v", fi.ModTime(), err, mtime)
	}
	if fi, err := os.Stat(filepath.Join(root, "usr/bin/su")); err != nil || !fi.ModTime().Equal(mtime) {
		t.Errorf("usr/bin/su mtime: %v %v, want %v", fi.ModTime(), err, mtime)
	}
	for _, name := range []string{"escape-dotdot", "escape-symlink", "escape-up"} {
		if _, err := os.Stat(filepath.Join(root, name)); err != nil {
			t.Errorf("%s was not written inside the tree: %v", name, err)
		}
	}
	for _, p := range []string{filepath.Dir(root), filepath.Dir(filepath.Dir(root))} {
		for _, n := range sortedNames(t, p) {
			if strings.HasPrefix(n, "escape-") {
				t.Errorf("written outside the tree: %s/%s", p, n)
			}
		}
	}
}

// tinyRuntime is a runtime from the host's dash whose second stage writes
// /etc/configured (shell builtins only).
func tinyRuntime(t testing.TB, name, marker string) testRuntime {
	tree := tinyHostTree(t)
	// As in some trees: the second stage must not mount through it onto
	// the guest's own /proc, and it must still be there afterwards.
	os.Remove(filepath.Join(tree, "proc"))
	if err := os.Symlink("/proc", filepath.Join(tree, "proc")); err != nil {
		t.Fatal(err)
	}
	return testRuntime{Name: name, Tree: tree,
		Script: "echo 'configuring " + name + "'\necho " + marker + " > /etc/configured\n[ -e /dev/null ] && [ -r /proc/self/status ] && [ -d /sys/kernel ] && echo mounts-ok >> /etc/configured\n"}
}

// prepareForTest runs prepareTarRuntimes on disk with cas as the CAS
// mount; the bind mounts it makes are removed at cleanup.
func prepareForTest(t *testing.T, disk, cas string) (tarRuntimes, string) {
	t.Helper()
	var logBuf testutil.SyncBuffer
	log := slog.New(slog.NewTextHandler(&logBuf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	mnt := t.TempDir()
	res, err := prepareTarRuntimes(disk, cas, mnt, log)
	t.Cleanup(func() {
		for i := len(res.Mounts) - 1; i >= 0; i-- {
			unix.Unmount(res.Mounts[i], unix.MNT_DETACH)
		}
	})
	if err != nil {
		t.Fatalf("prepareTarRuntimes: %v\nlog:\n%s", err, logBuf.String())
	}
	t.Logf("log:\n%s", logBuf.String())
	return res, logBuf.String()
}

// TestPrepareTarRuntimes: a first boot extracts, configures and seals; a
// failing second stage is reported for its runtime only; a second boot
// reuses without extracting; an interrupted preparation and a stale
// version are removed; a damaged member is refused.
func TestPrepareTarRuntimes(t *testing.T) {
	testutil.RequireRoot(t)
	if fi, err := os.Stat("/sys/fs/cgroup/unified/cgroup.procs"); err == nil && fi.Mode().IsRegular() {
		// This host's cgroup2 (beside v1): the second stage gets its own
		// cgroup there, as in the guest.
		old := killGroupRoot
		killGroupRoot = "/sys/fs/cgroup/unified"
		t.Cleanup(func() { killGroupRoot = old })
	}
	cas := t.TempDir()
	disk := filepath.Join(t.TempDir(), "runtimes.tar")
	broken := testRuntime{Name: "broken", Tree: tinyHostTree(t), Script: "echo 'E: dpkg exploded' >&2\nexit 3\n"}
	writeRuntimesDisk(t, disk, "", []testRuntime{broken, tinyRuntime(t, "tiny", "v1")})

	// Boot 1.
	res, log := prepareForTest(t, disk, cas)
	if len(res.Runtimes) != 1 || res.Runtimes[0].Name != "tiny" {
		t.Fatalf("runtimes %v, want tiny only", res.Runtimes)
	}
	root := res.Runtimes[0].Root
	if got, _ := os.ReadFile(filepath.Join(root, "etc/configured")); string(got) != "v1\nmounts-ok\n" {
		t.Errorf("etc/configured = %q: the second stage did not run with /proc, /sys and /dev", got)
	}
	if l, err := os.Readlink(filepath.Join(root, "proc")); err != nil || l != "/proc" {
		t.Errorf("the tree's proc -> /proc symlink was not restored: %q %v", l, err)
	}
	if _, err := os.Lstat(filepath.Join(root, ".actiond")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("/.actiond still in the sealed tree: %v", err)
	}
	if err := os.WriteFile(filepath.Join(root, "etc/new"), nil, 0o644); !errors.Is(err, unix.EROFS) {
		t.Errorf("writing into the sealed runtime: %v, want EROFS", err)
	}
	reason := res.Failed["broken"]
	for _, want := range []string{"second stage", "exit status 3", "E: dpkg exploded", ".failed-broken.log"} {
		if !strings.Contains(reason, want) {
			t.Errorf("broken runtime's reason %q lacks %q", reason, want)
		}
	}
	if !strings.Contains(log, "configuring tiny") {
		t.Error("the second stage's output is not in the log")
	}
	dirs := sortedNames(t, filepath.Join(cas, casRuntimesDir))
	if len(dirs) != 2 || dirs[0] != ".failed-broken.log" || !strings.HasPrefix(dirs[1], "tiny-") {
		t.Errorf("/cas/runtimes holds %v, want .failed-broken.log and tiny-<sha>", dirs)
	}
	firstDir := dirs[1]
	for _, m := range res.Mounts {
		unix.Unmount(m, unix.MNT_DETACH)
	}

	// Boot 2: same disk: reused, not extracted; broken is tried again.
	res, log = prepareForTest(t, disk, cas)
	if len(res.Runtimes) != 1 || res.Info["tiny"].(map[string]any)["reused"] != true {
		t.Errorf("second boot: runtimes %v info %v, want tiny reused", res.Runtimes, res.Info)
	}
	if strings.Contains(log, `msg="runtime: extracting (first boot with this version)" runtime=tiny`) {
		t.Error("second boot extracted tiny again")
	}
	if !strings.Contains(log, `msg="runtime ready from an earlier boot (not extracted)" runtime=tiny`) {
		t.Error("second boot's log does not say tiny was reused")
	}
	if res.Failed["broken"] == "" {
		t.Error("broken runtime not reported on the second boot")
	}
	for _, m := range res.Mounts {
		unix.Unmount(m, unix.MNT_DETACH)
	}

	// Boot 3: a new tiny version, and an interrupted preparation left by
	// a killed VM: both the .tmp and the old version go.
	interrupted := filepath.Join(cas, casRuntimesDir, ".tmp-tiny-123456")
	os.MkdirAll(filepath.Join(interrupted, "tree/usr/bin"), 0o755)
	writeRuntimesDisk(t, disk, "", []testRuntime{tinyRuntime(t, "tiny", "v2")})
	res, log = prepareForTest(t, disk, cas)
	if len(res.Runtimes) != 1 {
		t.Fatalf("third boot: runtimes %v", res.Runtimes)
	}
	if got, _ := os.ReadFile(filepath.Join(res.Runtimes[0].Root, "etc/configured")); string(got) != "v2\nmounts-ok\n" {
		t.Errorf("etc/configured = %q after the update", got)
	}
	dirs = sortedNames(t, filepath.Join(cas, casRuntimesDir))
	if len(dirs) != 2 || !strings.HasPrefix(dirs[1], "tiny-") || dirs[1] == firstDir {
		t.Errorf("/cas/runtimes holds %v, want .failed-broken.log and only the new tiny-<sha>", dirs)
	}
	for _, want := range []string{"removing an interrupted runtime preparation", "removing a stale runtime"} {
		if !strings.Contains(log, want) {
			t.Errorf("log lacks %q", want)
		}
	}
	for _, m := range res.Mounts {
		unix.Unmount(m, unix.MNT_DETACH)
	}

	// A damaged member: refused with both hashes, nothing kept.
	data, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	m, _ := readManifestFile(t, disk)
	sum := m.Runtimes[0].SHA256
	m.Runtimes[0].SHA256 = strings.Repeat("0", 64)
	writeDisk(t, disk, m, []string{memberFile(t, data, m.Runtimes[0].Member)})
	res, _ = prepareForTest(t, disk, t.TempDir())
	if len(res.Runtimes) != 0 || !strings.Contains(res.Failed["tiny"], sum) || !strings.Contains(res.Failed["tiny"], strings.Repeat("0", 64)) {
		t.Errorf("damaged member: runtimes %v, failed %q; want tiny refused naming both hashes", res.Runtimes, res.Failed["tiny"])
	}
}

// readManifestFile reads a tar runtimes disk's manifest.
func readManifestFile(t *testing.T, disk string) (runtimesManifest, error) {
	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := readRuntimesManifest(tar.NewReader(f), "")
	if err != nil {
		t.Fatal(err)
	}
	return *m, nil
}

// memberFile copies the member named name out of the disk image data into a file.
func memberFile(t *testing.T, data []byte, name string) string {
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		hdr, err := tr.Next()
		if err != nil {
			t.Fatalf("member %s: %v", name, err)
		}
		if hdr.Name == name {
			p := filepath.Join(t.TempDir(), name)
			var b bytes.Buffer
			b.ReadFrom(tr)
			os.WriteFile(p, b.Bytes(), 0o644)
			return p
		}
	}
}

func TestReadRuntimesManifestRefuses(t *testing.T) {
	good := runtimeEntry{Name: "glibc2.36", Member: "glibc2.36.tar.zst", SHA256: strings.Repeat("a", 64)}
	for name, tc := range map[string]struct {
		m    runtimesManifest
		want string
	}{
		"format":     {runtimesManifest{Format: 2, Runtimes: []runtimeEntry{good}}, "format 2"},
		"arch":       {runtimesManifest{Format: 1, Arch: "riscv64", Runtimes: []runtimeEntry{good}}, "riscv64"},
		"host":       {runtimesManifest{Format: 1, Runtimes: []runtimeEntry{{Name: "host", Member: "h.tar.zst", SHA256: good.SHA256}}}, "reserved"},
		"slash":      {runtimesManifest{Format: 1, Runtimes: []runtimeEntry{{Name: "a/b", Member: "h.tar.zst", SHA256: good.SHA256}}}, "bad runtime name"},
		"twice":      {runtimesManifest{Format: 1, Runtimes: []runtimeEntry{good, good}}, "twice"},
		"bad hash":   {runtimesManifest{Format: 1, Runtimes: []runtimeEntry{{Name: "x", Member: "x.tar.zst", SHA256: "abc"}}}, "64 hex"},
		"bad member": {runtimesManifest{Format: 1, Runtimes: []runtimeEntry{{Name: "x", Member: "../x", SHA256: good.SHA256}}}, "bad member"},
	} {
		t.Run(name, func(t *testing.T) {
			disk := filepath.Join(t.TempDir(), "d.tar")
			writeDisk(t, disk, tc.m, nil)
			f, _ := os.Open(disk)
			defer f.Close()
			_, err := readRuntimesManifest(tar.NewReader(f), "amd64")
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

// TestFailedRuntimeStatus: an action naming a runtime that failed to
// prepare gets FAILED_PRECONDITION with the reason, through the
// executor's status translation.
func TestFailedRuntimeStatus(t *testing.T) {
	sb := withFailedRuntimes(nil, map[string]string{"glibc2.41": "second stage failed: exit status 3"})
	if got := sb.Runtimes(); len(got) != 1 || got[0] != "glibc2.41" {
		t.Fatalf("Runtimes() = %v", got)
	}
	_, err := sb.Run(context.Background(), &executor.RunSpec{Runtime: "glibc2.41"})
	st := status.Convert(executor.ToStatus(fmt.Errorf("sandbox: %w", err)))
	if st.Code() != codes.FailedPrecondition || strings.Contains(st.Message(), "rpc error") || !strings.Contains(st.Message(), `runtime "glibc2.41" is unavailable`) || !strings.Contains(st.Message(), "exit status 3") {
		t.Errorf("status %v", st)
	}
	def, err := pickDefaultRuntime("", nil, []string{"glibc2.31", DefaultRuntimeName})
	if err != nil || def != DefaultRuntimeName {
		t.Errorf("default %q %v: a failed default runtime must stay the default (no silent fallback)", def, err)
	}
}

// TestRuntimeGateWaitsForPending: an action naming a runtime still being
// prepared waits until it is resolved (here: failed, so it gets
// FAILED_PRECONDITION with the reason), or until its own deadline.
func TestRuntimeGateWaitsForPending(t *testing.T) {
	g := newRuntimeGate(nil, nil, []string{"glibc2.36", "glibc2.41"}, nil)
	if got := g.Runtimes(); len(got) != 0 {
		t.Fatalf("Runtimes() = %v with no sandbox", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := g.Run(ctx, &executor.RunSpec{Runtime: "glibc2.41"})
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), `runtime "glibc2.41" is still being prepared`) {
		t.Fatalf("Run past its deadline while the runtime is pending: %v", err)
	}
	res := make(chan error, 1)
	go func() {
		_, err := g.Run(context.Background(), &executor.RunSpec{Runtime: "glibc2.36"})
		res <- err
	}()
	select {
	case err := <-res:
		t.Fatalf("Run returned before the runtime was resolved: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	g.resolve("glibc2.36", nil, errors.New("second stage failed: exit status 3"))
	select {
	case err := <-res:
		if st := status.Convert(executor.ToStatus(err)); st.Code() != codes.FailedPrecondition || !strings.Contains(st.Message(), "exit status 3") {
			t.Errorf("after the runtime failed: %v", st)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run still waiting after the runtime was resolved")
	}
	info := g.runtimesInfo()
	if m, _ := info["glibc2.41"].(map[string]any); m["state"] != "pending" {
		t.Errorf("info %v: glibc2.41 should still be pending", info)
	}
	if m, _ := info["glibc2.36"].(map[string]any); m["failed"] == nil {
		t.Errorf("info %v: glibc2.36 should be failed", info)
	}
}
