package main

import (
	"runtime"
	"testing"
)

func TestHostTSCkHz(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skip("no TSC")
	}
	khz := hostTSCkHz()
	t.Logf("host TSC: %d kHz", khz)
	if khz < 100_000 || khz > 10_000_000 {
		t.Errorf("implausible TSC frequency %d kHz", khz)
	}
}
