package benchutil

import (
	"os"
	"testing"
	"time"
)

// The test process's CPU as /proc reports it grows when it burns CPU.
func TestProcessCPU(t *testing.T) {
	before, err := ProcessCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	x := 0
	for start := time.Now(); time.Since(start) < 200*time.Millisecond; x++ {
	}
	after, err := ProcessCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if after-before < 50*time.Millisecond {
		t.Errorf("200 ms of spinning counted as %v of CPU (%d loops)", after-before, x)
	}
}
