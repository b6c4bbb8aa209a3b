package sandboxinit

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// template is a kept helper's prebuilt base of its actions' roots (see
// buildBase), mounted at the spec's RootDir in the helper's own mount
// namespace. The namespace each action unshares starts as a copy of the
// helper's, template included, so per action only what is the action's
// own is mounted (finishRoot): copying a dozen mounts costs the kernel far
// less than making them, a fifth of a helper's CPU per trivial action.
//
// Nothing in it is writable by an action: its tmpfs root and /dev are
// read-only mounts, whose flags an action (no capabilities) cannot change,
// and /tmp, /dev/shm and the execroot are mounted fresh per action.
//
// It is rebuilt whenever what it was made from changes (see templateKey): another
// runtime, a rebuilt runtime tree, or the host files the host runtime
// binds into /etc (ldconfig replaces /etc/ld.so.cache, a bound copy would
// go stale).
type template struct {
	key  string // what the template at root was built from; "" for none
	root string
	// etcNames caches the names of the generated /etc files by
	// directory: the server writes each directory once and never
	// changes it.
	etcNames map[string][]string
}

// ensure makes the template at spec.RootDir match spec and returns the
// names of the generated /etc files. It removes the runtime tree from
// files: a template in place leaves it unused (it is closed), a new one
// consumes it.
func (t *template) ensure(spec *Spec, files map[string]int) ([]string, error) {
	runtimeFD := -1
	if fd, ok := files[FileRuntime]; ok {
		runtimeFD = fd
		delete(files, FileRuntime)
	}
	closeRuntime := func() {
		if runtimeFD >= 0 {
			unix.Close(runtimeFD)
		}
	}
	generated, ok := t.etcNames[spec.EtcDir]
	if !ok {
		var err error
		if generated, err = generatedEtcNames(spec.EtcDir); err != nil {
			closeRuntime()
			return nil, err
		}
		if t.etcNames == nil {
			t.etcNames = make(map[string][]string)
		}
		t.etcNames[spec.EtcDir] = generated
	}
	key, err := templateKey(spec, runtimeFD, generated)
	if err != nil {
		closeRuntime()
		return nil, err
	}
	if key == t.key {
		closeRuntime()
		return generated, nil
	}
	if t.key != "" {
		if err := unix.Unmount(t.root, unix.MNT_DETACH); err != nil {
			closeRuntime()
			return nil, fmt.Errorf("removing the old root template at %s: %w", t.root, err)
		}
		t.key = ""
	}
	if err := buildBase(spec, runtimeFD); err != nil {
		return nil, fmt.Errorf("root template: %w", err)
	}
	t.key, t.root = key, spec.RootDir
	return generated, nil
}

// templateKey describes what buildBase makes of spec, whose generated
// /etc files are named generated: equal keys, equal bases.
func templateKey(spec *Spec, runtimeFD int, generated []string) (string, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "root=%s\nexecroot=%s\nruntime=%s %s %t\n", spec.RootDir, spec.ExecRootMount, spec.Runtime.Name, spec.Runtime.Root, spec.Runtime.Host)
	if runtimeFD >= 0 {
		// A rebuilt runtime is another tree (another file system or
		// directory), however it is named.
		var st unix.Stat_t
		if err := unix.Fstat(runtimeFD, &st); err != nil {
			return "", fmt.Errorf("runtime %q: %w", spec.Runtime.Name, err)
		}
		fmt.Fprintf(&b, "tree=%d:%d\n", st.Dev, st.Ino)
	}
	fmt.Fprintf(&b, "generated=%s\n", strings.Join(generated, ","))
	if spec.Runtime.Host {
		for _, name := range hostEtcEntries {
			b.WriteString(name + "=" + fileIdentity(join("/etc", name)) + "\n")
		}
	}
	return b.String(), nil
}

// fileIdentity tells a file apart from any that replaces it at path.
func fileIdentity(path string) string {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		if os.IsNotExist(err) {
			return "none"
		}
		return "error " + err.Error()
	}
	return strconv.FormatUint(st.Dev, 10) + ":" + strconv.FormatUint(st.Ino, 10) + ":" +
		strconv.FormatInt(st.Ctim.Nano(), 10)
}
