package qemu

import (
	"slices"
	"strings"
	"testing"

	"github.com/actiond/actiond/vmhost"
)

func testConfig(arch string) Config {
	return Config{Config: vmhost.Config{
		Arch: arch, Kernel: "/p/kernel", Initrd: "/p/initrd", CASImage: "/r/cas,1.ext4", RuntimesImage: "/p/runtimes.squashfs",
		CPUs: 2, MemoryMiB: 1024,
	}}
}

// argValue returns the values following each occurrence of flag.
func argValues(args []string, flag string) []string {
	var out []string
	for i, a := range args {
		if a == flag && i+1 < len(args) {
			out = append(out, args[i+1])
		}
	}
	return out
}

func TestArgsAmd64Serial(t *testing.T) {
	c := testConfig("amd64")
	p := Plan{Accel: AccelTCG, Transport: vmhost.TransportSerial, QMPSocket: "/s/qmp.sock", SerialSocket: "/s/serial.sock", TSCkHz: 2600000}
	p.Cmdline = Cmdline(c, p)
	a := Args(c, p)
	for flag, want := range map[string]string{
		"-M": "microvm", "-accel": "tcg,thread=multi", "-cpu": "max", "-smp": "2", "-m": "1024M",
		"-kernel": "/p/kernel", "-initrd": "/p/initrd", "-serial": "chardev:con", "-nic": "none",
		"-qmp": "unix:/s/qmp.sock,server=on,wait=off",
	} {
		if got := argValues(a, flag); len(got) != 1 || got[0] != want {
			t.Errorf("%s = %q, want %q", flag, got, want)
		}
	}
	for _, f := range []string{"-nodefaults", "-no-user-config", "-no-reboot", "-S"} {
		if !slices.Contains(a, f) {
			t.Errorf("missing %s", f)
		}
	}
	devs := strings.Join(argValues(a, "-device"), " | ")
	for _, want := range []string{
		"virtio-blk-device,drive=cas,serial=actiond-cas",
		"virtio-blk-device,drive=runtimes,serial=actiond-runtimes",
		"virtio-serial-device,id=vser0",
		"virtserialport,bus=vser0.0,chardev=actiond,id=actiond-port,name=actiond",
		"virtio-rng-device,rng=rng0",
	} {
		if !strings.Contains(devs, want) {
			t.Errorf("devices %q lack %q", devs, want)
		}
	}
	drives := strings.Join(argValues(a, "-drive"), " | ")
	if !strings.Contains(drives, "file=/r/cas,,1.ext4,if=none,id=cas,format=raw,discard=unmap") {
		t.Errorf("CAS drive (comma escaped, read-write) missing: %s", drives)
	}
	if !strings.Contains(drives, "file=/p/runtimes.squashfs,if=none,id=runtimes,format=raw,readonly=on") {
		t.Errorf("runtimes drive (read-only) missing: %s", drives)
	}
	if !slices.Contains(argValues(a, "-chardev"), "socket,id=actiond,path=/s/serial.sock,server=on,wait=off") {
		t.Errorf("serial chardev missing: %q", argValues(a, "-chardev"))
	}
	want := "console=ttyS0 panic=-1 loglevel=4 actiond.transport=serial actiond.serial=actiond actiond.cas=id:actiond-cas actiond.runtimes=id:actiond-runtimes tsc_early_khz=2600000"
	if got := argValues(a, "-append"); len(got) != 1 || got[0] != want {
		t.Errorf("-append %q\nwant %q", got, want)
	}
}

func TestArgsArm64Vsock(t *testing.T) {
	c := testConfig("arm64")
	c.RuntimesImage = ""
	p := Plan{Accel: AccelTCG, Transport: vmhost.TransportVsock, CID: 42, QMPSocket: "/s/qmp.sock", TSCkHz: 2600000}
	p.Cmdline = Cmdline(c, p)
	a := Args(c, p)
	if got := argValues(a, "-M"); got[0] != "virt" {
		t.Errorf("-M %q", got)
	}
	if got := argValues(a, "-cpu"); got[0] != "cortex-a72" {
		t.Errorf("-cpu %q", got)
	}
	devs := strings.Join(argValues(a, "-device"), " | ")
	for _, want := range []string{"virtio-blk-pci,drive=cas,serial=actiond-cas", "vhost-vsock-pci,guest-cid=42", "virtio-rng-pci"} {
		if !strings.Contains(devs, want) {
			t.Errorf("devices %q lack %q", devs, want)
		}
	}
	if strings.Contains(devs, "runtimes") || strings.Contains(devs, "virtserialport") {
		t.Errorf("unexpected devices: %s", devs)
	}
	cl := argValues(a, "-append")[0]
	for _, want := range []string{"console=ttyAMA0", "actiond.transport=vsock", "actiond.port=8980", "actiond.runtimes=none"} {
		if !strings.Contains(cl, want) {
			t.Errorf("cmdline %q lacks %q", cl, want)
		}
	}
	if strings.Contains(cl, "tsc_early_khz") {
		t.Errorf("tsc_early_khz on arm64: %q", cl)
	}
}

func TestArgsKVM(t *testing.T) {
	c := testConfig("amd64")
	c.ExtraArgs = []string{"-trace", "virtio*"}
	p := Plan{Accel: AccelKVM, Transport: vmhost.TransportSerial, TSCkHz: 2600000}
	p.Cmdline = Cmdline(c, p)
	a := Args(c, p)
	if got := argValues(a, "-cpu"); got[0] != "host" {
		t.Errorf("-cpu %q under KVM", got)
	}
	if got := argValues(a, "-accel"); got[0] != "kvm" {
		t.Errorf("-accel %q", got)
	}
	if strings.Contains(p.Cmdline, "tsc_early_khz") {
		t.Errorf("tsc_early_khz under KVM: %q", p.Cmdline)
	}
	if !slices.Equal(a[len(a)-2:], []string{"-trace", "virtio*"}) {
		t.Errorf("extra args not last: %q", a[len(a)-2:])
	}
	// A full command line replaces the contract, but TCG still gets the TSC rate.
	c.Cmdline = "console=ttyS0 custom=1"
	p.Accel = AccelTCG
	if got := Cmdline(c, p); got != "console=ttyS0 custom=1 tsc_early_khz=2600000" {
		t.Errorf("custom cmdline: %q", got)
	}
}
