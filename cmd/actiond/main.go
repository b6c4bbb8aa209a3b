// Command actiond runs a Bazel Remote Execution API worker and cache.
//
//	actiond serve      worker+cache on this Linux host
//	actiond serve-vm   worker+cache inside a Linux VM (QEMU on Linux, Virtualization.framework on macOS)
//	actiond worker     a Buildbarn farm worker (bb_scheduler)
//	actiond vm payload build, refresh or show the VM payload
//	actiond guest      the VM guest's init (PID 1); not for direct use
//	actiond version    print the version
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"

	"github.com/actiond/actiond"
)

func usage() {
	fmt.Fprint(os.Stderr, `usage: actiond <command> [flags]

commands:
  serve     serve the REAPI cache (and executor) on this host
  serve-vm  serve from a Linux VM (QEMU on Linux, Virtualization.framework on macOS)
  cas       verify or gc the CAS of a root not in use (cas verify|gc -h)
  stats     show what a root not in use holds
  worker    run as a Buildbarn farm worker (bb_scheduler)
  vm        build or show the VM payload serve-vm boots (vm payload -h)
  guest     run as the VM guest's init (PID 1); started by serve-vm's payload
  version   print the version

Run "actiond <command> -h" for a command's flags.
`)
}

func main() { os.Exit(run(os.Args[1:])) }

// run dispatches one command and returns the process's exit status: 0 on
// success and after -h (the usage was asked for, not an error), 2 for an
// unknown command, 1 when the command failed.
func run(argv []string) int {
	if len(argv) < 1 {
		usage()
		return 2
	}
	var err error
	switch cmd, args := argv[0], argv[1:]; cmd {
	case "serve":
		err = runServe(args)
	case "serve-vm":
		err = runServeVM(args)
	case "cas":
		err = runCAS(args)
	case "stats":
		err = runStats(args)
	case "worker":
		err = runWorker(args)
	case "vm":
		err = runVM(args)
	case "guest":
		err = runGuest(args)
	case "version", "--version", "-version":
		fmt.Println("actiond", actiond.Version)
	case "help", "-h", "--help":
		usage()
	default:
		fmt.Fprintf(os.Stderr, "actiond: unknown command %q\n", cmd)
		usage()
		return 2
	}
	if errors.Is(err, flag.ErrHelp) {
		// The FlagSet has printed the command's usage.
		return 0
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "actiond %s: %v\n", argv[0], err)
		return 1
	}
	return 0
}
