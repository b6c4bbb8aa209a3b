// Package tsc measures the host's x86 time-stamp counter rate, which QEMU
// hosts pass to an x86 guest under TCG as tsc_early_khz: the guest's TSC
// then runs at the host's rate, and the guest kernel skips the PIT
// calibration that fails (and hangs the boot) when the host is busy.
package tsc
