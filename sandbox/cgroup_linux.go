package sandbox

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/internal/cgroupv2"
	"github.com/actiond/actiond/internal/mountinfo"
)

// limitControllers are the cgroup controllers behind executor.Limits.
var limitControllers = []string{"memory", "pids", "cpu"}

// supervisorCgroup is the leaf a cgroup v2 process moves itself into when
// its own cgroup must delegate controllers ("no internal processes" rule).
const supervisorCgroup = "actiond-supervisor"

// cgroupManager creates helpers' cgroups below the cgroups this process is
// in. It prefers cgroup v2 for every controller that is delegated there and
// uses cgroup v1 hierarchies for the rest (hybrid hosts).
type cgroupManager struct {
	log    *slog.Logger
	warned sync.Map          // limit kinds already reported as unenforceable
	v2     string            // where v2 run cgroups go; "" without cgroup v2
	v2Ctrl map[string]bool   // limit controllers usable in v2 run cgroups
	v1     map[string]string // limit controller → where its v1 run cgroups go
}

func newCgroupManager(log *slog.Logger) *cgroupManager {
	m := &cgroupManager{log: log, v2Ctrl: map[string]bool{}, v1: map[string]string{}}
	v2Mount, v1Mounts, err := cgroupMounts()
	if err != nil {
		log.Warn("sandbox: cgroups unavailable; limits will not be enforced", "err", err)
		return m
	}
	own, err := ownCgroups()
	if err != nil {
		log.Warn("sandbox: cgroups unavailable; limits will not be enforced", "err", err)
		return m
	}
	if path, ok := own[""]; ok && v2Mount != nil {
		// Moved by an earlier New (delegateV2): the cgroup to use is the parent.
		if filepath.Base(path) == supervisorCgroup {
			path = filepath.Dir(path)
		}
		if dir := v2Mount.dir(path); m.usable(dir) {
			m.v2 = dir
			m.delegateV2()
		}
	}
	for _, c := range limitControllers {
		mnt, ok := v1Mounts[c]
		path, ok2 := own[c]
		if m.v2Ctrl[c] || !ok || !ok2 {
			continue
		}
		if dir := mnt.dir(path); m.usable(dir) {
			m.v1[c] = dir
		}
	}
	m.removeStale()
	return m
}

// removeStale removes the empty helper cgroups that servers killed without
// a chance to clean up (SIGKILL, a crash) left next to ours: those whose
// process is gone. A cgroup that still holds a task stays.
func (m *cgroupManager) removeStale() {
	parents := []string{m.v2}
	for _, dir := range m.v1 {
		parents = append(parents, dir)
	}
	for _, parent := range parents {
		if parent == "" {
			continue
		}
		entries, _ := os.ReadDir(parent)
		for _, e := range entries {
			pid, ok := helperCgroupPID(e.Name())
			if !ok || !e.IsDir() || pid == os.Getpid() || unix.Kill(pid, 0) != unix.ESRCH {
				continue
			}
			if err := unix.Rmdir(filepath.Join(parent, e.Name())); err == nil {
				m.log.Debug("sandbox: removed a stale helper cgroup", "cgroup", filepath.Join(parent, e.Name()))
			}
		}
	}
}

// helperCgroupName names the cgroups of the seq-th helper of process pid.
func helperCgroupName(pid int, seq uint64) string {
	return "actiond-" + strconv.Itoa(pid) + "-" + strconv.FormatUint(seq, 10)
}

// helperCgroupPID parses the pid out of a helperCgroupName.
func helperCgroupPID(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, "actiond-")
	if !ok {
		return 0, false
	}
	pidStr, seq, ok := strings.Cut(rest, "-")
	if !ok {
		return 0, false
	}
	if _, err := strconv.ParseUint(seq, 10, 64); err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(pidStr)
	return pid, err == nil && pid > 0
}

// usable reports whether run cgroups can be created in dir (a read-only
// cgroup mount in a container cannot).
func (m *cgroupManager) usable(dir string) bool {
	if !exists(filepath.Join(dir, "cgroup.procs")) {
		return false
	}
	probe := filepath.Join(dir, "actiond-probe-"+strconv.Itoa(os.Getpid()))
	if err := os.Mkdir(probe, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		m.log.Warn("sandbox: cannot create cgroups; not using this hierarchy", "cgroup", dir, "err", err)
		return false
	}
	if err := unix.Rmdir(probe); err != nil {
		m.log.Warn("sandbox: cannot remove a probe cgroup", "cgroup", probe, "err", err)
	}
	return true
}

// String describes the setup for logs.
func (m *cgroupManager) String() string {
	var parts []string
	if m.v2 != "" {
		var ctrl []string
		for _, c := range limitControllers {
			if m.v2Ctrl[c] {
				ctrl = append(ctrl, c)
			}
		}
		parts = append(parts, fmt.Sprintf("v2 %s [%s]", m.v2, strings.Join(ctrl, ",")))
	}
	for _, c := range limitControllers {
		if dir, ok := m.v1[c]; ok {
			parts = append(parts, fmt.Sprintf("v1 %s %s", c, dir))
		}
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, "; ")
}

// delegateV2 enables the limit controllers available in our v2 cgroup for
// its children. A non-root cgroup that has processes cannot do that, so on
// EBUSY this process moves itself into a leaf child first (what systemd
// expects of a service with Delegate=yes).
func (m *cgroupManager) delegateV2() {
	avail := strings.Fields(readString(filepath.Join(m.v2, "cgroup.controllers")))
	var want []string
	for _, c := range limitControllers {
		if slices.Contains(avail, c) {
			want = append(want, c)
		}
	}
	if len(want) == 0 {
		return
	}
	err := cgroupv2.EnableControllers(m.v2, want)
	if errors.Is(err, unix.EBUSY) {
		leaf := filepath.Join(m.v2, supervisorCgroup)
		if err = os.Mkdir(leaf, 0o755); err == nil || errors.Is(err, fs.ErrExist) {
			err = os.WriteFile(filepath.Join(leaf, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0)
		}
		if err == nil {
			m.log.Info("sandbox: moved this process into a leaf cgroup to delegate controllers to actions", "cgroup", leaf)
			err = cgroupv2.EnableControllers(m.v2, want)
		}
	}
	if err != nil {
		m.log.Warn("sandbox: cannot delegate cgroup v2 controllers", "cgroup", m.v2, "controllers", want, "err", err)
	}
	enabled := strings.Fields(readString(filepath.Join(m.v2, "cgroup.subtree_control")))
	for _, c := range want {
		m.v2Ctrl[c] = slices.Contains(enabled, c)
	}
}

// runCgroup is the set of cgroups of one helper, which the actions it runs
// share one after another: the helper is cloned into it and never moves,
// since moving a process between cgroups waits for an RCU grace period
// (milliseconds on a busy machine, more in an emulated VM). Each action
// sets its limits on it; they are lifted again once it has ended.
type runCgroup struct {
	name     string            // of the helper's cgroups under each hierarchy
	v2       string            // v2 cgroup; "" if none
	v2fd     int               // open v2 cgroup, for CLONE_INTO_CGROUP; -1 if none
	v1       map[string]string // limit controller → v1 cgroup
	memory   int               // cgroup version limiting the current action's memory (0: none)
	limited  []limitReset      // what the current action's limits changed
	enforced []string          // the current action's enforced limits
	ooms     int64             // OOM kills counted before the current action
}

// newRun makes a helper's cgroups: a v2 one (if v2 is in use) and one per
// v1 controller used for limits.
func (m *cgroupManager) newRun(name string) (*runCgroup, error) {
	cg := &runCgroup{name: name, v2fd: -1, v1: map[string]string{}}
	if m.v2 != "" {
		dir := filepath.Join(m.v2, name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			return nil, fmt.Errorf("cgroup: %w", err)
		}
		cg.v2 = dir
		fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			cg.remove()
			return nil, fmt.Errorf("cgroup: open %s: %w", dir, err)
		}
		cg.v2fd = fd
	}
	for c, parent := range m.v1 {
		dir := filepath.Join(parent, name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			cg.remove()
			return nil, fmt.Errorf("cgroup: %w", err)
		}
		cg.v1[c] = dir
	}
	return cg, nil
}

// join moves the helper pid into the v1 cgroups (it was cloned into the v2
// one), before it is given an action.
func (cg *runCgroup) join(pid int) error {
	for _, dir := range cg.v1 {
		if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
			return fmt.Errorf("cgroup: adding helper to %s: %w", dir, err)
		}
	}
	return nil
}

// limit applies lim to the helper's next action: limit files in its v2
// cgroup, or in its v1 cgroup of the controller. A limit for which no
// controller is available is logged and left out of enforced.
func (m *cgroupManager) limit(cg *runCgroup, lim executor.Limits) error {
	cg.memory, cg.limited, cg.enforced = 0, nil, nil
	cpuQuota := max(lim.CPUMillis*100, 1000) // µs per 100 ms period
	limits := []struct {
		ctrl   string
		value  int64
		desc   string
		v2, v1 []limitFile
		reset  limitReset
	}{
		{"memory", lim.MemoryBytes, "memory=" + formatBytes(lim.MemoryBytes),
			[]limitFile{{"memory.max", itoa(lim.MemoryBytes), false}, {"memory.swap.max", "0", true}},
			// memsw (memory+swap) must never be below the memory limit:
			// lift it, set the memory limit, then set it.
			[]limitFile{{"memory.memsw.limit_in_bytes", "-1", true}, {"memory.limit_in_bytes", itoa(lim.MemoryBytes), false}, {"memory.memsw.limit_in_bytes", itoa(lim.MemoryBytes), true}},
			limitReset{v2: []limitFile{{"memory.max", "max", false}, {"memory.swap.max", "max", true}},
				v1: []limitFile{{"memory.memsw.limit_in_bytes", "-1", true}, {"memory.limit_in_bytes", "-1", false}}}},
		{"pids", lim.Pids, "pids=" + itoa(lim.Pids),
			[]limitFile{{"pids.max", itoa(lim.Pids), false}},
			[]limitFile{{"pids.max", itoa(lim.Pids), false}},
			limitReset{v2: []limitFile{{"pids.max", "max", false}}, v1: []limitFile{{"pids.max", "max", false}}}},
		{"cpu", lim.CPUMillis, "cpu=" + itoa(lim.CPUMillis) + "m",
			[]limitFile{{"cpu.max", itoa(cpuQuota) + " 100000", false}},
			[]limitFile{{"cpu.cfs_period_us", "100000", false}, {"cpu.cfs_quota_us", itoa(cpuQuota), false}},
			limitReset{v2: []limitFile{{"cpu.max", "max 100000", false}}, v1: []limitFile{{"cpu.cfs_quota_us", "-1", false}}}},
	}
	for _, l := range limits {
		if l.value <= 0 {
			continue
		}
		switch {
		case m.v2Ctrl[l.ctrl]:
			cg.limited = append(cg.limited, limitReset{dir: cg.v2, v2: l.reset.v2})
			if err := writeLimits(cg.v2, l.v2); err != nil {
				return err
			}
			cg.enforced = append(cg.enforced, l.desc+" via cgroup v2")
			if l.ctrl == "memory" {
				cg.memory = 2
			}
		case cg.v1[l.ctrl] != "":
			dir := cg.v1[l.ctrl]
			cg.limited = append(cg.limited, limitReset{dir: dir, v1: l.reset.v1})
			if err := writeLimits(dir, l.v1); err != nil {
				return err
			}
			cg.enforced = append(cg.enforced, l.desc+" via cgroup v1")
			if l.ctrl == "memory" {
				cg.memory = 1
			}
		default:
			if _, seen := m.warned.LoadOrStore(l.ctrl, true); !seen {
				m.log.Warn("sandbox: limit not enforced: no cgroup controller available (reported once)", "controller", l.ctrl, "limit", l.desc)
			}
		}
	}
	cg.ooms = cg.oomCount()
	return nil
}

// memoryUsage is the memory charged to the helper's cgroups (page cache
// of earlier actions' files included), or 0 where no memory controller is
// in use.
func (m *cgroupManager) memoryUsage(cg *runCgroup) int64 {
	var file string
	switch {
	case m.v2Ctrl["memory"] && cg.v2 != "":
		file = filepath.Join(cg.v2, "memory.current")
	case cg.v1["memory"] != "":
		file = filepath.Join(cg.v1["memory"], "memory.usage_in_bytes")
	default:
		return 0
	}
	n, _ := strconv.ParseInt(strings.TrimSpace(readString(file)), 10, 64)
	return n
}

// limitReset lifts one controller's limits in dir.
type limitReset struct {
	dir    string
	v2, v1 []limitFile
}

// unlimit lifts what the last limit set, so an idle helper is bound by
// no action's limits.
func (cg *runCgroup) unlimit() error {
	for _, r := range cg.limited {
		if err := writeLimits(r.dir, append(r.v2, r.v1...)); err != nil {
			return err
		}
	}
	cg.limited = nil
	return nil
}

// limitFile is a cgroup control file to write; optional ones may be missing
// (no swap accounting).
type limitFile struct {
	name, value string
	optional    bool
}

func writeLimits(dir string, files []limitFile) error {
	for _, f := range files {
		err := os.WriteFile(filepath.Join(dir, f.name), []byte(f.value), 0)
		if err != nil && !(f.optional && errors.Is(err, fs.ErrNotExist)) {
			return fmt.Errorf("cgroup: setting %s: %w", f.name, err)
		}
	}
	return nil
}

// kill SIGKILLs everything in the helper's cgroups, the helper included.
func (cg *runCgroup) kill() {
	if cg.v2 != "" {
		if err := os.WriteFile(filepath.Join(cg.v2, "cgroup.kill"), []byte("1"), 0); err != nil {
			killProcs(cg.v2) // before Linux 5.14
		}
	}
	for _, dir := range cg.v1 {
		killProcs(dir)
	}
}

func killProcs(dir string) {
	for _, f := range strings.Fields(readString(filepath.Join(dir, "cgroup.procs"))) {
		if pid, err := strconv.Atoi(f); err == nil && pid > 0 {
			_ = unix.Kill(pid, unix.SIGKILL)
		}
	}
}

// oomKilled reports whether the OOM killer killed a process of the
// current action.
func (cg *runCgroup) oomKilled() bool {
	return cg.memory != 0 && cg.oomCount() > cg.ooms
}

// oomCount is how many times the OOM killer acted in the cgroup limiting
// memory (before Linux 4.13 on cgroup v1: how often the limit was hit).
func (cg *runCgroup) oomCount() int64 {
	switch cg.memory {
	case 2:
		return keyedValue(filepath.Join(cg.v2, "memory.events"), "oom_kill")
	case 1:
		dir := cg.v1["memory"]
		if n := keyedValue(filepath.Join(dir, "memory.oom_control"), "oom_kill"); n >= 0 {
			return n
		}
		n, _ := strconv.ParseInt(strings.TrimSpace(readString(filepath.Join(dir, "memory.failcnt"))), 10, 64)
		return n
	}
	return 0
}

// remove kills whatever is left and removes the helper's cgroups.
func (cg *runCgroup) remove() error {
	cg.kill()
	if cg.v2fd >= 0 {
		unix.Close(cg.v2fd)
		cg.v2fd = -1
	}
	var errs []error
	dirs := []string{cg.v2}
	for _, dir := range cg.v1 {
		dirs = append(dirs, dir)
	}
	for _, dir := range dirs {
		if dir == "" {
			continue
		}
		// Tasks that were just killed can keep a cgroup busy for a moment.
		var err error
		for delay := time.Millisecond; ; delay *= 2 {
			err = unix.Rmdir(dir)
			if err == nil || errors.Is(err, unix.ENOENT) {
				err = nil
				break
			}
			if !errors.Is(err, unix.EBUSY) || delay > time.Second {
				break
			}
			killProcs(dir)
			time.Sleep(delay)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("removing %s: %w", dir, err))
		}
	}
	return errors.Join(errs...)
}

// cgroupMount is a mounted cgroup hierarchy.
type cgroupMount struct {
	mountpoint string
	root       string // the hierarchy path shown at the mount point
}

// dir returns the directory of the cgroup path (as in /proc/self/cgroup).
func (m cgroupMount) dir(path string) string {
	if m.root != "/" {
		path = strings.TrimPrefix(path, m.root)
	}
	return filepath.Join(m.mountpoint, path)
}

// cgroupMounts finds the cgroup v2 mount and the v1 mounts of the limit
// controllers in /proc/self/mountinfo.
func cgroupMounts() (v2 *cgroupMount, v1 map[string]cgroupMount, err error) {
	mounts, err := mountinfo.Read()
	if err != nil {
		return nil, nil, err
	}
	v1 = map[string]cgroupMount{}
	for _, mi := range mounts {
		m := cgroupMount{mountpoint: mi.Point, root: mi.Root}
		switch mi.FSType {
		case "cgroup2":
			if v2 == nil {
				v2 = &m
			}
		case "cgroup":
			for _, opt := range strings.Split(mi.SuperOptions, ",") {
				if _, seen := v1[opt]; !seen && slices.Contains(limitControllers, opt) {
					v1[opt] = m
				}
			}
		}
	}
	return v2, v1, nil
}

// ownCgroups maps each v1 controller, and "" for cgroup v2, to this
// process's cgroup path.
func ownCgroups() (map[string]string, error) {
	data, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return nil, err
	}
	own := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[0] == "0" && parts[1] == "" {
			own[""] = parts[2]
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			own[c] = parts[2]
		}
	}
	return own, nil
}

// keyedValue returns the value of key in a "key value" per line file, or -1.
func keyedValue(file, key string) int64 {
	for _, line := range strings.Split(readString(file), "\n") {
		if k, v, ok := strings.Cut(line, " "); ok && k == key {
			if n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64); err == nil {
				return n
			}
		}
	}
	return -1
}

func readString(file string) string {
	b, _ := os.ReadFile(file)
	return string(b)
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }
