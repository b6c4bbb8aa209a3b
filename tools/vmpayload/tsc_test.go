package main

import (
	"testing"

	"github.com/actiond/actiond/internal/testutil"
)

func TestHostTSCkHz(t *testing.T) {
	testutil.OnlyOnArch(t, "amd64", "reads the x86 TSC")
	khz := hostTSCkHz()
	t.Logf("host TSC: %d kHz", khz)
	if khz < 100_000 || khz > 10_000_000 {
		t.Errorf("implausible TSC frequency %d kHz", khz)
	}
}
