// Command vmpayload builds the payload actiond's VM mode boots (kernel,
// initramfs, runtimes disk) for one architecture into a directory. It is
// a thin wrapper of package vmhost/vmpayload, the same builder as
// `actiond vm payload` and serve-vm's first start, kept for `make
// vm-payload` and the boot tests in this directory; it needs only Go and
// HTTP access to a Debian mirror.
//
// Usage:
//
//	go run ./tools/vmpayload [-arch amd64|arm64] [-out DIR] [-update] [-mirror URL] [-runtimes glibc2.36,...]
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"

	"github.com/actiond/actiond/internal/srctree"
	"github.com/actiond/actiond/vmhost"
	"github.com/actiond/actiond/vmhost/vmpayload"
	"github.com/actiond/actiond/vmhost/vmpayload/debian"
)

func main() {
	arch := runtime.GOARCH
	if a := os.Getenv("ARCH"); a != "" {
		arch = a
	}
	var opts vmpayload.Options
	flag.StringVar(&opts.Arch, "arch", arch, "target architecture: amd64 or arm64 (default $ARCH or this machine's)")
	out := flag.String("out", "", "payload directory (default "+vmhost.PayloadDirHelp+")")
	flag.StringVar(&opts.Mirror, "mirror", debian.MirrorFromEnv(), "Debian mirror (env "+debian.MirrorEnv+")")
	flag.BoolVar(&opts.Update, "update", false, "fetch the Debian indexes again (newer packages); otherwise cached ones are used")
	runtimes := flag.String("runtimes", "", "comma-separated runtimes to put on the runtimes disk (default: glibc2.31,glibc2.36,glibc2.41)")
	flag.BoolVar(&opts.NoRuntimes, "no-runtimes", false, "do not build the runtimes disk")
	flag.StringVar(&opts.KernelPackage, "kernel-package", "", "Debian kernel package (default: the one linux-image-<arch> depends on in "+vmpayload.KernelSuite+")")
	flag.StringVar(&opts.Compression, "compression", vmpayload.DefaultCompression, "initramfs compression: gzip or zstd")
	flag.StringVar(&opts.Src, "src", "", "actiond module root (default: found from the current directory)")
	verbose := flag.Bool("v", false, "log resolver decisions too")
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "vmpayload: unexpected arguments %q\n", flag.Args())
		os.Exit(2)
	}
	opts.Dir = *out
	if opts.Dir == "" {
		opts.Dir = vmhost.DefaultPayloadDir(opts.Arch)
	}
	if *runtimes != "" {
		opts.Runtimes = strings.Split(*runtimes, ",")
	}
	if opts.Src == "" {
		src, err := srctree.ModuleRoot(".")
		if err != nil {
			fmt.Fprintln(os.Stderr, "vmpayload:", err, "(pass -src)")
			os.Exit(2)
		}
		opts.Src = src
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if _, err := vmpayload.Build(ctx, opts); err != nil {
		fmt.Fprintf(os.Stderr, "vmpayload[%s]: FAILED: %v\n", opts.Arch, err)
		os.Exit(1)
	}
	fmt.Println(filepath.Join(opts.Dir, "manifest.json"))
}
