package tsc

import (
	"runtime"
	"time"
)

// rdtsc reads the time-stamp counter (after an LFENCE, so that earlier
// instructions cannot be counted after it).
func rdtsc() uint64

// HostKHz measures the host's time-stamp counter rate in kHz against the
// monotonic clock: the median of three 20 ms samples, so one sample
// disturbed by a busy host does not count. It is 0 when the clock or the
// counter went backwards.
func HostKHz() uint64 {
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
