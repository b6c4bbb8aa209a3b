package guest

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/actiond/actiond/internal/bootparams"
	"github.com/actiond/actiond/sandbox"
)

// What a disk holds, judged from its first blocks.
const (
	contentBlank    = "blank"    // zeros where any superblock would be
	contentExt4     = "ext4"     // an ext2/3/4 superblock
	contentSquashFS = "squashfs" // a SquashFS superblock
	contentTar      = "tar"      // a POSIX tar stream (the runtimes disk of the Go payload builder)
	contentOther    = "other"    // anything else (partition table, other fs, data)
)

// probeSize is how much of a disk probe reads: the ext superblock is at
// 1024, and a blank disk has zeros well beyond it.
const probeSize = 64 << 10

// disk is a block device of the VM.
type disk struct {
	Name     string // vda
	Dev      string // /dev/vda
	Size     int64  // bytes
	ReadOnly bool
	Serial   string // virtio-blk serial, if any
	Content  string
}

func (d disk) String() string {
	s := fmt.Sprintf("%s (%s, %s", d.Dev, formatSize(d.Size), d.Content)
	if d.ReadOnly {
		s += ", read-only"
	}
	if d.Serial != "" {
		s += ", id " + d.Serial
	}
	return s + ")"
}

func formatSize(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	}
	return fmt.Sprintf("%d B", n)
}

// probeContent classifies the first bytes of a disk.
func probeContent(head []byte) string {
	if len(head) >= 4 && string(head[:4]) == "hsqs" {
		return contentSquashFS
	}
	// POSIX and GNU tar: "ustar" at 257 of the first header block.
	if len(head) >= 512 && string(head[257:262]) == "ustar" {
		return contentTar
	}
	// ext2/3/4: s_magic 0xEF53 at offset 56 of the superblock at 1024.
	if len(head) >= 1024+58 && binary.LittleEndian.Uint16(head[1024+56:]) == 0xEF53 {
		return contentExt4
	}
	if len(head) >= probeSize && bytes.Count(head[:probeSize], []byte{0}) == probeSize {
		return contentBlank
	}
	return contentOther
}

// listDisks returns the VM's disks (virtio-blk, SCSI, NVMe; not loop, ram,
// zram), sorted by name.
func listDisks() ([]disk, error) {
	entries, err := os.ReadDir("/sys/block")
	if err != nil {
		return nil, err
	}
	var disks []disk
	for _, e := range entries {
		name := e.Name()
		if strings.HasPrefix(name, "loop") || strings.HasPrefix(name, "ram") || strings.HasPrefix(name, "zram") {
			continue
		}
		sys := filepath.Join("/sys/block", name)
		d := disk{Name: name, Dev: "/dev/" + name}
		if s, err := readSysInt(filepath.Join(sys, "size")); err == nil {
			d.Size = s * 512
		}
		if ro, err := readSysInt(filepath.Join(sys, "ro")); err == nil {
			d.ReadOnly = ro != 0
		}
		d.Serial = readSysString(filepath.Join(sys, "serial"))
		if d.Serial == "" {
			d.Serial = readSysString(filepath.Join(sys, "device", "serial"))
		}
		d.Content = contentOther
		if head, err := readHead(d.Dev); err == nil {
			d.Content = probeContent(head)
		}
		disks = append(disks, d)
	}
	sort.Slice(disks, func(i, j int) bool { return disks[i].Name < disks[j].Name })
	return disks, nil
}

func readHead(dev string) ([]byte, error) {
	f, err := os.Open(dev)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	buf := make([]byte, probeSize)
	n, err := io.ReadFull(f, buf)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return nil, err
	}
	return buf[:n], nil
}

func readSysString(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

func readSysInt(path string) (int64, error) {
	return strconv.ParseInt(readSysString(path), 10, 64)
}

// pickDisk resolves a disk specification (see Config.CASDevice) among
// disks. For "auto", match decides; exclude is a device already taken.
func pickDisk(spec string, disks []disk, exclude string, match func(disk) bool) (disk, error) {
	for _, d := range disks {
		if d.Dev == exclude {
			continue
		}
		switch {
		case spec == "auto":
			if match(d) {
				return d, nil
			}
		case strings.HasPrefix(spec, bootparams.DiskByID):
			if d.Serial == strings.TrimPrefix(spec, bootparams.DiskByID) {
				return d, nil
			}
		case d.Dev == spec || d.Name == spec:
			return d, nil
		}
	}
	return disk{}, errNoDisk
}

var errNoDisk = errors.New("no such disk")

// describeDisks lists disks for error messages.
func describeDisks(disks []disk) string {
	if len(disks) == 0 {
		return "the VM has no disks"
	}
	var s []string
	for _, d := range disks {
		s = append(s, d.String())
	}
	return "disks: " + strings.Join(s, "; ")
}

// findDisk waits up to timeout for a disk matching spec to appear (block
// devices are probed while modules load, sometimes a little later).
func findDisk(spec string, exclude string, match func(disk) bool, timeout time.Duration) (disk, []disk, error) {
	deadline := time.Now().Add(timeout)
	for {
		disks, err := listDisks()
		if err != nil {
			return disk{}, nil, fmt.Errorf("list disks: %w", err)
		}
		d, err := pickDisk(spec, disks, exclude, match)
		if err == nil || time.Now().After(deadline) {
			return d, disks, err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// casCandidate is the "auto" rule for the CAS disk: writable and ext4 or
// blank.
func casCandidate(d disk) bool {
	return !d.ReadOnly && (d.Content == contentExt4 || d.Content == contentBlank)
}

func runtimesCandidate(d disk) bool {
	return d.Content == contentSquashFS || d.Content == contentTar
}

// tool finds a helper program carried in the initramfs.
func tool(name string) (string, bool) {
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin"} {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, true
		}
	}
	return "", false
}

// runTool runs a helper program with its output in the log.
func runTool(log *slog.Logger, name string, args ...string) (exitCode int, out string, err error) {
	path, ok := tool(name)
	if !ok {
		return -1, "", fmt.Errorf("%s is not in the initramfs", name)
	}
	cmd := exec.Command(path, args...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"}
	b, err := cmd.CombinedOutput()
	out = strings.TrimSpace(string(b))
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), out, nil
	}
	if err != nil {
		return -1, out, fmt.Errorf("run %s: %w", name, err)
	}
	return 0, out, nil
}

// casDiskResult says what setupCAS did.
type casDiskResult struct {
	Disk      disk
	Formatted bool
	MkfsTime  time.Duration
	FsckTime  time.Duration
	FsckCode  int
}

// setupCAS finds the CAS disk, formats it if it is blank (or formatting is
// forced), checks an existing file system and mounts it on mountPoint.
func setupCAS(cfg Config, mountPoint string, log *slog.Logger) (casDiskResult, error) {
	var res casDiskResult
	d, disks, err := findDisk(cfg.CASDevice, "", casCandidate, 10*time.Second)
	if err != nil {
		return res, fmt.Errorf("CAS disk %q not found (%s); attach a writable disk, blank or ext4, or set actiond.cas=", cfg.CASDevice, describeDisks(disks))
	}
	res.Disk = d
	if d.ReadOnly {
		return res, fmt.Errorf("CAS disk %s is read-only", d)
	}
	format := false
	switch {
	case cfg.Format == FormatForce:
		format = true
	case d.Content == contentBlank:
		format = cfg.Format == FormatAuto
		if !format {
			return res, fmt.Errorf("CAS disk %s is blank and actiond.format=never", d)
		}
	case d.Content == contentExt4:
	default:
		return res, fmt.Errorf("CAS disk %s holds something other than ext4 (%s); refusing to format it (actiond.format=force would)", d, d.Content)
	}
	if format {
		log.Info("formatting the CAS disk as ext4", "disk", d.String())
		t := time.Now()
		// lazy init: the kernel zeroes inode tables in the background;
		// nodiscard: discarding a large sparse image under TCG is slow
		// and pointless.
		code, out, err := runTool(log, "mke2fs", "-t", "ext4", "-F", "-q", "-m", "0", "-L", "actiond-cas",
			"-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", d.Dev)
		if err != nil {
			return res, fmt.Errorf("format %s: %w (carry mke2fs in the initramfs, or format the image on the host)", d.Dev, err)
		}
		if code != 0 {
			return res, fmt.Errorf("mke2fs %s failed (exit %d): %s", d.Dev, code, out)
		}
		res.Formatted, res.MkfsTime = true, time.Since(t)
		res.Disk.Content = contentExt4
		log.Info("formatted the CAS disk", "disk", d.Dev, "took", res.MkfsTime.Round(time.Millisecond))
	} else if cfg.Fsck {
		if _, ok := tool("e2fsck"); ok {
			t := time.Now()
			code, out, err := runTool(log, "e2fsck", "-p", d.Dev)
			res.FsckTime, res.FsckCode = time.Since(t), code
			switch {
			case err != nil:
				log.Warn("e2fsck could not run; mounting anyway (ext4 replays its journal)", "err", err)
			case code == 0:
				log.Debug("e2fsck: clean", "disk", d.Dev, "took", res.FsckTime.Round(time.Millisecond))
			case code&^3 == 0: // 1, 2, 3: errors corrected
				log.Warn("e2fsck corrected errors on the CAS disk", "exit", code, "output", out)
			default:
				// Preen gave up: repair non-interactively. The CAS is a
				// cache; whatever e2fsck drops is rebuilt by clients.
				log.Error("e2fsck -p could not repair the CAS disk; running e2fsck -fy", "exit", code, "output", out)
				code, out, err = runTool(log, "e2fsck", "-fy", d.Dev)
				if err != nil || code&^3 != 0 {
					return res, fmt.Errorf("the CAS file system on %s is damaged beyond e2fsck -fy (exit %d): %s; reformat it with actiond.format=force", d.Dev, code, out)
				}
				log.Warn("e2fsck -fy repaired the CAS disk", "exit", code)
			}
		} else {
			log.Debug("no e2fsck in the initramfs; relying on the ext4 journal")
		}
	}
	if err := os.MkdirAll(mountPoint, 0o755); err != nil {
		return res, err
	}
	if err := unix.Mount(d.Dev, mountPoint, "ext4", unix.MS_NOATIME|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		return res, fmt.Errorf("mount %s (ext4) on %s: %w (is the ext4 module loaded?)", d.Dev, mountPoint, err)
	}
	return res, nil
}

// runtimesResult is what setupRuntimes made available.
type runtimesResult struct {
	Disk     disk
	Runtimes []sandbox.Runtime
	// Failed maps a runtime of a tar disk that could not be prepared to
	// why; actions naming it get that reason.
	Failed map[string]string
	// Mounts are the file systems mounted, in order (unmounted in reverse
	// at shutdown).
	Mounts []string
	// Info describes the prepared runtimes of a tar disk.
	Info map[string]any
	// CASBytes is the space the runtimes take on the CAS disk.
	CASBytes int64
	// Pending are the runtimes of a tar disk that this boot prepares in
	// the background (listed in Runtimes too, sealed when ready).
	Pending []pendingRuntime
}

// setupRuntimes makes the runtimes disk's runtimes available under
// mountPoint. A SquashFS disk is mounted read-only there and every
// top-level directory that looks like a root file system (has usr/ or
// bin/) is a runtime named after it. A tar disk (the Go payload builder's
// first stage) is extracted, configured and sealed on the CAS disk mounted
// at casMount, once per runtime version: this only plans (planTarRuntimes);
// the server prepares what is pending in the background.
func setupRuntimes(cfg Config, mountPoint, casDev, casMount string, log *slog.Logger) (runtimesResult, error) {
	var res runtimesResult
	if cfg.RuntimesDevice == "none" {
		return res, nil
	}
	timeout := 10 * time.Second
	if cfg.RuntimesDevice == "auto" {
		timeout = 2 * time.Second // optional: do not wait long for a disk that may not be attached
	}
	d, disks, err := findDisk(cfg.RuntimesDevice, casDev, runtimesCandidate, timeout)
	if err != nil {
		if cfg.RuntimesDevice == "auto" {
			log.Warn("no runtimes disk (SquashFS or tar); actions cannot run", "hint", "attach the runtimes disk of the VM payload", "disks", describeDisks(disks))
			return res, nil
		}
		return res, fmt.Errorf("runtimes disk %q not found (%s)", cfg.RuntimesDevice, describeDisks(disks))
	}
	res.Disk = d
	if err := os.MkdirAll(mountPoint, 0o755); err != nil {
		return res, err
	}
	switch d.Content {
	case contentSquashFS:
	case contentTar:
		if casMount == "" {
			return res, fmt.Errorf("runtimes disk %s is a tar stream, which needs the CAS disk to extract to", d)
		}
		first := cfg.DefaultRuntime
		if first == "" {
			first = DefaultRuntimeName
		}
		tr, pending, err := planTarRuntimes(d.Dev, casMount, mountPoint, first, log)
		res.Runtimes, res.Failed, res.Mounts, res.Info, res.CASBytes = tr.Runtimes, tr.Failed, tr.Mounts, tr.Info, tr.Bytes
		res.Pending = pending
		for _, p := range pending {
			// Listed now, sealed later by the server (actions naming one
			// wait); unmounted at shutdown like the rest.
			res.Runtimes = append(res.Runtimes, sandbox.Runtime{Name: p.Entry.Name, Root: p.Target})
			res.Mounts = append(res.Mounts, p.Target)
			res.CASBytes += p.Entry.treeBytes()
		}
		return res, err
	default:
		return res, fmt.Errorf("runtimes disk %s is neither SquashFS nor a tar stream", d)
	}
	if err := unix.Mount(d.Dev, mountPoint, "squashfs", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		return res, fmt.Errorf("mount %s (squashfs) on %s: %w (is the squashfs module loaded?)", d.Dev, mountPoint, err)
	}
	res.Mounts = []string{mountPoint}
	rts, err := RuntimesIn(mountPoint)
	if err != nil {
		return res, err
	}
	if len(rts) == 0 {
		log.Warn("the runtimes disk has no runtime directories (<name>/usr)", "disk", d.String())
	}
	res.Runtimes = rts
	return res, nil
}

// RuntimesIn lists the runtimes of a mounted SquashFS runtimes disk: one
// per top-level directory holding usr or bin (hidden directories and the
// host runtime's name left out). The standalone `actiond serve` reads the
// same disk.
func RuntimesIn(dir string) ([]sandbox.Runtime, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read runtimes: %w", err)
	}
	var rts []sandbox.Runtime
	for _, e := range entries {
		if !e.IsDir() || e.Name() == sandbox.HostRuntimeName || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		root := filepath.Join(dir, e.Name())
		if !exists(filepath.Join(root, "usr")) && !exists(filepath.Join(root, "bin")) {
			continue
		}
		rts = append(rts, sandbox.Runtime{Name: e.Name(), Root: root})
	}
	return rts, nil
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

// unmountAll syncs and unmounts the data file systems. A busy ext4 file
// system is remounted read-only (which flushes its journal) so that
// powering off loses nothing.
func unmountAll(targets []string, log *slog.Logger) {
	unix.Sync()
	for _, t := range targets {
		if !isMountPoint(t) {
			continue
		}
		var err error
		for range 20 {
			if err = unix.Unmount(t, 0); !errors.Is(err, unix.EBUSY) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err == nil {
			log.Debug("unmounted", "path", t)
			continue
		}
		log.Warn("unmount failed; remounting read-only", "path", t, "err", err)
		if err := unix.Mount("", t, "", unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			log.Error("remount read-only failed", "path", t, "err", err)
		}
	}
	unix.Sync()
}
