package qemu

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/actiond/actiond/internal/tsc"
)

// Probe decides whether KVM actually works for a guest kernel. /dev/kvm
// existing proves little: on some hosts (nested or paravirtualized KVM)
// QEMU with -accel kvm aborts or hangs on a stock kernel. So the probe
// boots the real kernel, without initramfs or disks, under KVM and
// watches the console for a line the kernel prints only after it has
// initialised everything (it then fails to find a root file system and
// panics, which is expected). The verdict is cached in a file, keyed by
// the QEMU binary, the kernel, and the host kernel release.
type Probe struct {
	// QEMU is the emulator binary (default Binary(Arch)).
	QEMU string
	// Arch is the guest arch (GOARCH name); KVM needs it to equal the host's.
	Arch string
	// Kernel is the guest kernel to boot.
	Kernel string
	// Timeout bounds the boot (default 15s; a working KVM gets there in
	// well under a second).
	Timeout time.Duration
	// CacheFile stores verdicts ("" disables caching).
	CacheFile string
	// Logger (default slog.Default()).
	Logger *slog.Logger
}

// ProbeResult is a probe's verdict.
type ProbeResult struct {
	KVM    bool          `json:"kvm"`
	Reason string        `json:"reason"`
	Took   time.Duration `json:"took"`
	Key    string        `json:"key,omitempty"`
	When   time.Time     `json:"when"`
	Cached bool          `json:"-"`
}

// probeMarkers are console lines a kernel prints late in its boot, after
// timers, interrupts and every built-in driver work: reaching one proves
// the accelerator runs the kernel.
var probeMarkers = []string{
	"VFS: Unable to mount root fs",
	"No working init found",
	"Run /init as init process",
	"Freeing unused kernel",
}

// DefaultProbeTimeout bounds a KVM probe boot.
const DefaultProbeTimeout = 15 * time.Second

// classifyProbe turns a probe boot's outcome into a verdict.
func classifyProbe(console, stderr string, sawMarker, timedOut bool, waitErr error, timeout time.Duration) (bool, string) {
	if sawMarker {
		return true, "the kernel booted under KVM"
	}
	last := lastLine(console)
	detail := ""
	if s := strings.TrimSpace(stderr); s != "" {
		detail = "; qemu: " + lastLine(s)
	}
	switch {
	case timedOut && console == "":
		return false, fmt.Sprintf("the kernel printed nothing within %v under KVM%s", timeout, detail)
	case timedOut:
		return false, fmt.Sprintf("the kernel hung under KVM (no late boot message within %v; last console line %q)%s", timeout, last, detail)
	case waitErr != nil:
		return false, fmt.Sprintf("qemu failed under KVM: %v%s", waitErr, detail)
	default:
		return false, fmt.Sprintf("the VM ended before the kernel finished booting (last console line %q)%s", last, detail)
	}
}

func lastLine(s string) string {
	s = strings.TrimRight(strings.ReplaceAll(s, "\r", ""), "\n")
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	if len(s) > 200 {
		s = s[:200]
	}
	return s
}

func (p Probe) withDefaults() Probe {
	if p.Logger == nil {
		p.Logger = slog.Default()
	}
	if p.Arch == "" {
		p.Arch = runtime.GOARCH
	}
	if p.QEMU == "" {
		p.QEMU = Binary(p.Arch)
	}
	if p.Timeout <= 0 {
		p.Timeout = DefaultProbeTimeout
	}
	return p
}

// Run returns the verdict, from the cache when the key matches.
func (p Probe) Run(ctx context.Context) ProbeResult {
	p = p.withDefaults()
	log := p.Logger
	if p.Arch != runtime.GOARCH {
		return ProbeResult{Reason: fmt.Sprintf("the guest is %s, the host %s: KVM runs only the host's architecture", p.Arch, runtime.GOARCH), When: time.Now()}
	}
	if err := deviceUsable("/dev/kvm"); err != nil {
		return ProbeResult{Reason: err.Error(), When: time.Now()}
	}
	key, err := p.key()
	if err != nil {
		return ProbeResult{Reason: "cannot identify the probe inputs: " + err.Error(), When: time.Now()}
	}
	if r, ok := readProbeCache(p.CacheFile, key); ok {
		r.Cached = true
		return r
	}
	r := p.boot(ctx, AccelKVM)
	r.Key = key
	if ctx.Err() != nil {
		// Interrupted: no verdict worth caching.
		return r
	}
	if err := writeProbeCache(p.CacheFile, r); err != nil {
		log.Warn("cannot cache the KVM probe verdict", "file", p.CacheFile, "err", err)
	}
	return r
}

// key identifies the inputs of a verdict.
func (p Probe) key() (string, error) {
	qemu, err := exec.LookPath(p.QEMU)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	for _, f := range []string{qemu, p.Kernel} {
		abs, _ := filepath.Abs(f)
		st, err := os.Stat(abs)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(h, "%s\x00%d\x00%d\x00", abs, st.Size(), st.ModTime().UnixNano())
	}
	fmt.Fprintf(h, "%s\x00%s\x00", p.Arch, hostKernelRelease())
	return hex.EncodeToString(h.Sum(nil)[:16]), nil
}

// boot runs the probe boot under accel (tests use AccelTCG to check the
// machinery without KVM).
func (p Probe) boot(ctx context.Context, accel string) ProbeResult {
	start := time.Now()
	args := append(machineArgs(p.Arch, accel, ""),
		"-smp", "1", "-m", "256M",
		"-kernel", p.Kernel,
		"-append", "console="+ConsoleDevice(p.Arch)+" panic=-1",
	)
	if accel == AccelTCG && p.Arch == "amd64" {
		if khz := tsc.HostKHz(); khz > 0 {
			args[len(args)-1] += fmt.Sprintf(" tsc_early_khz=%d", khz)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, p.Timeout)
	defer cancel()
	cmd := exec.Command(p.QEMU, args...)
	cmd.SysProcAttr = sysProcAttr()
	mw := &markerWriter{markers: probeMarkers, found: make(chan struct{})}
	var stderr bytes.Buffer
	cmd.Stdout = mw
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return ProbeResult{Reason: fmt.Sprintf("start %s: %v", p.QEMU, err), When: time.Now(), Took: time.Since(start)}
	}
	waitc := make(chan error, 1)
	go func() { waitc <- cmd.Wait() }()
	var waitErr error
	timedOut, exited := false, false
	select {
	case <-mw.found:
	case waitErr = <-waitc:
		exited = true
	case <-ctx.Done():
		timedOut = true
	}
	if !exited {
		cmd.Process.Kill()
		<-waitc
	}
	took := time.Since(start)
	ok, reason := classifyProbe(mw.String(), stderr.String(), mw.Found(), timedOut, waitErr, p.Timeout)
	return ProbeResult{KVM: ok && accel == AccelKVM, Reason: reason, Took: took, When: time.Now()}
}

// markerWriter collects output and signals when any marker appears.
type markerWriter struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	markers []string
	found   chan struct{}
	seen    bool
}

func (w *markerWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if !w.seen {
		// Search the recent window only; markers are short.
		b := w.buf.Bytes()
		from := max(0, len(b)-len(p)-256)
		for _, m := range w.markers {
			if bytes.Contains(b[from:], []byte(m)) {
				w.seen = true
				close(w.found)
				break
			}
		}
	}
	return len(p), nil
}

func (w *markerWriter) Found() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.seen
}

func (w *markerWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

func readProbeCache(file, key string) (ProbeResult, bool) {
	if file == "" {
		return ProbeResult{}, false
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return ProbeResult{}, false
	}
	var r ProbeResult
	if json.Unmarshal(b, &r) != nil || r.Key != key {
		return ProbeResult{}, false
	}
	return r, true
}

func writeProbeCache(file string, r ProbeResult) error {
	if file == "" {
		return nil
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(file), 0o755); err != nil {
		return err
	}
	tmp := file + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, file); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}
