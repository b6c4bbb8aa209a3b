package guest

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/actiond/actiond/internal/streammux"
)

func TestParseCmdline(t *testing.T) {
	cfg, warnings, err := ParseCmdline(`console=ttyS0 panic=-1 actiond.transport=serial actiond.port=9000 actiond.cas=id:cas0 ` +
		`actiond.runtimes=none actiond.loglevel=debug actiond.max_size=20G actiond.fsync=0 actiond.drain=5s actiond.scrub_rate=32M ` +
		`actiond.default_runtime="glibc2.41" actiond.bogus=1 -- actiond.transport=vsock`)
	if err != nil {
		t.Fatal(err)
	}
	if len(warnings) != 1 || !strings.Contains(warnings[0], "actiond.bogus") {
		t.Errorf("warnings %q, want one about actiond.bogus", warnings)
	}
	want := DefaultConfig()
	want.Transport = TransportSerial
	want.VsockPort = 9000
	want.CASDevice = "id:cas0"
	want.RuntimesDevice = "none"
	want.LogLevel = slog.LevelDebug
	want.MaxSize = 20 << 30
	want.ScrubRate = 32 << 20
	want.Fsync = false
	want.DrainTimeout = 5 * time.Second
	want.DefaultRuntime = "glibc2.41"
	if cfg != want {
		t.Errorf("got  %+v\nwant %+v", cfg, want)
	}

	if cfg, _, err := ParseCmdline("root=/dev/vda"); err != nil || cfg != DefaultConfig() {
		t.Errorf("empty: %+v, %v", cfg, err)
	}
	if cfg, _, err := ParseCmdline("actiond.scrub_rate=0"); err != nil || cfg.ScrubRate != 0 || DefaultConfig().ScrubRate == 0 {
		t.Errorf("scrub_rate=0 (off): %+v, %v; the default must be on", cfg.ScrubRate, err)
	}
	for _, bad := range []string{"actiond.scrub_rate=fast", "actiond.transport=tcp", "actiond.port=x", "actiond.cas=none", "actiond.format=yes", "actiond.cas=/x y"} {
		if _, _, err := ParseCmdline(bad); err == nil {
			t.Errorf("%s: accepted", bad)
		}
	}
	if got := kernelConsoles("console=tty0 console=ttyS0,115200n8 quiet"); strings.Join(got, " ") != "tty0 ttyS0" {
		t.Errorf("consoles %v", got)
	}
	if len(Params()) != len(params) {
		t.Error("Params incomplete")
	}
}

const testModulesDep = `kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/lib/crc16.ko:
kernel/crypto/crc32c_generic.ko:
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
`

func TestModuleLoadOrder(t *testing.T) {
	md, err := parseModulesDep(testModulesDep)
	if err != nil {
		t.Fatal(err)
	}
	order, err := md.loadOrder([]string{"crc32c_generic", "ext4", "virtio_rng", "virtio-rng", "jbd2"})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, p := range order {
		names = append(names, moduleName(p))
	}
	want := "crc32c_generic jbd2 mbcache crc16 ext4 virtio_ring virtio virtio_rng"
	if got := strings.Join(names, " "); got != want {
		t.Errorf("order\n got %s\nwant %s", got, want)
	}
	if _, err := md.loadOrder([]string{"nonesuch"}); err == nil {
		t.Error("unknown module accepted")
	}
	cyc, _ := parseModulesDep("a.ko: b.ko\nb.ko: a.ko\n")
	if _, err := cyc.loadOrder([]string{"a"}); err == nil || !strings.Contains(err.Error(), "cycle") {
		t.Errorf("cycle: %v", err)
	}
	if moduleName("kernel/x/crc32c-intel.ko.xz") != "crc32c_intel" {
		t.Error("moduleName")
	}
}

func TestProbeContent(t *testing.T) {
	blank := make([]byte, probeSize)
	if got := probeContent(blank); got != contentBlank {
		t.Errorf("zeros: %s", got)
	}
	ext := bytes.Clone(blank)
	ext[1024+56], ext[1024+57] = 0x53, 0xEF
	if got := probeContent(ext); got != contentExt4 {
		t.Errorf("ext4: %s", got)
	}
	sq := bytes.Clone(blank)
	copy(sq, "hsqs")
	if got := probeContent(sq); got != contentSquashFS {
		t.Errorf("squashfs: %s", got)
	}
	other := bytes.Clone(blank)
	other[510], other[511] = 0x55, 0xAA
	if got := probeContent(other); got != contentOther {
		t.Errorf("mbr: %s", got)
	}
	if got := probeContent(blank[:4096]); got != contentOther {
		t.Errorf("short disk: %s", got)
	}

	disks := []disk{
		{Name: "vda", Dev: "/dev/vda", Content: contentSquashFS, ReadOnly: true},
		{Name: "vdb", Dev: "/dev/vdb", Content: contentOther},
		{Name: "vdc", Dev: "/dev/vdc", Content: contentBlank, Serial: "cas"},
	}
	if d, err := pickDisk("auto", disks, "", casCandidate); err != nil || d.Name != "vdc" {
		t.Errorf("auto CAS: %v %v", d, err)
	}
	if d, err := pickDisk("auto", disks, "/dev/vdc", runtimesCandidate); err != nil || d.Name != "vda" {
		t.Errorf("auto runtimes: %v %v", d, err)
	}
	if d, err := pickDisk("id:cas", disks, "", nil); err != nil || d.Name != "vdc" {
		t.Errorf("id: %v %v", d, err)
	}
	if d, err := pickDisk("vdb", disks, "", nil); err != nil || d.Name != "vdb" {
		t.Errorf("name: %v %v", d, err)
	}
	if _, err := pickDisk("/dev/vdz", disks, "", nil); err == nil {
		t.Error("missing disk found")
	}
}

func TestHasKey(t *testing.T) {
	// An ACPI power button: only KEY_POWER (116 = word 1, bit 52).
	if !hasKey("10000000000000 0", keyPower) {
		t.Error("power button not recognised")
	}
	if hasKey("0", keyPower) || hasKey("", keyPower) || hasKey("zz", keyPower) {
		t.Error("false positive")
	}
	// A keyboard-ish bitmap with many keys.
	if !hasKey("ffffffff ffffffffffffffff ffffffffffffffff fffffffffffffffe", keyPower) {
		t.Error("keyboard not recognised")
	}
}

func TestConsoleWriter(t *testing.T) {
	var c consoleWriter
	c.Write([]byte("early\n"))
	var out bytes.Buffer
	c.attach(&out)
	c.Write([]byte("late\n"))
	if out.String() != "early\nlate\n" {
		t.Errorf("got %q", out.String())
	}
}

// fakePort behaves like a virtio-serial port: reads return 0 while no host
// is connected; a connected host's data is a pipe.
type fakePort struct {
	mu     sync.Mutex
	host   net.Conn // guest side of the pipe, nil while disconnected
	opened int
}

func newFakePort() *fakePort { return &fakePort{} }

func (p *fakePort) open() (io.ReadWriteCloser, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.opened++
	return &fakeFD{p: p}, nil
}

// connect attaches a host and returns its end.
func (p *fakePort) connect() net.Conn {
	guestEnd, hostEnd := net.Pipe()
	p.mu.Lock()
	p.host = guestEnd
	p.mu.Unlock()
	return hostEnd
}

type fakeFD struct{ p *fakePort }

func (f *fakeFD) conn() net.Conn {
	f.p.mu.Lock()
	defer f.p.mu.Unlock()
	return f.p.host
}

func (f *fakeFD) Read(b []byte) (int, error) {
	c := f.conn()
	if c == nil {
		return 0, io.EOF // no host
	}
	n, err := c.Read(b)
	if err != nil {
		return 0, io.EOF // host gone: read returns 0
	}
	return n, nil
}

func (f *fakeFD) Write(b []byte) (int, error) {
	c := f.conn()
	if c == nil {
		return 0, io.ErrClosedPipe
	}
	return c.Write(b)
}

func (f *fakeFD) Close() error {
	if c := f.conn(); c != nil {
		c.Close()
	}
	return nil
}

func TestSerialListenerReconnect(t *testing.T) {
	port := newFakePort()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	l := newSerialListener("/dev/vport0p1", port.open, log, time.Millisecond)
	defer l.closeSession()
	defer l.Close()

	// Echo server on the listener.
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()

	time.Sleep(20 * time.Millisecond) // the guest polls with no host
	for i := 1; i <= 2; i++ {
		host := port.connect()
		sess, err := streammux.Dial(host)
		if err != nil {
			t.Fatal(err)
		}
		c, err := sess.Open()
		if err != nil {
			t.Fatal(err)
		}
		msg := []byte("hello " + string(rune('0'+i)))
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("session %d: echo %q, %v", i, got, err)
		}
		sess.Close() // the host goes away; the guest must take the next host
		// A real port reads 0 once the host is gone, and the next host's
		// bytes go to whichever descriptor is open: wait for the guest to
		// have reopened the port (as a host should wait a moment before
		// reconnecting, or retry a session that dies at once).
		deadline := time.Now().Add(5 * time.Second)
		for {
			port.mu.Lock()
			reopened := port.opened > i
			if reopened {
				port.host = nil
			}
			port.mu.Unlock()
			if reopened {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("session %d: the guest did not reopen the port", i)
			}
			time.Sleep(time.Millisecond)
		}
	}
	l.Close()
	if _, err := l.Accept(); err == nil {
		t.Error("Accept after Close succeeded")
	}
	port.mu.Lock()
	opened := port.opened
	port.mu.Unlock()
	if opened < 2 {
		t.Errorf("port opened %d times, want one per session", opened)
	}
}
