package benchutil

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// clockTicks is USER_HZ, the unit of /proc/PID/stat's times: 100 on every
// Linux architecture Go supports.
const clockTicks = 100

// ProcessCPU is the CPU time process pid and all its descendants have used
// (user and system), reaped or still running: for a server, its own work
// plus that of the helpers it keeps and of the commands they ran. A live
// descendant's time counts until it is reaped, then in its parent's
// children's time, so the sum only grows.
func ProcessCPU(pid int) (time.Duration, error) {
	own, err := statCPU(pid)
	if err != nil {
		return 0, err
	}
	for _, child := range liveChildren(pid) {
		// A child that ended since it was listed was, or will be, counted
		// in its parent's children's time.
		if c, err := ProcessCPU(child); err == nil {
			own += c
		}
	}
	return own, nil
}

// liveChildren lists the children of every thread of pid.
func liveChildren(pid int) []int {
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	var kids []int
	for _, t := range tasks {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pid, t.Name()))
		for _, f := range strings.Fields(string(b)) {
			if n, err := strconv.Atoi(f); err == nil {
				kids = append(kids, n)
			}
		}
	}
	return kids
}

// ServerCPU splits ProcessCPU of a server whose children are its sandbox
// helpers: server is the server's own time and its helpers' (those it
// reaped included), commands the time of what the helpers ran, reaped by
// them or still running. A command's process counts from its fork, so the
// helper's last steps before exec (the uid switch, the exec) are the
// command's.
func ServerCPU(pid int) (server, commands time.Duration, err error) {
	self, reaped, err := statTimes(pid)
	if err != nil {
		return 0, 0, err
	}
	server = self + reaped
	for _, helper := range liveChildren(pid) {
		hself, hreaped, err := statTimes(helper)
		if err != nil {
			continue // ended since it was listed: in the server's reaped time
		}
		server += hself
		commands += hreaped
		for _, cmd := range liveChildren(helper) {
			if c, err := ProcessCPU(cmd); err == nil {
				commands += c
			}
		}
	}
	return server, commands, nil
}

// statCPU is the CPU time of pid and its reaped children, from
// /proc/PID/stat.
func statCPU(pid int) (time.Duration, error) {
	self, reaped, err := statTimes(pid)
	return self + reaped, err
}

// statTimes is the CPU time of pid itself and that of its reaped children,
// from /proc/PID/stat.
func statTimes(pid int) (self, reaped time.Duration, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	// The command name (field 2) may hold spaces: fields count from ")".
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: no ')' in %q", pid, s)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); utime, stime, cutime, cstime are 14-17.
	if len(f) < 15 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	var ticks [4]int64
	for j, field := range f[11:15] {
		n, err := strconv.ParseInt(field, 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		ticks[j] = n
	}
	tick := func(n int64) time.Duration { return time.Duration(n) * time.Second / clockTicks }
	return tick(ticks[0] + ticks[1]), tick(ticks[2] + ticks[3]), nil
}

// CPU is ProcessCPU of the server.
func (s *Server) CPU() (time.Duration, error) { return ProcessCPU(s.cmd.Process.Pid) }

// SplitCPU is ServerCPU of the server.
func (s *Server) SplitCPU() (server, commands time.Duration, err error) {
	return ServerCPU(s.cmd.Process.Pid)
}
