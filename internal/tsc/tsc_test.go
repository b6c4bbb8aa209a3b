package tsc

import (
	"testing"

	"github.com/actiond/actiond/internal/testutil"
)

func TestHostKHz(t *testing.T) {
	testutil.OnlyOnArch(t, "amd64", "reads the x86 TSC")
	khz := HostKHz()
	t.Logf("host TSC: %d kHz", khz)
	if khz < 500_000 || khz > 10_000_000 {
		t.Fatalf("implausible TSC rate %d kHz", khz)
	}
}
