//go:build linux

package testutil

import (
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"github.com/actiond/actiond/internal/mountinfo"
)

// sharedRootEnv marks a test process re-run by RunUnderSharedRoot.
const sharedRootEnv = "ACTIOND_TEST_SHARED_ROOT"

// RootIsShared reports whether / in the calling process's mount namespace
// has shared propagation, as on every systemd host (this lab's / is private,
// which hides mount leaks through peer groups).
func RootIsShared() bool {
	shared, err := mountinfo.RootShared()
	return err == nil && shared
}

// RunUnderSharedRoot makes the calling test run where / is rshared, as on a
// systemd host. If / already is, it returns false and the test goes on.
// Otherwise it re-runs just this test in a new mount namespace whose / is
// made rshared (unshare(1) from util-linux, then mount --make-rshared /),
// reports that run's output and result, and returns true: the caller then
// returns at once. Needs root.
func RunUnderSharedRoot(t *testing.T) bool {
	t.Helper()
	if RootIsShared() {
		return false
	}
	if os.Getenv(sharedRootEnv) != "" {
		t.Fatal("re-run under a shared root, but / is still not shared")
	}
	RequireRoot(t)
	unshare, err := exec.LookPath("unshare")
	Require(t, err == nil, "needs unshare(1) (util-linux) to make an rshared mount namespace")
	var run []string
	for _, part := range strings.Split(t.Name(), "/") {
		run = append(run, "^"+regexp.QuoteMeta(part)+"$")
	}
	args := []string{"-m", "--propagation", "shared", "--", "/bin/sh", "-c",
		`mount --make-rshared / && exec "$0" "$@"`,
		os.Args[0], "-test.run", strings.Join(run, "/"), "-test.count=1", "-test.v"}
	cmd := exec.Command(unshare, args...)
	cmd.Env = append(os.Environ(), sharedRootEnv+"=1")
	out, err := cmd.CombinedOutput()
	t.Logf("re-run under an rshared /:\n%s", out)
	if err != nil {
		t.Fatalf("test failed under an rshared / (as on a systemd host): %v", err)
	}
	if !strings.Contains(string(out), "--- PASS: "+t.Name()) {
		t.Fatalf("the re-run under an rshared / did not run %s", t.Name())
	}
	return true
}

// MountsUnder lists the mount points at or below dir in the calling
// process's mount namespace.
func MountsUnder(t testing.TB, dir string) []string {
	t.Helper()
	entries, err := mountinfo.Read()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		if e.Point == dir || strings.HasPrefix(e.Point, dir+"/") {
			out = append(out, e.Point)
		}
	}
	return out
}

// CountMounts counts the mounts in the calling process's mount namespace
// that match.
func CountMounts(t testing.TB, match func(mountinfo.Entry) bool) int {
	t.Helper()
	entries, err := mountinfo.Read()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range entries {
		if match(e) {
			n++
		}
	}
	return n
}
