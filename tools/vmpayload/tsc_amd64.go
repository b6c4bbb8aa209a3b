package main

import "time"

// rdtsc reads the time stamp counter.
func rdtsc() uint64

// hostTSCkHz measures this machine's TSC frequency. QEMU's TCG gives an
// x86 guest the host's TSC, and a guest kernel that cannot calibrate it
// against the emulated PIT (a busy host: the vCPU thread is descheduled
// during the measurement) marks it unstable and hangs early in boot; the
// kernel parameter tsc_early_khz=<this> skips that calibration.
func hostTSCkHz() int64 {
	t0, c0 := time.Now(), rdtsc()
	time.Sleep(50 * time.Millisecond)
	t1, c1 := time.Now(), rdtsc()
	khz := float64(c1-c0) / float64(t1.Sub(t0).Nanoseconds()) * 1e6
	return int64(khz + 0.5)
}
