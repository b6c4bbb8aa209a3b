package mountinfo

import "testing"

func TestParse(t *testing.T) {
	const data = `35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 /sub /sys/fs/cgroup/unified rw,relatime shared:9 master:2 - cgroup2 cgroup2 rw
44 27 7:2 / /mnt/with\040space ro,nosuid - squashfs /dev/loop2 ro
broken line
50 27 0:42 / /tmp/x/root rw - fuse.actiondfs actiondfs@/var/lib/a\134b rw,user_id=0
`
	got := Parse([]byte(data))
	if len(got) != 4 {
		t.Fatalf("parsed %d entries, want 4: %+v", len(got), got)
	}
	if got[0].FSType != "cgroup" || got[0].SuperOptions != "rw,memory" || got[0].Point != "/sys/fs/cgroup/memory" {
		t.Errorf("entry 0: %+v", got[0])
	}
	if got[1].FSType != "cgroup2" || got[1].Root != "/sub" || got[1].Point != "/sys/fs/cgroup/unified" {
		t.Errorf("optional fields mishandled: %+v", got[1])
	}
	if !got[1].Shared() || got[0].Shared() || got[2].Shared() {
		t.Errorf("propagation: entry 1 %v shared=%v, entry 0 %v shared=%v", got[1].Propagation, got[1].Shared(), got[0].Propagation, got[0].Shared())
	}
	if got[2].Point != "/mnt/with space" || got[2].Source != "/dev/loop2" {
		t.Errorf("escapes mishandled: %+v", got[2])
	}
	if got[3].FSType != "fuse.actiondfs" || got[3].Source != `actiondfs@/var/lib/a\b` {
		t.Errorf("entry 3: %+v", got[3])
	}
}

func TestUnescapeLeavesOtherBackslashes(t *testing.T) {
	for in, want := range map[string]string{`plain`: "plain", `a\040b`: "a b", `a\0`: `a\0`, `a\xyz`: `a\xyz`, `\134`: `\`} {
		if got := Unescape(in); got != want {
			t.Errorf("Unescape(%q) = %q, want %q", in, got, want)
		}
	}
}
