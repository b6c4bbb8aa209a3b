//go:build linux

package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/actiond/actiond/guest"
)

// In the VM the kernel starts this binary as /init, with no arguments: the
// guest init takes over before main's command dispatch.
func init() {
	if os.Getpid() == 1 && len(os.Args) > 0 && filepath.Base(os.Args[0]) == "init" {
		guest.Main() // never returns
	}
}

// runGuest is `actiond guest`: the VM init when run as PID 1 (e.g. with
// rdinit=/actiond and "-- guest" on the kernel command line); otherwise it
// can check a kernel command line and list the parameters.
func runGuest(args []string) error {
	fs := newFlagSet("guest")
	cmdline := fs.String("cmdline", "", "instead of running: parse this kernel command line and print the resulting configuration")
	params := fs.Bool("params", false, "instead of running: list the actiond.* kernel command line parameters")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `usage: actiond guest [-params | -cmdline "..."]

Runs the actiond VM guest init: it must be PID 1 of the VM (the initramfs's
/init is this binary). It mounts the API file systems, loads the kernel
modules carried in the initramfs, formats or mounts the CAS disk (ext4) and
the runtimes disk (SquashFS), and serves actiond on vsock or virtio-serial.
Configuration comes from actiond.* parameters on the kernel command line.

`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	switch {
	case *params:
		for _, p := range guest.Params() {
			fmt.Println(p)
		}
		return nil
	case *cmdline != "":
		cfg, warnings, err := guest.ParseCmdline(*cmdline)
		for _, w := range warnings {
			fmt.Fprintln(os.Stderr, "warning:", w)
		}
		if err != nil {
			return err
		}
		fmt.Printf("%+v\n", cfg)
		return nil
	}
	if os.Getpid() != 1 {
		return fmt.Errorf("must run as PID 1 of the VM (the initramfs's /init); see -h, -params and -cmdline")
	}
	guest.Main()
	return nil
}
