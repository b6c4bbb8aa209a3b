// Package broken builds on Linux only: darwincheck's test expects an error.
package broken

import "syscall"

// Attr uses a Linux-only field.
var Attr = syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
