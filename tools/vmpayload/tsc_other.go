//go:build !amd64

package main

// hostTSCkHz is 0 (unknown) on hosts without an x86 TSC.
func hostTSCkHz() int64 { return 0 }
