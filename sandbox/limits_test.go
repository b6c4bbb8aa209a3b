//go:build linux

package sandbox_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/sandbox"
)

// enforced reports whether res.Enforced has an entry starting with prefix.
func enforced(res *executor.RunResult, prefix string) bool {
	return slices.ContainsFunc(res.Enforced, func(e string) bool { return strings.HasPrefix(e, prefix) })
}

func TestMemoryLimit(t *testing.T) {
	sb := newSandbox(t)
	root := newExecRoot(t, true)

	s := spec(t, root, "./probe", "alloc", "200")
	s.Limits.MemoryBytes = 64 << 20
	res, _, _ := run(t, sb, s)
	if !res.OOMKilled || res.ExitCode != 137 || res.Message != "killed: exceeded memory limit of 64 MiB" {
		t.Errorf("200 MiB under a 64 MiB limit: %+v; want an OOM kill", res)
	}
	if !enforced(res, "memory=64 MiB via cgroup v") {
		t.Errorf("Enforced = %q", res.Enforced)
	}

	// The classic shell version: a pipeline whose reader buffers everything.
	s = shSpec(t, root, "head -c 200M /dev/zero | tail > /dev/null")
	s.Limits.MemoryBytes = 64 << 20
	if res, _, _ := run(t, sb, s); !res.OOMKilled {
		t.Errorf("head|tail under a 64 MiB limit: %+v; want an OOM kill", res)
	}

	s = spec(t, root, "./probe", "alloc", "16")
	s.Limits.MemoryBytes = 64 << 20
	if res, _, _ := run(t, sb, s); res.OOMKilled || res.ExitCode != 0 {
		t.Errorf("16 MiB under a 64 MiB limit: %+v; want success", res)
	}
}

// TestMemoryLimitAfterAHeavyAction: the files an action writes stay
// charged to its helper's cgroup as page cache; a later action with a
// small memory limit must still start and run within it.
func TestMemoryLimitAfterAHeavyAction(t *testing.T) {
	sb := newSandbox(t)
	root := newExecRoot(t, true)
	mustSucceed(t, sb, shSpec(t, root, "head -c 96M /dev/zero > out/big && cat out/big > /dev/null"))
	for range 3 { // whichever helpers the pool hands out
		s := spec(t, root, "./probe", "alloc", "8")
		s.Limits.MemoryBytes = 32 << 20
		if res, _, _ := run(t, sb, s); res.OOMKilled || res.ExitCode != 0 {
			t.Errorf("8 MiB under a 32 MiB limit after a 96 MiB output: %+v; want success", res)
		}
	}
}

func TestPidsLimit(t *testing.T) {
	sb := newSandbox(t)
	s := spec(t, newExecRoot(t, true), "./probe", "spawn", "200")
	s.Limits.Pids = 64
	res, stdout, _ := run(t, sb, s)
	if res.ExitCode != 0 {
		t.Fatalf("exit %d", res.ExitCode)
	}
	var started, failed int
	if _, err := fmt.Sscanf(stdout, "started=%d failed=%d", &started, &failed); err != nil {
		t.Fatalf("probe output %q: %v", stdout, err)
	}
	if started >= 64 || failed == 0 {
		t.Errorf("started %d processes (%d failed) under pids=64", started, failed)
	}
	if !enforced(res, "pids=64 via cgroup v") {
		t.Errorf("Enforced = %q", res.Enforced)
	}
	// The host is unaffected.
	if out, err := exec.Command("/bin/true").CombinedOutput(); err != nil {
		t.Errorf("starting a process on the host after the fork bomb: %v %s", err, out)
	}
}

// TestTasksRlimit: an action's RLIMIT_NPROC is its pids limit, or
// DefaultMaxProcs without one, so its uid's tasks stay bounded where no pids
// cgroup controller is enabled (the VM guest's hierarchy, a host without
// delegation).
func TestTasksRlimit(t *testing.T) {
	sb := newSandbox(t)
	root := newExecRoot(t, true)
	for _, c := range []struct {
		pids int64
		want string
	}{{37, "37"}, {0, strconv.Itoa(sandbox.DefaultMaxProcs)}} {
		s := shSpec(t, root, "awk '/^Max processes/ {print $3}' /proc/self/limits")
		s.Limits.Pids = c.pids
		res, stdout, stderr := run(t, sb, s)
		if res.ExitCode != 0 || strings.TrimSpace(stdout) != c.want {
			t.Errorf("pids=%d: RLIMIT_NPROC is %q (exit %d, stderr %q), want %s", c.pids, stdout, res.ExitCode, stderr, c.want)
		}
	}
}

func TestCPULimit(t *testing.T) {
	sb := newSandbox(t)
	s := spec(t, newExecRoot(t, true), "./probe", "spin", "500")
	s.Limits.CPUMillis = 100 // a tenth of a core
	res, stdout, _ := run(t, sb, s)
	var cpuMS int
	if _, err := fmt.Sscanf(stdout, "cpu_ms=%d", &cpuMS); err != nil || res.ExitCode != 0 {
		t.Fatalf("probe: %q, exit %d, %v", stdout, res.ExitCode, err)
	}
	if cpuMS > 250 {
		t.Errorf("used %d ms of CPU in 500 ms under a 0.1-core limit", cpuMS)
	}
	if !enforced(res, "cpu=100m via cgroup v") {
		t.Errorf("Enforced = %q", res.Enforced)
	}
}

func TestCgroupsAreRemoved(t *testing.T) {
	sb := newSandbox(t)
	s := shSpec(t, newExecRoot(t, false), "sleep 1000 & true")
	s.Limits = executor.Limits{MemoryBytes: 64 << 20, Pids: 32, CPUMillis: 500}
	mustSucceed(t, sb, s)
	prefix := "actiond-" + strconv.Itoa(os.Getpid()) + "-"
	// cgroups of this test process, except those of idle helpers
	// (without limits) while the sandbox lives.
	left := func(sparesToo bool) []string {
		var out []string
		err := filepath.WalkDir("/sys/fs/cgroup", func(path string, d os.DirEntry, err error) error {
			if err != nil || !d.IsDir() {
				return nil
			}
			if strings.HasPrefix(d.Name(), prefix) {
				limited := false
				for _, f := range []string{"memory.limit_in_bytes", "memory.max", "pids.max", "cpu.max", "cpu.cfs_quota_us"} {
					if b, err := os.ReadFile(filepath.Join(path, f)); err == nil && !strings.HasPrefix(string(b), "max") && !strings.HasPrefix(string(b), "-1") && !strings.HasPrefix(string(b), "9223372036854") {
						limited = true
					}
				}
				if sparesToo || limited {
					out = append(out, path)
				}
			}
			if strings.Count(path, "/") > 7 {
				return filepath.SkipDir
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	for _, p := range left(false) {
		t.Errorf("cgroup with the run's limits left behind: %s", p)
	}
	if err := sb.Close(); err != nil {
		t.Fatal(err)
	}
	for _, p := range left(true) {
		t.Errorf("cgroup left behind after Close: %s", p)
	}
}
