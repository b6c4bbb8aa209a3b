//go:build unix

package e2e

import (
	"os"
	"syscall"
)

func fileUID(st os.FileInfo) uint32 {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return s.Uid
	}
	return 0
}
