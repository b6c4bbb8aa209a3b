package main

import (
	"strings"
	"testing"
)

// TestHelpExitsZero: asking a command for its usage is not a failure;
// scripts and packagers run `actiond <command> --help` and check the
// status. Unknown commands and bad flags still fail.
func TestHelpExitsZero(t *testing.T) {
	cmds := [][]string{{"help"}, {"-h"}, {"--help"}, {"cas", "-h"}, {"cas", "--help"}}
	for _, c := range documented {
		cmds = append(cmds, []string{c.name, "-h"}, []string{c.name, "--help"})
	}
	for _, c := range cmds {
		argv := c
		if cmd, sub, ok := strings.Cut(c[0], " "); ok { // "cas verify", "vm payload"
			argv = append([]string{cmd, sub}, c[1:]...)
		}
		if got := run(argv); got != 0 {
			t.Errorf("actiond %q exited %d, want 0", argv, got)
		}
	}
	for _, argv := range [][]string{{}, {"no-such-command"}, {"serve", "--no-such-flag"}, {"cas"}, {"cas", "frobnicate"}} {
		if got := run(argv); got == 0 {
			t.Errorf("actiond %q exited 0, want a failure", argv)
		}
	}
}
