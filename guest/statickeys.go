package guest

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/actiond/actiond/internal/cgroupv2"
)

// staticKeysCgroup is the empty cgroup that keeps the kernel's cgroup
// static keys on (see pinStaticKeys). Its name cannot be taken for a
// sandbox helper's cgroup ("actiond-<pid>-<seq>").
const staticKeysCgroup = "static-keys"

// staticKeysQuota is the pinning cgroup's cpu.max: a quota (any finite one
// counts), large enough never to matter for a cgroup without processes.
const staticKeysQuota = "100000000 100000"

// pinStaticKeys makes the kernel's cgroup static keys flip at boot, while
// init runs alone, and never again while the server works: it enables the
// memory, cpu and pids controllers for the children of cgroup2 root and
// makes one empty child with a memory controller and a cpu.max quota.
//
// Why: flipping a static key rewrites the kernel's text at every site that
// tests it (on x86, text_poke_bp: an int3 first, then the new
// instruction). Under QEMU's multi-threaded TCG (7.2 here; serve-vm uses
// TCG where there is no KVM), a vCPU running such a site at that moment
// can keep executing a stale translation of the int3: the handler finds
// the new instruction in memory, rewinds to retry it, and meets the int3
// again, for ever. Caught with QEMU's monitor on a first boot that never
// became ready: both vCPUs cycling through exc_int3 and
// kprobe_int3_handler at __alloc_pages' memcg_kmem_enabled() branch, just
// after the sandbox had made its first cgroups while the runtimes were
// being extracted (CI saw the same silence, and soft lockups, three times).
// Actions under a CPU quota beside a busy one reproduce it at will: within
// 50 of them both vCPUs loop at update_curr's cfs_bandwidth_used() branch
// (TestVMCgroupLimits fails so without this cgroup).
//
// The keys the guest's own work flips: the first memory cgroup turns
// memcg_kmem_enabled_key on and counts memcg_sockets_enabled_key up (the
// last one freed counts it down to off again); the first cpu.max quota
// counts __cfs_bandwidth_used up (an action's CPU limit, lifted when it
// ends, counts it down again). With this cgroup in place each stays on.
// Keys that actions' own system calls may flip are not covered.
func pinStaticKeys(root string) (map[string]any, error) {
	avail := strings.Fields(readSysString(filepath.Join(root, "cgroup.controllers")))
	var errs []error
	var want []string
	for _, c := range []string{"memory", "cpu", "pids"} {
		if slices.Contains(avail, c) {
			want = append(want, c)
		}
	}
	if err := cgroupv2.EnableControllers(root, want); err != nil {
		errs = append(errs, fmt.Errorf("enable the controllers %v: %w", want, err))
	}
	dir := filepath.Join(root, staticKeysCgroup)
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, errors.Join(append(errs, err)...)
	}
	controllers := strings.Fields(readSysString(filepath.Join(dir, "cgroup.controllers")))
	if slices.Contains(controllers, "cpu") {
		if err := os.WriteFile(filepath.Join(dir, "cpu.max"), []byte(staticKeysQuota), 0); err != nil {
			errs = append(errs, fmt.Errorf("set a cpu.max quota: %w", err))
		}
	}
	info := map[string]any{
		"cgroup":      dir,
		"controllers": strings.Join(controllers, " "),
		"cpu_max":     readSysString(filepath.Join(dir, "cpu.max")),
	}
	return info, errors.Join(errs...)
}
