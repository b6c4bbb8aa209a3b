//go:build !amd64

package tsc

// HostKHz is 0 (unknown) on hosts without an x86 TSC: the guest calibrates.
func HostKHz() uint64 { return 0 }
