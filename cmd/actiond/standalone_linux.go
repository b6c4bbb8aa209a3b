//go:build linux

package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/actiond/actiond/guest"
	"github.com/actiond/actiond/internal/payload"
	"github.com/actiond/actiond/sandbox"
)

// embeddedRuntimes makes the runtimes of the embedded runtimes disk
// available to `actiond serve`: it extracts the disk under root/payload,
// mounts it read-only on root/runtimes-embedded and returns one runtime
// per top-level directory (like the guest does with the same disk). The
// returned function unmounts it. ok is false when the binary carries no
// runtimes disk.
func embeddedRuntimes(root string, log *slog.Logger) (rts []sandbox.Runtime, unmount func(), ok bool, err error) {
	if !payload.Embedded() {
		return nil, nil, false, nil
	}
	m, err := payload.ReadManifest()
	if err != nil {
		return nil, nil, false, err
	}
	if len(m.HostRuntimes) > 0 {
		return embeddedHostRuntimes(root, m, log)
	}
	if m.Runtimes == "" {
		return nil, nil, false, nil
	}
	if strings.HasSuffix(m.Runtimes, ".tar") {
		// vmhost/vmpayload's runtimes.tar holds unconfigured first-stage
		// trees that only the guest finishes; host mode cannot mount it.
		log.Info("the embedded runtimes disk is for the VM only (runtimes.tar) and no host runtime images are embedded; use --runtime-dir for host runtimes", "runtimes", m.Runtimes)
		return nil, nil, false, nil
	}
	dir := filepath.Join(root, "payload", m.Arch)
	start := time.Now()
	res, err := payload.Extract(dir, m.Runtimes)
	if err != nil {
		return nil, nil, false, fmt.Errorf("extract the embedded runtimes: %w", err)
	}
	logExtract(log, res, start)
	mnt := filepath.Join(root, "runtimes-embedded")
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		return nil, nil, false, err
	}
	img := filepath.Join(dir, m.Runtimes)
	if err := sandbox.MountImage(img, mnt); err != nil {
		return nil, nil, false, err
	}
	unmount = func() {
		if err := unix.Unmount(mnt, 0); err != nil {
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
	}
	// No Image: the sandbox must not unmount the runtimes' directories;
	// the disk is unmounted by the returned function.
	rts, err = guest.RuntimesIn(mnt)
	if err != nil {
		unmount()
		return nil, nil, false, err
	}
	log.Info("using the embedded runtimes disk", "image", img, "mount", mnt, "runtimes", len(rts))
	return rts, unmount, true, nil
}

// embeddedHostRuntimes extracts the embedded host runtime images (staged
// with `make standalone`, from `make runtimes`) under root/payload/<arch>/
// host-runtimes and mounts them read-only on root/runtimes-embedded/<name>;
// the sandbox unmounts them when it closes.
func embeddedHostRuntimes(root string, m payload.Manifest, log *slog.Logger) ([]sandbox.Runtime, func(), bool, error) {
	dir := filepath.Join(root, "payload", m.Arch, "host-runtimes")
	start := time.Now()
	res, err := payload.Extract(dir, m.HostRuntimes...)
	if err != nil {
		return nil, nil, false, fmt.Errorf("extract the embedded runtimes: %w", err)
	}
	logExtract(log, res, start)
	mnt := filepath.Join(root, "runtimes-embedded")
	rts, err := sandbox.LoadRuntimes(dir, mnt)
	if err != nil {
		return nil, nil, false, fmt.Errorf("mount the embedded runtimes: %w", err)
	}
	var names []string
	for _, rt := range rts {
		names = append(names, rt.Name)
	}
	log.Info("using the embedded runtimes disk (host runtime images)", "dir", dir, "mount", mnt, "runtimes", names)
	unmount := func() {
		for _, rt := range rts {
			if err := unix.Unmount(rt.Root, 0); err != nil && !errors.Is(err, unix.EINVAL) {
				unix.Unmount(rt.Root, unix.MNT_DETACH)
			}
		}
	}
	return rts, unmount, true, nil
}
