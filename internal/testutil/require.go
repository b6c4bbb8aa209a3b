// Package testutil holds helpers shared by the project's tests.
package testutil

import (
	"os"
	"runtime"
	"testing"
)

// RequireAll reports whether missing test prerequisites must fail rather
// than skip: under CI (CI=true) or with ACTIOND_REQUIRE_ALL=1.
func RequireAll() bool {
	return os.Getenv("CI") == "true" || os.Getenv("ACTIOND_REQUIRE_ALL") == "1"
}

// Require skips the test with reason when ok is false, or fails it when
// RequireAll says every prerequisite must be present.
func Require(t testing.TB, ok bool, reason string) {
	t.Helper()
	if ok {
		return
	}
	if RequireAll() {
		t.Fatalf("missing prerequisite (required under CI): %s", reason)
	}
	t.Skipf("skipping: %s", reason)
}

// RequireRoot needs the test to run as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	Require(t, os.Geteuid() == 0, "needs root")
}

// SkipIfShort skips a long test under -short, saying why; under CI (see
// RequireAll) -short is refused instead, since it would skip what CI must run.
func SkipIfShort(t testing.TB, why string) {
	t.Helper()
	if !testing.Short() {
		return
	}
	if RequireAll() {
		t.Fatalf("-short under CI would skip this test (%s): run the suite without -short", why)
	}
	t.Skipf("skipped in -short mode: %s", why)
}

// OnlyOnArch skips a test that is about another architecture than the
// running one (a fact of the machine, not a missing prerequisite, so CI
// skips it too).
func OnlyOnArch(t testing.TB, goarch, why string) {
	t.Helper()
	if runtime.GOARCH != goarch {
		t.Skipf("only on %s (this is %s): %s", goarch, runtime.GOARCH, why)
	}
}
