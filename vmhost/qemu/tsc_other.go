//go:build !amd64

package qemu

// hostTSCkHz is 0 on hosts without an x86 TSC: the guest calibrates.
func hostTSCkHz() uint64 { return 0 }
