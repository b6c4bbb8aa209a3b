package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/srctree"
	"github.com/actiond/actiond/vmhost"
	"github.com/actiond/actiond/vmhost/vmpayload"
	"github.com/actiond/actiond/vmhost/vmpayload/debian"
)

// runVM is `actiond vm <subcommand>`.
func runVM(args []string) error {
	if len(args) == 0 || args[0] != "payload" {
		return errors.New("usage: actiond vm payload [--arch A] [--payload-dir D] [--update] [--mirror URL]")
	}
	return runVMPayload(args[1:])
}

// runVMPayload is `actiond vm payload`: build the payload serve-vm boots,
// refresh it (--update), or show it, without booting.
func runVMPayload(args []string) error {
	fs := newFlagSet("vm payload")
	arch := fs.String("arch", runtime.GOARCH, "guest architecture: amd64 or arm64")
	payloadDir := fs.String("payload-dir", "", "payload directory (default "+vmhost.PayloadDirHelp+")")
	update := fs.Bool("update", false, "fetch Debian's indexes again and rebuild what changed (newer kernel or packages)")
	mirror := fs.String("mirror", debian.MirrorFromEnv(), "Debian mirror the payload is built from (env "+debian.MirrorEnv+")")
	src := fs.String("src", "", "actiond source tree the guest binary is built from (default: the clone around the current directory)")
	show := fs.Bool("show", false, "only show the payload's manifest; build nothing")
	logLevel := fs.String("log-level", "info", "log level: debug (includes resolver decisions), info, warn, error")
	log, err := parseCommand(fs, args, logLevel)
	if err != nil {
		return err
	}
	if *payloadDir == "" {
		*payloadDir = vmhost.DefaultPayloadDir(*arch)
	}
	if *show {
		m, err := vmpayload.ReadManifest(*payloadDir, *arch)
		if err != nil {
			return fmt.Errorf("no complete payload in %s: %w", *payloadDir, err)
		}
		logManifest(log, *payloadDir, m)
		return nil
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	m, err := ensurePayload(ctx, payloadRequest{Arch: *arch, Dir: *payloadDir, Mirror: *mirror, Update: *update, Src: *src, Force: true}, log)
	if err != nil {
		return err
	}
	fmt.Println(*payloadDir)
	_ = m
	return nil
}

// payloadRequest is what serve-vm and `vm payload` ask of ensurePayload.
type payloadRequest struct {
	Arch, Dir, Mirror, Src string
	// Update refreshes Debian's indexes; Force runs the builder even when
	// the payload is complete and was made by this binary.
	Update, Force bool
}

// ensurePayload returns the payload in req.Dir, building it first when it
// is missing, incomplete (an interrupted build: the manifest is written
// last), of an older format, made by another actiond binary (then only the
// initramfs is rebuilt: every other step's inputs are unchanged and
// cached), or when an update is asked for. A complete payload made by this
// binary is used as it is: no network, no build.
func ensurePayload(ctx context.Context, req payloadRequest, log *slog.Logger) (*vmpayload.Manifest, error) {
	self, selfErr := selfID()
	m, err := vmpayload.ReadManifest(req.Dir, req.Arch)
	reason := ""
	switch {
	case errors.Is(err, fs.ErrNotExist):
		reason = "no payload yet (first start: downloads Debian packages and builds; later starts reuse it)"
	case err != nil:
		reason = "payload incomplete or outdated: " + err.Error()
	case req.Update:
		reason = "update requested"
	case selfErr == nil && m.BuilderID != self:
		reason = "a new actiond binary: rebuilding the initramfs (its guest binary)"
	case req.Force:
		reason = "checking every step"
	default:
		log.Info("payload up to date: no download, no build", "dir", req.Dir)
		logManifest(log, req.Dir, m)
		return m, nil
	}
	src := req.Src
	if src == "" {
		src = findSource()
	}
	if src == "" {
		if m != nil && err == nil {
			log.Warn("payload made by another actiond binary, and no actiond source to rebuild its guest binary from (run from a clone, or `actiond vm payload --src DIR`); booting it as it is", "dir", req.Dir)
			logManifest(log, req.Dir, m)
			return m, nil
		}
		return nil, fmt.Errorf("%s: %s; building it needs the actiond source for the guest binary: run from a clone of actiond (go run ./cmd/actiond serve-vm), or pass --kernel/--initrd", req.Dir, reason)
	}
	log.Info("building the VM payload", "reason", reason, "dir", req.Dir, "arch", req.Arch, "mirror", req.Mirror, "src", src)
	t := time.Now()
	m, err = vmpayload.Build(ctx, vmpayload.Options{
		Arch: req.Arch, Dir: req.Dir, Mirror: req.Mirror, Update: req.Update, Src: src,
		BuilderID: self, Logger: log,
	})
	if err != nil {
		// A failure before any payload file changed leaves the previous
		// payload complete: boot that rather than nothing.
		if old, oerr := vmpayload.ReadManifest(req.Dir, req.Arch); oerr == nil && !req.Force {
			log.Warn("could not bring the payload up to date; booting the previous one", "err", err, "dir", req.Dir)
			logManifest(log, req.Dir, old)
			return old, nil
		}
		return nil, fmt.Errorf("build the VM payload in %s: %w", req.Dir, err)
	}
	log.Info("VM payload built", "took", time.Since(t).Round(100*time.Millisecond))
	logManifest(log, req.Dir, m)
	return m, nil
}

// logManifest logs what a payload is.
func logManifest(log *slog.Logger, dir string, m *vmpayload.Manifest) {
	n := 0
	for _, p := range m.Packages {
		n += len(p)
	}
	log.Info("payload", "dir", dir, "arch", m.Arch, "content_hash", m.ContentHash, "kernel", m.KernelPackage,
		"runtimes", strings.Join(m.RuntimeNames, ","), "packages", n, "built_at", m.BuiltAt.Format(time.RFC3339),
		"mirror", m.Mirror)
}

// selfID is the SHA-256 of the running executable: a payload records the
// binary that built it, so that a new binary rebuilds its guest part.
func selfID() (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", err
	}
	d, err := cas.DigestFile(exe)
	return d.Hash, err
}

// findSource returns the actiond module root around the current
// directory, or "".
func findSource() string {
	dir, err := srctree.ModuleRoot(".")
	if err != nil {
		return ""
	}
	data, err := os.ReadFile(dir + "/go.mod")
	if err != nil || !strings.Contains(string(data), "module github.com/actiond/actiond\n") {
		return ""
	}
	return dir
}
