//go:build linux

package sandbox

import (
	"strings"
	"testing"
)

func TestFormatBytes(t *testing.T) {
	for n, want := range map[int64]string{
		1000:            "1000 bytes",
		64 << 20:        "64 MiB",
		1536 << 20:      "1.5 GiB",
		100_000_000:     "95.37 MiB",
		2 << 40:         "2 TiB",
		4096:            "4 KiB",
		3<<30 + 1<<20/2: "3 GiB",
	} {
		if got := formatBytes(n); got != want {
			t.Errorf("formatBytes(%d) = %q; want %q", n, got, want)
		}
	}
}

func TestCgroupMountDir(t *testing.T) {
	m := cgroupMount{mountpoint: "/sys/fs/cgroup/unified", root: "/sub"}
	if dir := m.dir("/sub/actiond.service"); dir != "/sys/fs/cgroup/unified/actiond.service" {
		t.Errorf("cgroup dir = %s", dir)
	}
}

func TestConfigValidation(t *testing.T) {
	for name, cfg := range map[string]Config{
		"no runtimes":        {},
		"duplicate names":    {Runtimes: []Runtime{HostRuntime(), HostRuntime()}},
		"unnamed runtime":    {Runtimes: []Runtime{{Root: "/"}}},
		"relative root":      {Runtimes: []Runtime{{Name: "x", Root: "runtimes/x"}}},
		"missing root":       {Runtimes: []Runtime{{Name: "x", Root: "/nonexistent/runtime"}}},
		"root is not a dir":  {Runtimes: []Runtime{{Name: "x", Root: "/proc/self/status"}}},
		"negative uid":       {Runtimes: []Runtime{HostRuntime()}, UID: -1},
		"unusable state dir": {Runtimes: []Runtime{HostRuntime()}, StateDir: "/proc/self/status"},
	} {
		if sb, err := New(cfg); err == nil {
			sb.Close()
			t.Errorf("%s: New succeeded", name)
		} else if !strings.HasPrefix(err.Error(), "sandbox: ") {
			t.Errorf("%s: error %q lacks context", name, err)
		}
	}
}
