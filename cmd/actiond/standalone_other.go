//go:build !linux

package main

import (
	"log/slog"

	"github.com/actiond/actiond/sandbox"
)

// embeddedRuntimes: the sandbox, and so `actiond serve` execution, needs
// Linux.
func embeddedRuntimes(root string, log *slog.Logger) (rts []sandbox.Runtime, unmount func(), ok bool, err error) {
	return nil, nil, false, nil
}
