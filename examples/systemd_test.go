package examples

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"testing"
)

// TestSystemdUnitBoundsTasks: the unit's TasksMax covers the server and
// every action (their cgroups are delegated below it), so it must be a
// finite number, or one action's fork bomb takes all of the host's pids.
func TestSystemdUnitBoundsTasks(t *testing.T) {
	f, err := os.Open("systemd/actiond.service")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	found := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		v, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "TasksMax=")
		if !ok {
			continue
		}
		found = true
		if n, err := strconv.Atoi(v); err != nil || n <= 0 {
			t.Errorf("TasksMax=%s; want a positive number of tasks", v)
		}
	}
	if !found {
		t.Error("the unit sets no TasksMax (systemd's default depends on the host's configuration)")
	}
}
