package qemu

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/actiond/actiond/internal/testutil"
)

func TestClassifyProbe(t *testing.T) {
	for _, tc := range []struct {
		name             string
		console, stderr  string
		marker, timedOut bool
		waitErr          error
		ok               bool
		wantIn           string
	}{
		{name: "booted", console: "Linux version\nVFS: Unable to mount root fs", marker: true, ok: true, wantIn: "booted"},
		{name: "silent hang", timedOut: true, wantIn: "printed nothing"},
		{name: "hang mid-boot", console: "Linux version 6.1\r\ntsc: Marking TSC unstable\r\n", timedOut: true, wantIn: `"tsc: Marking TSC unstable"`},
		{name: "qemu abort", waitErr: errors.New("exit status 1"), stderr: "KVM internal error. Suberror: 1\n", wantIn: "KVM internal error"},
		{name: "early exit", console: "Linux version\n", wantIn: "ended before"},
	} {
		ok, reason := classifyProbe(tc.console, tc.stderr, tc.marker, tc.timedOut, tc.waitErr, time.Second)
		if ok != tc.ok || !strings.Contains(reason, tc.wantIn) {
			t.Errorf("%s: (%v, %q), want (%v, …%q…)", tc.name, ok, reason, tc.ok, tc.wantIn)
		}
	}
}

func TestMarkerWriterAcrossWrites(t *testing.T) {
	w := &markerWriter{markers: probeMarkers, found: make(chan struct{})}
	w.Write([]byte("[ 0.9] VFS: Unable to mo"))
	if w.Found() {
		t.Fatal("found a partial marker")
	}
	w.Write([]byte("unt root fs on unknown-block(0,0)\n"))
	select {
	case <-w.found:
	default:
		t.Fatal("marker split across writes not found")
	}
	w.Write([]byte("more")) // no double close
}

func TestProbeCache(t *testing.T) {
	file := filepath.Join(t.TempDir(), "probe.json")
	r := ProbeResult{KVM: true, Reason: "fine", Key: "k1", When: time.Now()}
	if err := writeProbeCache(file, r); err != nil {
		t.Fatal(err)
	}
	if got, ok := readProbeCache(file, "k1"); !ok || !got.KVM || got.Reason != "fine" {
		t.Fatalf("read back %+v %v", got, ok)
	}
	if _, ok := readProbeCache(file, "k2"); ok {
		t.Fatal("a verdict for other inputs was used")
	}
	os.WriteFile(file, []byte("{garbage"), 0o644)
	if _, ok := readProbeCache(file, "k1"); ok {
		t.Fatal("a corrupt cache was used")
	}
}

func TestProbeKeyChangesWithKernel(t *testing.T) {
	p := payload(t)
	dir := t.TempDir()
	k := filepath.Join(dir, "vmlinux")
	os.WriteFile(k, []byte("kernel 1"), 0o644)
	pr := Probe{QEMU: Binary("amd64"), Arch: "amd64", Kernel: k}
	k1, err := pr.key()
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(k, []byte("kernel two"), 0o644)
	k2, _ := pr.key()
	if k1 == k2 {
		t.Fatal("the key ignores the kernel")
	}
	_ = p
}

// TestProbeBootMarker runs the probe's boot under TCG with the real
// kernel: the marker detection must see the kernel finish booting.
func TestProbeBootMarker(t *testing.T) {
	p := payload(t)
	r := Probe{Arch: "amd64", Kernel: p.Kernel, Timeout: 60 * time.Second}.withDefaults().boot(context.Background(), AccelTCG)
	if !strings.Contains(r.Reason, "booted") {
		t.Fatalf("TCG probe boot: %+v", r)
	}
	t.Logf("kernel-only boot under TCG to the marker: %v", r.Took.Round(time.Millisecond))
}

// TestProbeKVMHere runs the real probe on this host and checks the verdict
// is consistent and cached. On the development machine /dev/kvm exists but
// cannot run a stock kernel: the verdict there is "no".
func TestProbeKVMHere(t *testing.T) {
	p := payload(t)
	testutil.OnlyOnArch(t, "amd64", "the test payload is amd64")
	cache := filepath.Join(t.TempDir(), "kvm-probe.json")
	pr := Probe{Arch: "amd64", Kernel: p.Kernel, CacheFile: cache, Timeout: 10 * time.Second}
	r := pr.Run(context.Background())
	t.Logf("KVM probe: kvm=%v reason=%q took=%v", r.KVM, r.Reason, r.Took.Round(time.Millisecond))
	if r.Reason == "" {
		t.Fatal("no reason given")
	}
	if _, err := os.Stat("/dev/kvm"); err != nil {
		if r.KVM {
			t.Fatal("KVM without /dev/kvm")
		}
		return
	}
	r2 := pr.Run(context.Background())
	if !r2.Cached || r2.KVM != r.KVM {
		t.Fatalf("second run: %+v, want the cached verdict %v", r2, r.KVM)
	}
}
