package guest_test

import (
	"testing"

	"github.com/actiond/actiond/guest"
	"github.com/actiond/actiond/internal/bootparams"
	"github.com/actiond/actiond/vmhost"
)

// TestBootContractRoundTrip: every command line the host formats
// (vmhost.KernelParams) parses in the guest (guest.ParseCmdline) without
// warnings, into the transport, port, serial port and disks the host
// attached.
func TestBootContractRoundTrip(t *testing.T) {
	for _, p := range []vmhost.KernelParams{
		{Console: "ttyS0", Transport: vmhost.TransportSerial, Runtimes: true},
		{Console: "hvc0", Transport: vmhost.TransportVsock, Runtimes: true},
		{Console: "ttyAMA0", Transport: vmhost.TransportVsock, VsockPort: 9000, Runtimes: false, Extra: []string{"actiond.loglevel=debug"}},
	} {
		cmdline := p.String()
		cfg, warnings, err := guest.ParseCmdline(cmdline)
		if err != nil || len(warnings) > 0 {
			t.Errorf("%q: %v %v", cmdline, err, warnings)
			continue
		}
		if cfg.Transport != p.Transport {
			t.Errorf("%q: transport %q, want %q", cmdline, cfg.Transport, p.Transport)
		}
		wantPort := p.VsockPort
		if wantPort == 0 {
			wantPort = vmhost.DefaultVsockPort
		}
		if p.Transport == vmhost.TransportVsock && cfg.VsockPort != wantPort {
			t.Errorf("%q: vsock port %d, want %d", cmdline, cfg.VsockPort, wantPort)
		}
		if cfg.SerialName != vmhost.SerialPortName {
			t.Errorf("%q: serial port %q, the host names it %q", cmdline, cfg.SerialName, vmhost.SerialPortName)
		}
		if cfg.CASDevice != bootparams.DiskByID+vmhost.CASDiskID {
			t.Errorf("%q: CAS disk %q, the host attaches %q", cmdline, cfg.CASDevice, vmhost.CASDiskID)
		}
		wantRT := bootparams.DiskByID + vmhost.RuntimesDiskID
		if !p.Runtimes {
			wantRT = bootparams.None
		}
		if cfg.RuntimesDevice != wantRT {
			t.Errorf("%q: runtimes disk %q, want %q", cmdline, cfg.RuntimesDevice, wantRT)
		}
		if p.Console == "hvc0" && cfg.Console != "hvc0" {
			t.Errorf("%q: console %q, want hvc0", cmdline, cfg.Console)
		}
	}
	// The guest's defaults are the host's names.
	def := guest.DefaultConfig()
	if def.VsockPort != vmhost.DefaultVsockPort || def.SerialName != vmhost.SerialPortName {
		t.Errorf("guest defaults %d/%q, host %d/%q", def.VsockPort, def.SerialName, vmhost.DefaultVsockPort, vmhost.SerialPortName)
	}
}
