//go:build unix

package kernel

import "testing"

func TestVersion(t *testing.T) {
	for release, want := range map[string][3]int{
		"6.18.44-fc-v1272":         {6, 18, 1},
		"6.1.0-50-amd64":           {6, 1, 1},
		"5.15.0-125-generic":       {5, 15, 1},
		"6.11":                     {6, 11, 1},
		"6.12rc3":                  {6, 12, 1},
		"4.18.0-553.el8_10.x86_64": {4, 18, 1},
		"garbage":                  {0, 0, 0},
		"x.y.z":                    {0, 0, 0},
	} {
		major, minor, ok := Version(release)
		if ok != (want[2] == 1) || ok && (major != want[0] || minor != want[1]) {
			t.Errorf("Version(%q) = %d, %d, %v; want %v", release, major, minor, ok, want)
		}
	}
}

func TestRunningKernel(t *testing.T) {
	major, minor, ok := Version(Release())
	if !ok {
		t.Fatalf("cannot parse this kernel's release %q", Release())
	}
	if !AtLeast(major, minor) || AtLeast(major, minor+1) {
		t.Errorf("AtLeast around this kernel's own %d.%d is wrong", major, minor)
	}
}
