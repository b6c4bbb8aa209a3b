package main

import (
	"strings"
	"testing"

	"github.com/actiond/actiond/internal/testutil"
)

// TestDarwinBuild type-checks the macOS build of the command and the VM host
// packages, so that `go test ./...` on Linux catches a broken darwin build.
func TestDarwinBuild(t *testing.T) {
	testutil.SkipIfShort(t, "loads and type-checks the darwin build (~10s)")
	errs, checked, ignored, err := check(DefaultPatterns, "arm64", false)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range errs {
		t.Error(e)
	}
	var sawVZ bool
	for _, p := range checked {
		sawVZ = sawVZ || strings.HasSuffix(p, "/vmhost/vz")
	}
	if !sawVZ {
		t.Errorf("vmhost/vz was not checked (checked: %v)", checked)
	}
	t.Logf("%d packages checked, %d dependency errors ignored (cgo without a macOS toolchain)", len(checked), len(ignored))
}

// TestCheckReportsErrors proves the filter does not hide this module's
// errors: the guest init is Linux-only, so its darwin build must fail.
func TestCheckReportsErrors(t *testing.T) {
	testutil.SkipIfShort(t, "loads and type-checks the darwin build")
	errs, _, _, err := check([]string{"github.com/actiond/actiond/tools/darwincheck/testdata/broken"}, "arm64", false)
	if err != nil {
		t.Fatal(err)
	}
	if len(errs) == 0 {
		t.Fatal("no errors reported for a package that cannot build on darwin")
	}
	if !strings.Contains(strings.Join(errs, "\n"), "Pdeathsig") {
		t.Errorf("errors do not mention the Linux-only field: %v", errs)
	}
}
