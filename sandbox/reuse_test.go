//go:build linux

package sandbox_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/actiond/actiond/sandbox"
)

// TestKeptHelperCarriesNothingBetweenActions: a helper runs one action
// after another. What the first leaves behind (processes, files in /tmp
// and /dev/shm, System V IPC objects) must be gone for the second, which
// must also run at this process's priority, not a prestarted helper's.
func TestKeptHelperCarriesNothingBetweenActions(t *testing.T) {
	// No prestarted helpers: the helper started for the first action is
	// the only idle one when the second comes.
	sb := newSandboxWith(t, sandbox.Config{PrestartedHelpers: -1})
	marker := uniqueSleep()
	first := fmt.Sprintf(`sleep %s & setsid sleep %[1]s &
echo left > /tmp/left && echo left > /dev/shm/left
ipcmk -M 4096 >/dev/null && ipcmk -Q >/dev/null && ipcmk -S 1 >/dev/null
echo $$`, marker)
	// The second runs no sleep of its own.
	second := `for f in /proc/[0-9]*/comm; do [ "$(cat $f 2>/dev/null)" = sleep ] && echo "FOUND process $f"; done
for f in /tmp/* /tmp/.[!.]* /dev/shm/* /dev/shm/.[!.]*; do [ -e "$f" ] && echo "FOUND file $f"; done
ipcs -m -q -s | grep '^0x' | sed 's/^/FOUND ipc /'
cut -d' ' -f19 /proc/self/stat
echo $$`
	out1 := mustSucceed(t, sb, shSpec(t, newExecRoot(t, false), first))
	out2 := mustSucceed(t, sb, shSpec(t, newExecRoot(t, false), second))
	if strings.Contains(out2, "FOUND") {
		t.Errorf("the second action saw what the first left:\n%s", out2)
	}
	lines := strings.Fields(out2)
	if len(lines) < 2 {
		t.Fatalf("second action printed %q", out2)
	}
	pid1, err1 := strconv.Atoi(strings.TrimSpace(out1))
	pid2, err2 := strconv.Atoi(lines[len(lines)-1])
	if err1 != nil || err2 != nil {
		t.Fatalf("pids %q and %q", out1, out2)
	}
	// Pids grow in a PID namespace: the second shell came after the
	// first one's sleeps and ipcmks in the same helper. A fresh helper
	// would have given it about the first shell's pid.
	if pid2 <= pid1+3 {
		t.Errorf("second action's shell has pid %d, first's %d: the helper was not kept, so this test proves nothing", pid2, pid1)
	}
	prio, err := syscallNice()
	if err != nil {
		t.Fatal(err)
	}
	if got := lines[len(lines)-2]; got != strconv.Itoa(prio) {
		t.Errorf("the command's nice value is %s, want this process's %d", got, prio)
	}
	assertNoProcess(t, marker)
}

// syscallNice is this process's nice value, from /proc like the action's.
func syscallNice() (int, error) {
	b, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return 0, err
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	return strconv.Atoi(f[16])
}

// TestIdleHelperThatDiedIsReplaced: a kept helper killed while it waits
// (by an administrator, or by the OOM killer) costs the next action
// nothing: it gets another helper.
func TestIdleHelperThatDiedIsReplaced(t *testing.T) {
	sb := newSandboxWith(t, sandbox.Config{PrestartedHelpers: -1})
	mustSucceed(t, sb, shSpec(t, newExecRoot(t, false), "true"))
	var killed []int
	for _, pid := range ourHelpers(t) {
		if err := syscall.Kill(pid, syscall.SIGKILL); err == nil {
			killed = append(killed, pid)
		}
	}
	if len(killed) == 0 {
		t.Fatal("no idle helper of this process found to kill")
	}
	// Let the kills land before the next action takes a helper: until
	// the helpers are reaped, not just zombies (a zombie leader's other
	// threads may still be exiting, its descriptors still open). One that
	// dies at the very moment it is taken fails that action; that race is
	// not what this test is about.
	for _, pid := range killed {
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); os.IsNotExist(err) {
				break
			}
		}
	}
	if got := mustSucceed(t, sb, shSpec(t, newExecRoot(t, false), "echo again")); got != "again\n" {
		t.Errorf("stdout = %q", got)
	}
}

// ourHelpers lists the live sandbox helpers this process started.
func ourHelpers(t *testing.T) []int {
	t.Helper()
	var pids []int
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, p := range stats {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		f := strings.Fields(s[i+1:])
		if len(f) < 2 || f[0] == "Z" || f[1] != strconv.Itoa(os.Getpid()) {
			continue
		}
		dir := filepath.Dir(p)
		if cmdline, _ := os.ReadFile(filepath.Join(dir, "cmdline")); strings.HasPrefix(string(cmdline), "actiond-sandbox-init\x00") {
			pid, _ := strconv.Atoi(filepath.Base(dir))
			pids = append(pids, pid)
		}
	}
	return pids
}
