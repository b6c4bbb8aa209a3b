package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/actiond/actiond/internal/units"
	"github.com/actiond/actiond/vmhost"
	"github.com/actiond/actiond/vmhost/qemu"
	"github.com/actiond/actiond/vmhost/vmpayload/debian"
	"github.com/actiond/actiond/vmhost/vz"
)

// runServeVM is `actiond serve-vm`: the REAPI server runs in a Linux VM
// (Virtualization.framework on macOS, QEMU on Linux) and this process
// proxies client connections to it. See package vmhost.
func runServeVM(args []string) error {
	fs := newFlagSet("serve-vm")
	listen := fs.String("listen", "127.0.0.1:8980", "gRPC listen address (host:port); keep it on loopback: every guest service is reachable through it")
	root := fs.String("root", filepath.Join(defaultRoot(), "vm"), "directory for the VM's host-side state (CAS image, console log, KVM probe verdict)")
	casImage := fs.String("cas-image", "", "disk image holding the guest's CAS and action cache (default <root>/cas.ext4; created sparse and formatted by the guest when missing)")
	casSize := int64(64 << 30)
	fs.Var(sizeFlag{&casSize}, "cas-image-size", "size of a newly created CAS image (sparse: it takes disk space only as it fills)")
	cpus := fs.Int("cpus", runtime.NumCPU(), "guest CPUs")
	memory := int64(vmhost.DefaultMemoryMiB << 20)
	fs.Var(sizeFlag{&memory}, "memory", "guest memory (e.g. 4G)")
	arch := fs.String("arch", runtime.GOARCH, "guest architecture: amd64 or arm64 (QEMU emulates a foreign one with TCG)")
	payloadDir := fs.String("payload-dir", "", "directory of the guest payload; built there on first start when missing (default "+vmhost.PayloadDirHelp+")")
	mirror := fs.String("mirror", debian.MirrorFromEnv(), "Debian mirror a missing payload is built from (env "+debian.MirrorEnv+")")
	kernel := fs.String("kernel", "", "guest kernel: uncompressed vmlinux (amd64) or Image (arm64) (default: from --payload-dir)")
	initrd := fs.String("initrd", "", "guest initramfs with `actiond guest` as /init (default: from --payload-dir)")
	runtimesImage := fs.String("runtimes-image", "", "runtimes disk (runtimes.tar) attached read-only (default: from --payload-dir; \"none\" attaches none)")
	backend := fs.String("backend", "auto", "hypervisor: auto (vz on macOS, qemu elsewhere), qemu or vz")
	accel := fs.String("accel", qemu.AccelAuto, "qemu accelerator: auto (KVM if a probe boot works, else TCG), kvm or tcg")
	transport := fs.String("transport", qemu.TransportAuto, "qemu host-guest transport: auto (vsock when /dev/vhost-vsock is usable), vsock or serial")
	qemuBin := fs.String("qemu", "", "qemu system emulator (default qemu-system-x86_64 or qemu-system-aarch64 on PATH)")
	kernelArgs := fs.String("kernel-args", "", "extra kernel command line parameters, e.g. actiond.concurrency=4 (see the guest's actiond.* parameters)")
	readyTimeout := fs.Duration("ready-timeout", 2*time.Minute, "how long the guest may take to boot and answer")
	drain := fs.Duration("drain-timeout", 30*time.Second, "on SIGINT/SIGTERM, how long running calls may take to finish in the guest")
	logLevel := fs.String("log-level", "info", "log level: debug (includes the guest console), info, warn, error")
	httpAddr := fs.String("http", "", "serve the VM state gauge (actiond_vm_state) and a status page on this address, e.g. 127.0.0.1:8981 (off when empty)")
	log, err := parseCommand(fs, args, logLevel)
	if err != nil {
		return err
	}
	slog.SetDefault(log)
	if *backend == "vz" || (*backend == "auto" && runtime.GOOS == "darwin") {
		// A go build / go run output lacks the virtualization
		// entitlement: re-exec an ad-hoc signed copy (macOS only; a no-op
		// elsewhere). First, before any lock or build.
		if err := vz.ReexecEntitled(context.Background(), *root, log); err != nil {
			return err
		}
	}

	embedded := false
	if *payloadDir == "" && *kernel == "" && *initrd == "" {
		// A standalone binary boots the payload it carries.
		dir, ok, err := embeddedPayloadDir(*root, *arch, log)
		if err != nil {
			return err
		}
		if ok {
			*payloadDir, embedded = dir, true
		}
	}
	if *payloadDir == "" {
		*payloadDir = vmhost.DefaultPayloadDir(*arch)
	}
	if !embedded && *kernel == "" && *initrd == "" {
		// No payload named file by file: the payload directory's, built
		// (or brought up to date) first when needed.
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
		_, err := ensurePayload(ctx, payloadRequest{Arch: *arch, Dir: *payloadDir, Mirror: *mirror}, log)
		stop()
		if err != nil {
			return err
		}
	}
	if *kernel == "" || *initrd == "" || *runtimesImage == "" {
		p, err := vmhost.FindPayload(*payloadDir, *arch)
		if err != nil && (*kernel == "" || *initrd == "") {
			return err
		}
		*kernel = cmp(*kernel, p.Kernel)
		*initrd = cmp(*initrd, p.Initrd)
		*runtimesImage = cmp(*runtimesImage, p.Runtimes)
	}
	if *runtimesImage == "none" {
		*runtimesImage = ""
	} else if *runtimesImage == "" {
		log.Warn("no runtimes image: actions can only use the guest's host runtime", "payload_dir", *payloadDir)
	}
	if err := os.MkdirAll(*root, 0o755); err != nil {
		return fmt.Errorf("create root: %w", err)
	}
	if *casImage == "" {
		*casImage = filepath.Join(*root, "cas.ext4")
	}
	created, size, err := vmhost.EnsureDiskImage(*casImage, casSize)
	if err != nil {
		return err
	}
	if created {
		log.Info("created CAS image; the guest formats it on first boot", "path", *casImage, "size", units.Format(size))
	} else if size != casSize && isFlagSet(fs, "cas-image-size") {
		log.Warn("CAS image exists with another size; keeping it", "path", *casImage, "size", units.Format(size), "requested", units.Format(casSize))
	}
	unlock, err := vmhost.LockFile(*casImage)
	if err != nil {
		return err
	}
	defer unlock()

	extra := []string{"actiond.drain=" + drain.String()}
	if *logLevel == "debug" {
		extra = append(extra, "actiond.loglevel=debug")
	}
	if *kernelArgs != "" {
		extra = append(extra, *kernelArgs)
	}
	console := vmhost.NewConsole(log, "guest", 0)
	// Keep the previous boot's console: after a crash it is the evidence.
	consolePath := filepath.Join(*root, "console.log")
	os.Rename(consolePath, consolePath+".1")
	consoleLog, err := os.Create(consolePath)
	if err != nil {
		return fmt.Errorf("console log: %w", err)
	}
	defer consoleLog.Close()
	console.SetFile(consoleLog)
	cfg := vmhost.Config{
		Arch:          *arch,
		Kernel:        *kernel,
		Initrd:        *initrd,
		CASImage:      *casImage,
		RuntimesImage: *runtimesImage,
		CPUs:          *cpus,
		MemoryMiB:     int(memory >> 20),
		ExtraCmdline:  strings.Join(extra, " "),
		Logger:        log,
		Console:       console,
	}

	if *backend == "auto" {
		*backend = "qemu"
		if runtime.GOOS == "darwin" {
			*backend = "vz"
		}
	}
	var m vmhost.Machine
	switch *backend {
	case "qemu":
		m = qemu.New(qemu.Config{
			Config:     cfg,
			QEMU:       *qemuBin,
			Accel:      *accel,
			Transport:  *transport,
			ProbeCache: filepath.Join(*root, "kvm-probe.json"),
		})
	case "vz":
		m, err = vz.New(vz.Config{Config: cfg})
		if err != nil {
			return err
		}
	default:
		return fmt.Errorf("--backend %q: want auto, qemu or vz", *backend)
	}

	l, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", *listen, err)
	}
	log.Info("actiond serve-vm starting", "listen", l.Addr().String(), "backend", *backend, "arch", *arch,
		"cpus", *cpus, "memory", units.Format(memory), "cas_image", *casImage, "kernel", *kernel, "root", *root)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	vmState, stopHTTP, err := serveVMStatus(*httpAddr, log)
	if err != nil {
		return err
	}
	defer stopHTTP()
	vmState("starting")
	defer vmState("stopped")
	err = vmhost.Serve(ctx, m, l, vmhost.ServeOptions{
		Logger:      log,
		Console:     console,
		Ready:       vmhost.ReadyOptions{Timeout: *readyTimeout},
		StopTimeout: *drain + 15*time.Second,
		OnReady: func(took time.Duration) {
			vmState("running")
			log.Info("use it from Bazel", "flags", "--remote_executor=grpc://"+l.Addr().String()+" --spawn_strategy=remote")
		},
	})
	var ee *vmhost.ExitError
	if errors.As(err, &ee) {
		vmState("dead")
		log.Error("the vm died", "err", ee.Err, "console_log", consoleLog.Name())
	}
	return err
}

// cmp returns a if set, else b.
func cmp(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

func isFlagSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) {
		if f.Name == name {
			set = true
		}
	})
	return set
}
