package guest

import (
	"fmt"
	"log/slog"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/bootparams"
	"github.com/actiond/actiond/internal/units"
)

// Transports the guest can serve on.
const (
	TransportAuto   = bootparams.TransportAuto   // vsock when the VM has a vsock device, else serial
	TransportVsock  = bootparams.TransportVsock  // AF_VSOCK, port Config.VsockPort (Virtualization.framework, vhost-vsock)
	TransportSerial = bootparams.TransportSerial // virtio-serial port Config.SerialName, multiplexed with streammux
)

// Defaults of the kernel command line parameters.
const (
	DefaultVsockPort      = bootparams.VsockPort
	DefaultSerialName     = bootparams.SerialPortName
	DefaultRuntimeName    = "glibc2.36"
	DefaultDrainTimeout   = 30 * time.Second
	DefaultCASMountPoint  = "/cas"
	DefaultRuntimesMount  = "/runtimes"
	defaultMaxSizePercent = 90
)

// Formatting policies for the CAS disk.
const (
	FormatAuto  = "auto"  // format a blank disk (only zeros where a superblock would be); mount ext4; refuse anything else
	FormatNever = "never" // never format
	FormatForce = "force" // format whatever is there (destroys the disk's content)
)

// Config is the guest's configuration. Every field has a kernel command line
// parameter (actiond.<name>=<value>); see Params.
type Config struct {
	Transport  string // actiond.transport: auto, vsock or serial
	VsockPort  uint32 // actiond.port: vsock port to listen on
	SerialName string // actiond.serial: name of the virtio-serial port

	// CASDevice and RuntimesDevice select the disks: "auto" (by content:
	// the CAS disk is ext4 or blank and writable, the runtimes disk is
	// SquashFS), a device ("/dev/vda" or "vda"), or "id:SERIAL" matching
	// the virtio-blk serial (QEMU -drive serial=, Virtualization.framework
	// blockDeviceIdentifier). RuntimesDevice may be "none".
	CASDevice      string // actiond.cas
	RuntimesDevice string // actiond.runtimes
	Format         string // actiond.format: auto, never or force
	Fsck           bool   // actiond.fsck: run e2fsck -p before mounting an existing CAS filesystem

	LogLevel       slog.Level     // actiond.loglevel: debug, info, warn or error
	DefaultRuntime string         // actiond.default_runtime: runtime of actions without "libc" (default glibc2.36, else the first one)
	Concurrency    int            // actiond.concurrency: actions at once (0: one per CPU)
	MaxSize        int64          // actiond.max_size: CAS size limit (0: 90% of the CAS filesystem)
	Fsync          bool           // actiond.fsync: 0 is actiond.durability=none
	Durability     cas.Durability // actiond.durability: what a blob waits for (default writeback)
	ScrubRate      int64          // actiond.scrub_rate: bytes per second the CAS scrubber hashes (0: off)
	InputRoot      string         // actiond.input_root: hardlink or copy
	DrainTimeout   time.Duration  // actiond.drain: how long running calls may take to finish on shutdown
	Console        string         // actiond.console: device for logs when /dev/console is unusable (e.g. hvc0)
	Modules        bool           // actiond.modules: load the initramfs's kernel modules
	Crash          string         // actiond.crash: init or server panics once booted (tests the crash path)
}

// DefaultConfig is the configuration of an empty command line.
func DefaultConfig() Config {
	return Config{
		Transport:      TransportAuto,
		VsockPort:      DefaultVsockPort,
		SerialName:     DefaultSerialName,
		CASDevice:      "auto",
		RuntimesDevice: "auto",
		Format:         FormatAuto,
		Fsck:           true,
		LogLevel:       slog.LevelInfo,
		Fsync:          true,
		ScrubRate:      cas.DefaultScrubRate,
		InputRoot:      "hardlink",
		DrainTimeout:   DefaultDrainTimeout,
		Modules:        true,
	}
}

// param is one actiond.* kernel command line parameter.
type param struct {
	doc string
	set func(c *Config, v string) error
}

func parseBool(v string) (bool, error) {
	switch strings.ToLower(v) {
	case "1", "y", "yes", "on", "true":
		return true, nil
	case "0", "n", "no", "off", "false":
		return false, nil
	}
	return false, fmt.Errorf("want 1 or 0, got %q", v)
}

func oneOf(v string, allowed ...string) error {
	for _, a := range allowed {
		if v == a {
			return nil
		}
	}
	return fmt.Errorf("want one of %s, got %q", strings.Join(allowed, ", "), v)
}

var params = map[string]param{
	bootparams.Transport: {"auto, vsock or serial (default auto: vsock when the VM has a vsock device)", func(c *Config, v string) error {
		c.Transport = v
		return oneOf(v, TransportAuto, TransportVsock, TransportSerial)
	}},
	bootparams.Port: {"vsock port to listen on (default 8980)", func(c *Config, v string) error {
		n, err := strconv.ParseUint(v, 10, 32)
		c.VsockPort = uint32(n)
		return err
	}},
	bootparams.Serial: {"name of the virtio-serial port (default actiond)", func(c *Config, v string) error {
		c.SerialName = v
		if v == "" {
			return fmt.Errorf("empty port name")
		}
		return nil
	}},
	bootparams.CAS: {"CAS disk: auto, /dev/vdX, vdX or id:SERIAL (default auto)", func(c *Config, v string) error {
		c.CASDevice = v
		if v == bootparams.None {
			return fmt.Errorf("the CAS disk is required")
		}
		return checkDeviceSpec(v)
	}},
	bootparams.Runtimes: {"runtimes disk: auto, none, /dev/vdX, vdX or id:SERIAL (default auto)", func(c *Config, v string) error {
		c.RuntimesDevice = v
		if v == bootparams.None {
			return nil
		}
		return checkDeviceSpec(v)
	}},
	"format": {"CAS disk formatting: auto (blank disks only), never or force (default auto)", func(c *Config, v string) error {
		c.Format = v
		return oneOf(v, FormatAuto, FormatNever, FormatForce)
	}},
	"fsck": {"1 to run e2fsck -p on the CAS disk before mounting it (default 1)", func(c *Config, v string) (err error) {
		c.Fsck, err = parseBool(v)
		return err
	}},
	"loglevel": {"debug, info, warn or error (default info)", func(c *Config, v string) error {
		return c.LogLevel.UnmarshalText([]byte(v))
	}},
	"default_runtime": {"runtime of actions that name none (default glibc2.36 if present, else the first)", func(c *Config, v string) error {
		c.DefaultRuntime = v
		return nil
	}},
	"concurrency": {"actions run at once (default: one per CPU)", func(c *Config, v string) (err error) {
		c.Concurrency, err = strconv.Atoi(v)
		if err == nil && c.Concurrency < 0 {
			err = fmt.Errorf("negative")
		}
		return err
	}},
	"max_size": {"CAS size limit, e.g. 20G (default: 90% of the CAS filesystem)", func(c *Config, v string) (err error) {
		c.MaxSize, err = units.ParseSize(v)
		return err
	}},
	"scrub_rate": {"bytes per second the background CAS scrubber re-hashes blobs at, e.g. 32M (default 8M; 0 = off)", func(c *Config, v string) (err error) {
		c.ScrubRate, err = units.ParseSize(v)
		return err
	}},
	"fsync": {"0 is the same as actiond.durability=none (default 1)", func(c *Config, v string) (err error) {
		c.Fsync, err = parseBool(v)
		return err
	}},
	"durability": {"what a blob waits for before it is acknowledged: writeback, group, fsync or none (default writeback; see actiond serve --durability)", func(c *Config, v string) (err error) {
		c.Durability, err = cas.ParseDurability(v)
		return err
	}},
	"input_root": {"hardlink or copy (default hardlink)", func(c *Config, v string) error {
		c.InputRoot = v
		return oneOf(v, "hardlink", "copy")
	}},
	"drain": {"how long running calls may take to finish on shutdown (default 30s)", func(c *Config, v string) (err error) {
		c.DrainTimeout, err = time.ParseDuration(v)
		return err
	}},
	bootparams.Console: {"device for logs when /dev/console is unusable at boot, e.g. hvc0", func(c *Config, v string) error {
		c.Console = strings.TrimPrefix(v, "/dev/")
		return nil
	}},
	"crash": {"init or server: panic on purpose once booted, to test that crashes reach the console and power the VM off", func(c *Config, v string) error {
		c.Crash = v
		return oneOf(v, "init", "server")
	}},
	"modules": {"0 to skip loading kernel modules (default 1)", func(c *Config, v string) (err error) {
		c.Modules, err = parseBool(v)
		return err
	}},
}

func checkDeviceSpec(v string) error {
	switch {
	case v == "auto":
	case strings.HasPrefix(v, bootparams.DiskByID) && len(v) > len(bootparams.DiskByID):
	case strings.HasPrefix(v, "/dev/") && len(v) > 5:
	case v != "" && !strings.ContainsAny(v, "/ "):
	default:
		return fmt.Errorf("want auto, /dev/NAME, NAME or id:SERIAL, got %q", v)
	}
	return nil
}

// Params describes the actiond.* kernel command line parameters, one
// "actiond.name=…: doc" line each, sorted.
func Params() []string {
	var out []string
	for name, p := range params {
		out = append(out, "actiond."+name+": "+p.doc)
	}
	sort.Strings(out)
	return out
}

// ParseCmdline reads the actiond.* parameters of a kernel command line (the
// content of /proc/cmdline) over DefaultConfig. Parameters of other
// prefixes are ignored; unknown actiond.* names are returned as warnings;
// invalid values are errors. Everything after "--" belongs to init's argv
// and is ignored.
func ParseCmdline(cmdline string) (cfg Config, warnings []string, err error) {
	cfg = DefaultConfig()
	var errs []string
	for _, word := range splitCmdline(cmdline) {
		if word == "--" {
			break
		}
		key, val, _ := strings.Cut(word, "=")
		name, ok := strings.CutPrefix(key, bootparams.Prefix)
		if !ok {
			continue
		}
		p, ok := params[name]
		if !ok {
			warnings = append(warnings, fmt.Sprintf("unknown kernel parameter %s (known: %s)", key, strings.Join(paramNames(), ", ")))
			continue
		}
		if err := p.set(&cfg, val); err != nil {
			errs = append(errs, fmt.Sprintf("%s=%s: %v", key, val, err))
		}
	}
	if len(errs) > 0 {
		return cfg, warnings, fmt.Errorf("kernel command line: %s", strings.Join(errs, "; "))
	}
	return cfg, warnings, nil
}

func paramNames() []string {
	var names []string
	for name := range params {
		names = append(names, bootparams.Prefix+name)
	}
	sort.Strings(names)
	return names
}

// splitCmdline splits like the kernel's next_arg: words separated by
// spaces, with double quotes grouping (and removed).
func splitCmdline(s string) []string {
	var words []string
	var cur strings.Builder
	inQuote, inWord := false, false
	for _, r := range s {
		switch {
		case r == '"':
			inQuote = !inQuote
			inWord = true
		case !inQuote && (r == ' ' || r == '\t' || r == '\n'):
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words
}

// kernelConsoles returns the console= devices of a command line, last
// (the one /dev/console refers to) last.
func kernelConsoles(cmdline string) []string {
	var out []string
	for _, word := range splitCmdline(cmdline) {
		if word == "--" {
			break
		}
		if v, ok := strings.CutPrefix(word, "console="); ok {
			dev, _, _ := strings.Cut(v, ",")
			out = append(out, dev)
		}
	}
	return out
}
