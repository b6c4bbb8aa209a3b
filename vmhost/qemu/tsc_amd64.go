package qemu

import (
	"runtime"
	"time"
)

func rdtsc() uint64

// hostTSCkHz measures the host's time-stamp counter frequency in kHz
// against the monotonic clock (the median of three 20 ms samples). Under
// TCG an x86 guest's TSC runs at the host's rate, so passing it as
// tsc_early_khz spares the guest kernel its PIT calibration, which fails
// (and then hangs the boot) when the host is busy.
func hostTSCkHz() uint64 {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var s [3]uint64
	for i := range s {
		t0, c0 := time.Now(), rdtsc()
		time.Sleep(20 * time.Millisecond)
		t1, c1 := time.Now(), rdtsc()
		ns := t1.Sub(t0).Nanoseconds()
		if ns <= 0 || c1 <= c0 {
			return 0
		}
		s[i] = (c1 - c0) * 1e6 / uint64(ns)
	}
	// Median of three.
	if s[0] > s[1] {
		s[0], s[1] = s[1], s[0]
	}
	if s[1] > s[2] {
		s[1], s[2] = s[2], s[1]
	}
	if s[0] > s[1] {
		s[0], s[1] = s[1], s[0]
	}
	return s[1]
}
