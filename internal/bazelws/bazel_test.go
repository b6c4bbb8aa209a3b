package bazelws

import (
	"reflect"
	"testing"
)

func TestParseProcesses(t *testing.T) {
	for _, tc := range []struct {
		out  string
		want map[string]int
	}{
		{"INFO: 23 processes: 1 internal, 22 remote.\n", map[string]int{"total": 23, "internal": 1, "remote": 22}},
		{"INFO: 22 processes: 21 remote cache hit, 1 internal.\n", map[string]int{"total": 22, "remote cache hit": 21, "internal": 1}},
		{"INFO: 35 processes: 9 internal, 26 local.\r\n", map[string]int{"total": 35, "internal": 9, "local": 26}},
		{"INFO: 1 process: 1 internal.\n", map[string]int{"total": 1, "internal": 1}},
		{"INFO: 0 processes.\n", map[string]int{"total": 0}},
		{"INFO: 1,234 processes: 1,200 remote, 34 internal.\n", map[string]int{"total": 1234, "remote": 1200, "internal": 34}},
		// The last summary wins.
		{"INFO: 3 processes: 3 local.\nINFO: 4 processes: 1 disk cache hit, 3 linux-sandbox.\n",
			map[string]int{"total": 4, "disk cache hit": 1, "linux-sandbox": 3}},
		{"INFO: Build completed successfully, 4 total actions\n", nil},
	} {
		if got := ParseProcesses(tc.out); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("ParseProcesses(%q) = %v, want %v", tc.out, got, tc.want)
		}
	}
}
