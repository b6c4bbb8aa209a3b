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

func TestParseMountinfo(t *testing.T) {
	const data = `35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 /sub /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
44 27 7:2 / /mnt/with\040space ro,nosuid - squashfs /dev/loop2 ro
`
	got := parseMountinfo([]byte(data))
	if len(got) != 3 {
		t.Fatalf("parsed %d entries", len(got))
	}
	if got[1].fstype != "cgroup2" || got[1].root != "/sub" || got[1].mountpoint != "/sys/fs/cgroup/unified" {
		t.Errorf("optional fields mishandled: %+v", got[1])
	}
	if got[2].mountpoint != "/mnt/with space" || got[2].source != "/dev/loop2" {
		t.Errorf("escapes mishandled: %+v", got[2])
	}
	m := cgroupMount{mountpoint: got[1].mountpoint, root: got[1].root}
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
