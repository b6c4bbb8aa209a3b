//go:build linux

package guest

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/actiond/actiond/internal/ctxio"
	"github.com/actiond/actiond/sandbox"
)

// Runtimes from a tar runtimes disk live on the CAS disk, one directory per
// runtime version:
//
//	/cas/runtimes/<name>-<sha256[:16]>/tree      the configured, sealed tree
//	/cas/runtimes/<name>-<sha256[:16]>/ready     readyMarker (JSON)
//	/cas/runtimes/<name>-<sha256[:16]>/second-stage.log
//	/cas/runtimes/.tmp-<name>-<random>/          a preparation in progress
//	/cas/runtimes/.failed-<name>.log             the last failed second stage
//
// A directory is renamed to its final name only once its tree is extracted,
// verified against the member's SHA-256, configured and synced, with the
// ready marker written: a VM killed at any point before leaves only a .tmp
// directory, which the next boot deletes before doing the work again. The
// tree is exposed at /runtimes/<name> through a read-only bind mount (the
// seal; the sandbox binds it read-only into actions again). Measured against
// building an image in the guest, a sealed directory costs nothing on top of
// the extraction, which the image would need too (see BENCHMARKS.md).
const casRuntimesDir = "runtimes"

// readyName is the ready marker's file name in a runtime's directory.
const readyName = "ready"

// secondStagePath is the second-stage script inside a runtime tree.
const secondStagePath = "/.actiond/second-stage"

// secondStageTimeout bounds one runtime's second stage (maintainer scripts
// of a whole Debian base system under emulation take minutes).
const secondStageTimeout = 30 * time.Minute

// readyMarker records what a runtime directory holds.
type readyMarker struct {
	Name       string    `json:"name"`
	Member     string    `json:"member"`
	SHA256     string    `json:"sha256"`
	Bytes      int64     `json:"bytes"` // file contents in the tree
	Entries    int       `json:"entries"`
	ExtractS   float64   `json:"extract_s"`
	ConfigureS float64   `json:"configure_s"`
	Prepared   time.Time `json:"prepared"`
}

// tarRuntimes is what prepareTarRuntimes made available.
type tarRuntimes struct {
	Runtimes []sandbox.Runtime
	// Failed maps a runtime that could not be prepared to why, in words
	// for the person who sends an action naming it.
	Failed map[string]string
	// Mounts are the read-only bind mounts made, in order.
	Mounts []string
	// Info describes each runtime for the guest Info call.
	Info map[string]any
	// Bytes is the space the runtimes take on the CAS disk (file contents).
	Bytes int64
}

// prepareTarRuntimes makes the runtimes of the tar runtimes disk dev
// available, all before it returns: each runtime already prepared on the
// CAS disk (same SHA-256) is reused without reading its member; the others
// are extracted, configured by their second stage and sealed. A runtime
// that fails is reported in Failed and the others still serve. Each
// runtime ends up read-only at mountPoint/<name>. (A booting guest plans
// with planTarRuntimes and prepares in the background instead.)
func prepareTarRuntimes(dev, casMount, mountPoint string, log *slog.Logger) (tarRuntimes, error) {
	res, pending, err := planTarRuntimes(dev, casMount, mountPoint, "", log)
	if err != nil || len(pending) == 0 {
		return res, err
	}
	prepareRuntimes(context.Background(), dev, filepath.Join(casMount, casRuntimesDir), pending, 1, log, func(p pendingRuntime, rm readyMarker, err error) {
		if err != nil {
			res.Failed[p.Entry.Name] = err.Error()
			res.Info[p.Entry.Name] = map[string]any{"failed": err.Error()}
			return
		}
		res.Mounts = append(res.Mounts, p.Target)
		res.Runtimes = append(res.Runtimes, sandbox.Runtime{Name: p.Entry.Name, Root: p.Target})
		res.Bytes += rm.Bytes
		res.Info[p.Entry.Name] = rm.info(p.Dir, false)
	})
	return res, nil
}

// runtimeDirName is a runtime version's directory under /cas/runtimes.
func runtimeDirName(e runtimeEntry) string {
	return e.Name + "-" + strings.ToLower(e.SHA256[:16])
}

// readReady reports whether dir holds the prepared runtime e.
func readReady(dir string, e runtimeEntry) (readyMarker, bool) {
	var rm readyMarker
	data, err := os.ReadFile(filepath.Join(dir, readyName))
	if err != nil || json.Unmarshal(data, &rm) != nil {
		return rm, false
	}
	if !strings.EqualFold(rm.SHA256, e.SHA256) || rm.Name != e.Name {
		return rm, false
	}
	fi, err := os.Lstat(filepath.Join(dir, "tree"))
	return rm, err == nil && fi.IsDir()
}

// removeInterrupted deletes the .tmp directories an interrupted boot left.
func removeInterrupted(dir string, log *slog.Logger) {
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), ".tmp-") {
			continue
		}
		p := filepath.Join(dir, e.Name())
		log.Warn("removing an interrupted runtime preparation (the VM stopped during its first-boot configure); it is redone", "dir", p)
		if err := removeTree(p); err != nil {
			log.Error("cannot remove an interrupted runtime preparation", "dir", p, "err", err)
		}
	}
}

// removeStale deletes runtime directories that no runtime of the disk uses
// any more (older versions, removed runtimes).
func removeStale(dir string, keep map[string]bool, log *slog.Logger) {
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") || keep[e.Name()] || !e.IsDir() {
			continue
		}
		p := filepath.Join(dir, e.Name())
		log.Info("removing a stale runtime (no longer on the runtimes disk)", "dir", p)
		if err := removeTree(p); err != nil {
			log.Error("cannot remove a stale runtime", "dir", p, "err", err)
		}
	}
}

// removeTree deletes a runtime directory, refusing if anything is still
// mounted below it (a second stage's /proc or /dev that did not unmount):
// RemoveAll would descend into it.
func removeTree(p string) error {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			f := strings.Fields(line)
			if len(f) > 4 && (f[4] == p || strings.HasPrefix(f[4], p+"/")) {
				return fmt.Errorf("%s is still mounted", f[4])
			}
		}
	}
	return os.RemoveAll(p)
}

// prepareRuntime extracts the member (hdr, r) of runtime e into a new .tmp
// directory under dir, checks it against the manifest, runs the second
// stage and renames the result to its final name.
func prepareRuntime(ctx context.Context, e runtimeEntry, hdr *tar.Header, r io.Reader, dir string, log *slog.Logger) (rm readyMarker, err error) {
	rm = readyMarker{Name: e.Name, Member: e.Member, SHA256: strings.ToLower(e.SHA256)}
	if e.Size > 0 && hdr.Size != e.Size {
		return rm, fmt.Errorf("member %s is %d bytes, the manifest says %d (the runtimes disk is damaged or was changed after it was built)", e.Member, hdr.Size, e.Size)
	}
	tmp, err := os.MkdirTemp(dir, ".tmp-"+e.Name+"-")
	if err != nil {
		return rm, err
	}
	defer func() {
		if err != nil {
			if rerr := removeTree(tmp); rerr != nil {
				log.Error("cannot remove a failed runtime preparation; the next boot retries", "dir", tmp, "err", rerr)
			}
		}
	}()
	tree := filepath.Join(tmp, "tree")
	if err := os.Mkdir(tree, 0o755); err != nil {
		return rm, err
	}
	log.Info("runtime: extracting (first boot with this version)", "runtime", e.Name, "member", e.Member, "size", formatSize(hdr.Size), "into", tmp)
	h := sha256.New()
	tee := io.TeeReader(ctxio.Reader(ctx, r), h) // the extraction of a large member stops at shutdown
	st, xerr := extractTree(tee, tree)
	if _, err := io.Copy(io.Discard, tee); err != nil && xerr == nil {
		xerr = err
	}
	if err := ctx.Err(); err != nil {
		// Stopped mid-read: the hash is of a part, not a verdict.
		return rm, fmt.Errorf("stopped while extracting: %w", err)
	}
	if sum := hex.EncodeToString(h.Sum(nil)); sum != rm.SHA256 {
		return rm, fmt.Errorf("member %s has SHA-256 %s, the manifest says %s (the runtimes disk is damaged or was changed after it was built)", e.Member, sum, rm.SHA256)
	}
	if xerr != nil {
		return rm, fmt.Errorf("extract %s: %w", e.Member, xerr)
	}
	rm.Bytes, rm.Entries, rm.ExtractS = st.Bytes, st.Entries, st.Took.Seconds()
	log.Info("runtime: extracted", "runtime", e.Name, "entries", st.Entries, "bytes", formatSize(st.Bytes), "took", st.Took.Round(time.Millisecond))

	if err := ctx.Err(); err != nil {
		return rm, fmt.Errorf("stopped after extracting: %w", err)
	}
	t0 := time.Now()
	logPath := filepath.Join(tmp, "second-stage.log")
	out, err := runSecondStage(ctx, tree, e.Name, logPath, log)
	rm.ConfigureS = time.Since(t0).Seconds()
	if err != nil {
		failed := filepath.Join(dir, ".failed-"+e.Name+".log")
		if data, rerr := os.ReadFile(logPath); rerr == nil {
			_ = os.WriteFile(failed, data, 0o644)
		}
		return rm, fmt.Errorf("second stage (%s) failed after %s: %w; output ends: %s (whole output in %s)",
			secondStagePath, time.Since(t0).Round(time.Millisecond), err, lastLines(out, 3), failed)
	}
	_ = os.Remove(filepath.Join(dir, ".failed-"+e.Name+".log"))
	log.Info("runtime: configured (second stage done)", "runtime", e.Name, "took", time.Since(t0).Round(time.Millisecond))
	if err := os.RemoveAll(filepath.Join(tree, ".actiond")); err != nil {
		return rm, fmt.Errorf("remove /.actiond: %w", err)
	}

	// Everything on disk before the marker and the rename make it count.
	t1 := time.Now()
	if err := syncfs(dir); err != nil {
		return rm, err
	}
	rm.Prepared = time.Now().UTC()
	data, _ := json.MarshalIndent(rm, "", "  ")
	if err := writeSynced(filepath.Join(tmp, readyName), data); err != nil {
		return rm, err
	}
	final := filepath.Join(dir, runtimeDirName(e))
	if _, err := os.Lstat(final); err == nil {
		// Not ready (else it would have been reused): a leftover.
		if err := removeTree(final); err != nil {
			return rm, err
		}
	}
	if err := os.Rename(tmp, final); err != nil {
		return rm, err
	}
	if err := fsyncDir(dir); err != nil {
		return rm, err
	}
	log.Info("runtime: sealed", "runtime", e.Name, "dir", final, "sync", time.Since(t1).Round(time.Millisecond),
		"extract_s", round3(rm.ExtractS), "configure_s", round3(rm.ConfigureS))
	return rm, nil
}

func round3(s float64) float64 { return float64(int64(s*1000+0.5)) / 1000 }

// lastLines returns the last n non-empty lines of out, joined with " | ".
func lastLines(out []byte, n int) string {
	var lines []string
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	if len(lines) == 0 {
		return "(no output)"
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

func syncfs(dir string) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Syncfs(fd); err != nil {
		return fmt.Errorf("syncfs %s: %w", dir, err)
	}
	return nil
}

func fsyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func writeSynced(p string, data []byte) error {
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// sealBind binds tree read-only on target (created).
func sealBind(tree, target string) error {
	if err := os.MkdirAll(target, 0o755); err != nil {
		return err
	}
	if err := unix.Mount(tree, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s on %s: %w", tree, target, err)
	}
	if err := unix.Mount("", target, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		_ = unix.Unmount(target, unix.MNT_DETACH)
		return fmt.Errorf("seal %s read-only: %w", target, err)
	}
	return nil
}

// secondStageEnv is the second stage's whole environment: the contract's
// PATH and HOME, plus what debootstrap's second stage sets so that
// maintainer scripts never wait for an answer.
var secondStageEnv = []string{
	"PATH=/usr/sbin:/usr/bin:/sbin:/bin",
	"HOME=/root",
	"LC_ALL=C",
	"DEBIAN_FRONTEND=noninteractive",
	"DEBCONF_NONINTERACTIVE_SEEN=true",
}

// runSecondStage runs /bin/sh /.actiond/second-stage chrooted in tree, with
// /proc, /sys and a minimal /dev mounted inside, its output (stdout and
// stderr) going to logPath; it returns the end of that output. It runs in a
// cgroup of its own, so that nothing it started (a daemon a maintainer
// script forgot to stop) survives it and keeps the mounts busy.
func runSecondStage(ctx context.Context, tree, name, logPath string, log *slog.Logger) ([]byte, error) {
	fi, err := os.Lstat(filepath.Join(tree, secondStagePath))
	if err != nil || !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("the runtime has no %s (was it built for this guest?)", secondStagePath)
	}
	out, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer out.Close()
	unmount, err := secondStageMounts(tree)
	if err != nil {
		return nil, err
	}
	defer func() {
		if uerr := unmount(); uerr != nil {
			log.Error("second stage: unmount", "runtime", name, "err", uerr)
		}
	}()

	// A file, not a pipe, as stdout: Wait returns when the script ends,
	// even if something it left behind still holds the output open.
	cmd := exec.Command("/bin/sh", secondStagePath)
	cmd.Dir = "/"
	cmd.Env = secondStageEnv
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: tree, Setsid: true, Pdeathsig: syscall.SIGKILL}
	cg, cgErr := newKillGroup("actiond-second-stage-" + name)
	if cgErr == nil {
		defer cg.remove(log)
		cmd.SysProcAttr.UseCgroupFD, cmd.SysProcAttr.CgroupFD = true, cg.fd
	} else {
		log.Warn("second stage: no cgroup of its own; processes it leaves behind are not killed", "runtime", name, "err", cgErr)
	}
	log.Info("runtime: running the second stage", "runtime", name, "script", secondStagePath, "output", logPath)
	if err := cmd.Start(); err != nil {
		return tailFile(logPath), fmt.Errorf("start /bin/sh in the runtime: %w", err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	timer := time.NewTimer(secondStageTimeout)
	defer timer.Stop()
	select {
	case err = <-done:
	case <-timer.C:
		if cg != nil {
			cg.kill()
		}
		_ = cmd.Process.Kill()
		<-done
		err = fmt.Errorf("timed out after %s", secondStageTimeout)
	case <-ctx.Done():
		// The guest is shutting down: the preparation is redone on the
		// next boot.
		if cg != nil {
			cg.kill()
		}
		_ = cmd.Process.Kill()
		<-done
		err = fmt.Errorf("stopped: %w", context.Cause(ctx))
	}
	if cg != nil {
		cg.kill()
	}
	tail := tailFile(logPath)
	for _, l := range strings.Split(strings.TrimSpace(string(tail)), "\n") {
		log.Debug("second stage", "runtime", name, "out", l)
	}
	return tail, err
}

// tailFile returns the last 16 KiB of a file.
func tailFile(p string) []byte {
	f, err := os.Open(p)
	if err != nil {
		return nil
	}
	defer f.Close()
	const n = 16 << 10
	if fi, err := f.Stat(); err == nil && fi.Size() > n {
		f.Seek(fi.Size()-n, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	return b
}

// secondStageMounts mounts /proc, /sys and a tmpfs /dev with the usual
// nodes inside tree; the returned function unmounts them.
func secondStageMounts(tree string) (func() error, error) {
	var done []string
	unmount := func() error {
		var errs []error
		for i := len(done) - 1; i >= 0; i-- {
			if err := unix.Unmount(done[i], 0); err != nil {
				if err2 := unix.Unmount(done[i], unix.MNT_DETACH); err2 != nil {
					errs = append(errs, fmt.Errorf("unmount %s: %w", done[i], err))
				}
			}
		}
		return errors.Join(errs...)
	}
	var restore []func() error
	done2 := func() error {
		err := unmount()
		for i := len(restore) - 1; i >= 0; i-- {
			if rerr := restore[i](); rerr != nil && err == nil {
				err = rerr
			}
		}
		return err
	}
	for _, m := range []struct{ dir, fstype string }{{"proc", "proc"}, {"sys", "sysfs"}, {"dev", "tmpfs"}} {
		target := filepath.Join(tree, m.dir)
		fi, err := os.Lstat(target)
		switch {
		case err != nil:
			if err := os.Mkdir(target, 0o755); err != nil {
				done2()
				return nil, err
			}
			restore = append(restore, func() error { return os.Remove(target) })
		case fi.Mode()&os.ModeSymlink != 0:
			// Mounting on a symlink (some trees have proc -> /proc) would
			// follow it out of the tree: a directory stands in for the
			// second stage, and the symlink comes back afterwards.
			link, err := os.Readlink(target)
			if err == nil {
				err = os.Remove(target)
			}
			if err == nil {
				err = os.Mkdir(target, 0o755)
			}
			if err != nil {
				done2()
				return nil, fmt.Errorf("replace the symlink /%s for the second stage: %w", m.dir, err)
			}
			st := fi.Sys().(*syscall.Stat_t)
			restore = append(restore, func() error {
				if err := os.Remove(target); err != nil {
					return err
				}
				if err := os.Symlink(link, target); err != nil {
					return err
				}
				return os.Lchown(target, int(st.Uid), int(st.Gid))
			})
		case !fi.IsDir():
			done2()
			return nil, fmt.Errorf("the runtime's /%s is neither a directory nor a symlink", m.dir)
		}
		data := ""
		if m.fstype == "tmpfs" {
			data = "mode=0755,size=16m"
		}
		if err := unix.Mount(m.fstype, target, m.fstype, unix.MS_NOSUID, data); err != nil {
			done2()
			return nil, fmt.Errorf("mount %s on %s: %w", m.fstype, target, err)
		}
		done = append(done, target)
	}
	dev := filepath.Join(tree, "dev")
	for _, n := range []struct {
		name         string
		major, minor uint32
	}{{"null", 1, 3}, {"zero", 1, 5}, {"full", 1, 7}, {"random", 1, 8}, {"urandom", 1, 9}, {"tty", 5, 0}} {
		p := filepath.Join(dev, n.name)
		if err := unix.Mknod(p, unix.S_IFCHR|0o666, int(unix.Mkdev(n.major, n.minor))); err != nil {
			done2()
			return nil, fmt.Errorf("mknod %s: %w", p, err)
		}
		_ = os.Chmod(p, 0o666)
	}
	for name, target := range map[string]string{"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"} {
		_ = os.Symlink(target, filepath.Join(dev, name))
	}
	for _, d := range []string{"pts", "shm"} {
		_ = os.Mkdir(filepath.Join(dev, d), 0o755)
	}
	return done2, nil
}

// killGroup is a cgroup v2 directory whose processes can be killed at once.
type killGroup struct {
	dir string
	fd  int
}

// killGroupRoot is the cgroup v2 directory second stages get their
// cgroup in: the guest mounts cgroup2 there (tests on a host may point it
// elsewhere).
var killGroupRoot = "/sys/fs/cgroup"

func newKillGroup(name string) (*killGroup, error) {
	var sfs unix.Statfs_t
	if err := unix.Statfs(killGroupRoot, &sfs); err != nil {
		return nil, err
	}
	if sfs.Type != unix.CGROUP2_SUPER_MAGIC {
		return nil, fmt.Errorf("%s is not a cgroup2 file system", killGroupRoot)
	}
	dir := filepath.Join(killGroupRoot, name)
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, err
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		os.Remove(dir)
		return nil, err
	}
	return &killGroup{dir: dir, fd: fd}, nil
}

// kill kills every process in the group and waits (briefly) until it is
// empty.
func (g *killGroup) kill() {
	_ = os.WriteFile(filepath.Join(g.dir, "cgroup.kill"), []byte("1"), 0)
	for range 100 {
		data, err := os.ReadFile(filepath.Join(g.dir, "cgroup.events"))
		if err != nil || bytes.Contains(data, []byte("populated 0")) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (g *killGroup) remove(log *slog.Logger) {
	unix.Close(g.fd)
	if err := os.Remove(g.dir); err != nil {
		log.Warn("second stage: cannot remove its cgroup", "dir", g.dir, "err", err)
	}
}

// brokenRuntimeError is what an action naming a runtime that failed to
// prepare gets.
func brokenRuntimeError(name, reason string) string {
	return "runtime " + strconv.Quote(name) + " is unavailable in this VM: preparing it on first boot failed: " + reason +
		"; fix the runtimes disk (payload) and restart the VM"
}
