//go:build linux

// Package vmtest gives VM tests a CAS disk image on which the payload's
// runtimes are already prepared. A guest prepares each runtime of its tar
// runtimes disk once (extract, dpkg's second stage, seal) and keeps it on
// the CAS disk; under QEMU's TCG that first boot takes many minutes per
// architecture. Tests that are not about that first boot start from a copy
// of one image prepared once per payload runtimes disk and cached next to
// the payloads (outside the clone, like the payloads themselves).
package vmtest

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/actiond/actiond/vmhost"
	"github.com/actiond/actiond/vmhost/qemu"
)

// ImageSize is the (sparse) size of the prepared image: serve-vm's default
// --cas-image-size, so that a copy can stand in for serve-vm's own image.
const ImageSize = 64 << 30

// prepareTimeout bounds the first boot that prepares the runtimes.
const prepareTimeout = 75 * time.Minute

// PreparedCASImage returns a CAS disk image on which every runtime of the
// default payload for arch (vmhost.DefaultPayloadDir) is prepared. It is
// made on first use by booting the payload under QEMU (TCG) until the
// guest reports every runtime ready, then cached under the payload
// directory's parent, keyed by the runtimes disk's index. Callers copy it
// (CopySparse); it is never booted in place.
func PreparedCASImage(t testing.TB, arch string) string {
	t.Helper()
	dir := vmhost.DefaultPayloadDir(arch)
	p, err := vmhost.FindPayload(dir, arch)
	if err != nil {
		t.Fatalf("no VM payload in %s: %v", dir, err)
	}
	key, err := runtimesKey(p.Runtimes)
	if err != nil {
		t.Fatalf("payload %s: %v", dir, err)
	}
	cacheDir := filepath.Join(filepath.Dir(dir), "test-cas")
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(cacheDir, arch+"-"+key+".img")
	// One preparation at a time across test processes (packages run in
	// parallel).
	lock, err := os.OpenFile(img+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(img); err == nil {
		return img
	}
	t.Logf("preparing the %s runtimes on a CAS image (first boot with runtimes disk %s; cached as %s)", arch, key, img)
	// An image left by an interrupted preparation is booted again: the
	// guest keeps the runtimes it finished and redoes the rest.
	tmp := img + ".tmp"
	if _, _, err := vmhost.EnsureDiskImage(tmp, ImageSize); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if err := prepare(t, p, arch, tmp); err != nil {
		t.Fatalf("prepare the %s runtimes: %v", arch, err)
	}
	if err := os.Rename(tmp, img); err != nil {
		t.Fatal(err)
	}
	t.Logf("prepared the %s runtimes in %s", arch, time.Since(t0).Round(time.Second))
	return img
}

// CopyPreparedCASImage copies PreparedCASImage(t, arch) to dst.
func CopyPreparedCASImage(t testing.TB, arch, dst string) {
	t.Helper()
	if err := CopySparse(PreparedCASImage(t, arch), dst); err != nil {
		t.Fatal(err)
	}
}

// runtimesKey names a runtimes disk by its index (the first member, which
// records every runtime's SHA-256): the guest keys prepared runtimes the
// same way, so an image prepared for one payload serves another with the
// same runtimes.
func runtimesKey(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	hdr, err := tar.NewReader(f).Next()
	if err != nil {
		return "", fmt.Errorf("%s is not a tar runtimes disk: %w", path, err)
	}
	if hdr.Size > 4<<20 {
		return "", fmt.Errorf("%s: first member %s is %d bytes", path, hdr.Name, hdr.Size)
	}
	h := sha256.New()
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return "", err
	}
	if _, err := io.CopyN(h, f, 512+hdr.Size); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// prepare boots p on img until every runtime is ready, then powers off.
func prepare(t testing.TB, p vmhost.Payload, arch, img string) error {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	console := vmhost.NewConsole(log, "guest", 0)
	consoleFile, err := os.Create(img + ".console.log")
	if err == nil {
		defer consoleFile.Close()
		console.SetFile(consoleFile)
	}
	m := qemu.New(qemu.Config{
		Config: vmhost.Config{
			Kernel: p.Kernel, Initrd: p.Initrd, RuntimesImage: p.Runtimes, CASImage: img,
			Arch: arch, CPUs: 2, MemoryMiB: 2048, Logger: log, Console: console,
			ExtraCmdline: "actiond.drain=5s",
		},
		Accel: qemu.AccelTCG,
	})
	ctx, cancel := context.WithTimeout(context.Background(), prepareTimeout)
	defer cancel()
	if err := m.Start(ctx); err != nil {
		return err
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		m.Stop(sctx)
	}()
	if _, err := vmhost.WaitReady(ctx, m.DialGuest, vmhost.ReadyOptions{Timeout: 10 * time.Minute, Done: m.Done()}); err != nil {
		return fmt.Errorf("%w\nconsole:\n%s", err, console.Tail(60))
	}
	cc, err := grpc.NewClient("passthrough:///guest",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return m.DialGuest(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer cc.Close()
	t0 := time.Now()
	lastLog := t0
	for {
		states, err := runtimeStates(ctx, cc)
		if err != nil {
			return err
		}
		pending, failed := 0, []string{}
		for name, st := range states {
			switch st {
			case "pending":
				pending++
			case "ready":
			default:
				failed = append(failed, name+": "+st)
			}
		}
		if len(failed) > 0 {
			return fmt.Errorf("runtimes failed: %s\nconsole:\n%s", strings.Join(failed, "; "), console.Tail(60))
		}
		if len(states) > 0 && pending == 0 {
			break
		}
		if time.Since(lastLog) > time.Minute {
			t.Logf("preparing %s runtimes: %v after %s", arch, states, time.Since(t0).Round(time.Second))
			lastLog = time.Now()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("runtimes not ready after %s: %v\nconsole:\n%s", prepareTimeout, states, console.Tail(60))
		case <-m.Done():
			return fmt.Errorf("the VM ended while preparing runtimes\nconsole:\n%s", console.Tail(60))
		case <-time.After(2 * time.Second):
		}
	}
	// A clean power-off: the guest syncs and unmounts the CAS disk.
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := m.Stop(sctx); err != nil {
		return fmt.Errorf("power off: %w\nconsole:\n%s", err, console.Tail(30))
	}
	if !strings.Contains(console.Tail(20), `msg="powering off"`) {
		return fmt.Errorf("the guest did not power off cleanly\nconsole:\n%s", console.Tail(30))
	}
	return nil
}

// runtimeStates asks the guest (Info: runtimes_prepared) for each
// runtime's state: "ready", "pending", or why it failed.
func runtimeStates(ctx context.Context, cc grpc.ClientConnInterface) (map[string]string, error) {
	out := new(structpb.Struct)
	if err := cc.Invoke(ctx, "/actiond.guest.v1.Guest/Info", &emptypb.Empty{}, out); err != nil {
		return nil, fmt.Errorf("guest info: %w", err)
	}
	states := map[string]string{}
	prepared, _ := out.AsMap()["runtimes_prepared"].(map[string]any)
	for name, v := range prepared {
		m, _ := v.(map[string]any)
		switch {
		case m["failed"] != nil:
			states[name] = fmt.Sprint(m["failed"])
		case m["state"] == "pending":
			states[name] = "pending"
		case m["dir"] != nil:
			states[name] = "ready"
		default:
			states[name] = fmt.Sprint(m)
		}
	}
	return states, nil
}

// CopySparse copies the file src to dst (created or replaced) keeping its
// holes: only the data extents are read and written (SEEK_DATA,
// SEEK_HOLE), so a mostly empty 64 GiB image copies in a moment.
func CopySparse(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if err := out.Truncate(fi.Size()); err != nil {
		out.Close()
		return err
	}
	fd := int(in.Fd())
	var off int64
	for off < fi.Size() {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			out.Close()
			return fmt.Errorf("seek data in %s: %w", src, err)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			out.Close()
			return fmt.Errorf("seek hole in %s: %w", src, err)
		}
		if _, err := io.Copy(io.NewOffsetWriter(out, data), io.NewSectionReader(in, data, hole-data)); err != nil {
			out.Close()
			return fmt.Errorf("copy %s to %s: %w", src, dst, err)
		}
		off = hole
	}
	return out.Close()
}
