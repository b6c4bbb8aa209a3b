package qemu

import (
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"strings"

	"github.com/actiond/actiond/vmhost"
)

var _ vmhost.CPUReporter = (*Machine)(nil)

// CPUState reports each vCPU's program counter (and on x86 its privilege
// level and halted flag) from the monitor's "info registers -a", e.g.
// "cpu0 RIP=ffffffff812f67b8 CPL=0 HLT=0; cpu1 …". A vCPU that stays at one
// kernel address while not halted is looping there; the address is a
// symbol in the guest kernel's System.map (no KASLR: the kernel is booted
// directly, without its decompressor).
func (m *Machine) CPUState(ctx context.Context) (string, error) {
	m.mu.Lock()
	q := m.qmp
	m.mu.Unlock()
	if q == nil {
		return "", vmhost.ErrNotStarted
	}
	raw, err := q.execute(ctx, "human-monitor-command", map[string]string{"command-line": "info registers -a"})
	if err != nil {
		return "", err
	}
	var text string
	if err := json.Unmarshal(raw, &text); err != nil {
		return "", fmt.Errorf("info registers: %w", err)
	}
	return summarizeRegisters(text), nil
}

var (
	cpuHeader = regexp.MustCompile(`^CPU#(\d+)`)
	// x86: RIP=… CPL=… HLT=…; arm64: PC=….
	cpuField = regexp.MustCompile(`\b(RIP|PC|CPL|HLT)=([0-9a-fA-F]+)`)
)

// summarizeRegisters reduces "info registers -a" to one line per vCPU.
func summarizeRegisters(text string) string {
	var cpus []string
	var cur []string
	flush := func() {
		if cur != nil {
			cpus = append(cpus, strings.Join(cur, " "))
		}
	}
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if h := cpuHeader.FindStringSubmatch(line); h != nil {
			flush()
			cur = []string{"cpu" + h[1]}
			continue
		}
		if cur == nil {
			continue
		}
		for _, f := range cpuField.FindAllStringSubmatch(line, -1) {
			cur = append(cur, f[1]+"="+f[2])
		}
	}
	flush()
	return strings.Join(cpus, "; ")
}
