package vmpayload

import (
	"bytes"
	"debug/elf"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// guestModules are the modules the guest needs, in load order (each is
// loaded after its dependencies): virtio transports (mmio for QEMU
// microvm, pci for Virtualization.framework and QEMU virt), disks, the
// console and serial ports, entropy, vsock, the CAS (ext4) and runtime
// (squashfs) file systems, what the sandbox and actiondfs may use
// (overlay, fuse, loop), and the power button (evdev with ACPI's button on
// x86, gpio-keys on arm64). crc32c_generic comes before ext4: ext4 and
// jbd2 find their checksum through the crypto API, not a symbol
// dependency, and the accelerated variant may have no hardware (TCG).
var guestModules = map[string][]string{
	"common": {
		"virtio_mmio", "virtio_pci", "virtio_console", "virtio_rng", "virtio_blk",
		"vsock", "vmw_vsock_virtio_transport",
		"crc32c_generic", "ext4", "squashfs", "overlay", "fuse", "loop",
		"evdev",
	},
	"amd64": {"button"},
	"arm64": {"gpio_keys", "gpio_pl061"},
}

// modInfo is what a module's .modinfo section says.
type modInfo struct {
	Path    string   // relative to lib/modules/<release>
	Name    string   // kernel module name
	Depends []string // names
	PreDeps []string // softdep pre: names or aliases
	Aliases []string
}

// readModInfo parses the .modinfo section of a .ko file.
func readModInfo(modDir, rel string) (*modInfo, error) {
	f, err := elf.Open(filepath.Join(modDir, rel))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("%s: no .modinfo section", rel)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", rel, err)
	}
	mi := &modInfo{Path: rel, Name: modName(rel)}
	for _, kv := range bytes.Split(data, []byte{0}) {
		k, v, ok := strings.Cut(string(kv), "=")
		if !ok {
			continue
		}
		switch k {
		case "name":
			mi.Name = v
		case "depends":
			for _, d := range strings.Split(v, ",") {
				if d != "" {
					mi.Depends = append(mi.Depends, d)
				}
			}
		case "softdep":
			// "pre: a b post: c"
			section := ""
			for _, w := range strings.Fields(v) {
				if strings.HasSuffix(w, ":") {
					section = w
					continue
				}
				if section == "pre:" {
					mi.PreDeps = append(mi.PreDeps, w)
				}
			}
		case "alias":
			mi.Aliases = append(mi.Aliases, v)
		}
	}
	return mi, nil
}

func modName(path string) string {
	base := filepath.Base(path)
	for _, ext := range []string{".xz", ".zst", ".gz"} {
		base = strings.TrimSuffix(base, ext)
	}
	return strings.ReplaceAll(strings.TrimSuffix(base, ".ko"), "-", "_")
}

// moduleSet is the selected modules of a kernel.
type moduleSet struct {
	Release string
	Dir     string     // extracted lib/modules/<release>
	Mods    []*modInfo // selected, sorted by path
	Load    []string   // modules.actiond: names in load order
	Builtin []string   // wanted but built into the kernel
	Missing []string   // wanted but neither module nor built in
}

// selectModules resolves the wanted modules with their dependencies and
// pre-softdeps from the .ko files under dir (lib/modules/<release>) (no depmod needed: Debian
// packages ship no modules.dep, it is made at install time).
func selectModules(dir, release string, wanted []string) (*moduleSet, error) {
	byName := map[string]string{}
	err := filepath.WalkDir(filepath.Join(dir, "kernel"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.Contains(d.Name(), ".ko") {
			rel, _ := filepath.Rel(dir, p)
			byName[modName(rel)] = rel
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("index modules: %w", err)
	}
	builtin := map[string]bool{}
	if data, err := os.ReadFile(filepath.Join(dir, "modules.builtin")); err == nil {
		for _, l := range strings.Fields(string(data)) {
			builtin[modName(l)] = true
		}
	}
	var aliases map[string][]string // alias → names, built on first need
	aliasIndex := func() (map[string][]string, error) {
		if aliases != nil {
			return aliases, nil
		}
		aliases = map[string][]string{}
		names := make([]string, 0, len(byName))
		for n := range byName {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			mi, err := readModInfo(dir, byName[n])
			if err != nil {
				return nil, err
			}
			for _, a := range mi.Aliases {
				aliases[a] = append(aliases[a], mi.Name)
			}
		}
		return aliases, nil
	}

	ms := &moduleSet{Release: release, Dir: dir}
	infos := map[string]*modInfo{}
	var load []string
	loaded := map[string]bool{}
	var add func(name string, required bool) error
	add = func(name string, required bool) error {
		name = modName(name)
		if _, ok := infos[name]; ok {
			return nil
		}
		rel, ok := byName[name]
		if !ok {
			switch {
			case builtin[name]:
				ms.Builtin = append(ms.Builtin, name)
			case required:
				return fmt.Errorf("module %s is needed but not in the kernel package", name)
			default:
				ms.Missing = append(ms.Missing, name)
			}
			return nil
		}
		mi, err := readModInfo(dir, rel)
		if err != nil {
			return err
		}
		infos[name] = mi
		for _, pre := range mi.PreDeps {
			targets := []string{pre}
			if provider := providedBy(infos, pre); provider != "" {
				targets = []string{provider} // already selected
			} else if _, ok := byName[modName(pre)]; !ok && !builtin[modName(pre)] {
				idx, err := aliasIndex()
				if err != nil {
					return err
				}
				targets = idx[pre]
			}
			for _, t := range targets {
				if err := add(t, false); err != nil {
					return err
				}
				if !loaded[modName(t)] && infos[modName(t)] != nil {
					loaded[modName(t)] = true
					load = append(load, modName(t))
				}
			}
		}
		for _, d := range mi.Depends {
			if err := add(d, true); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
		}
		return nil
	}
	for _, w := range wanted {
		if err := add(w, false); err != nil {
			return nil, err
		}
		if n := modName(w); infos[n] != nil && !loaded[n] {
			loaded[n] = true
			load = append(load, n)
		}
	}
	for _, mi := range infos {
		ms.Mods = append(ms.Mods, mi)
	}
	sort.Slice(ms.Mods, func(i, j int) bool { return ms.Mods[i].Path < ms.Mods[j].Path })
	ms.Load = load
	return ms, nil
}

// modulesDep renders modules.dep for the selected modules: each module's
// full dependency closure, nearest first, as depmod writes it.
func (ms *moduleSet) modulesDep() string {
	byName := map[string]*modInfo{}
	for _, mi := range ms.Mods {
		byName[mi.Name] = mi
	}
	var b strings.Builder
	for _, mi := range ms.Mods {
		var closure []string
		seen := map[string]bool{}
		var walk func(n string)
		walk = func(n string) {
			for _, d := range byName[n].Depends {
				if seen[d] || byName[d] == nil {
					continue
				}
				seen[d] = true
				closure = append(closure, byName[d].Path)
				walk(d)
			}
		}
		walk(mi.Name)
		fmt.Fprintf(&b, "%s:", mi.Path)
		for _, c := range closure {
			fmt.Fprintf(&b, " %s", c)
		}
		b.WriteString("\n")
	}
	return b.String()
}

// loadList renders modules.actiond.
func (ms *moduleSet) loadList() string {
	return "# Modules the actiond guest loads, in order (dependencies from modules.dep first).\n" +
		strings.Join(ms.Load, "\n") + "\n"
}

// providedBy returns the selected module named or aliased so, if any.
func providedBy(infos map[string]*modInfo, nameOrAlias string) string {
	if mi := infos[modName(nameOrAlias)]; mi != nil {
		return mi.Name
	}
	names := make([]string, 0, len(infos))
	for n := range infos {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		mi := infos[n]
		for _, a := range mi.Aliases {
			if a == nameOrAlias {
				return mi.Name
			}
		}
	}
	return ""
}
