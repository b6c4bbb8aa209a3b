package actiond_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// External programs a fresh Debian machine has without `make deps`: the Go
// toolchain (needed to run the tests at all), Essential and required
// packages (dpkg, apt, coreutils, util-linux's mount), and binaries the
// code or the tests build or re-execute themselves.
var preinstalled = map[string]bool{
	"go": true, "sh": true, "true": true, "umount": true, "find": true,
	"dpkg": true, "dpkg-deb": true, "apt-get": true, "apt-cache": true,
	"exe": true, // /proc/self/exe
}

// indirect lists, per file, the programs run through exec calls whose
// program is not a string literal (a variable, a flag, a helper's
// argument). A new such call site makes TestMakefileInstallsEveryProgram
// fail until it is listed here, so no program escapes the check.
var indirect = map[string][]string{
	"observe/cdp_test.go":                   {"chromium"}, // chromium, else chromium-browser or google-chrome
	"tools/vmpayload/qemu_test.go":          {"qemu-system-x86_64", "qemu-system-aarch64"},
	"tools/vmpayload/boot_test.go":          {"qemu-system-x86_64", "qemu-system-aarch64"},
	"vmhost/qemu/probe.go":                  {"qemu-system-x86_64", "qemu-system-aarch64"},
	"vmhost/qemu/qemu.go":                   {"qemu-system-x86_64", "qemu-system-aarch64"},
	"vmhost/qemu/vm_test.go":                {"qemu-system-x86_64"},
	"e2e/vm_harness_test.go":                {"qemu-system-x86_64", "qemu-system-aarch64", "exe"},
	"e2e/harness_test.go":                   {"bazel", "gcc", "go", "exe"}, // Bazel builds cc rules with the host gcc
	"e2e/vm_user_test.go":                   {"setpriv", "go", "exe"},      // setpriv runs the actiond binary as the user
	"guest/vm_test.go":                      {"qemu-system-x86_64", "qemu-system-aarch64"},
	"vmhost/vmpayload/initramfs.go":         {"go"},
	"vmhost/vz/entitle.go":                  {}, // codesign, on macOS only (Xcode command line tools)
	"guest/disks.go":                        {}, // mkfs.ext4 inside the guest's initramfs, not on the host
	"sandbox/helpers_test.go":               {"go"},
	"sandbox/security_test.go":              {"exe"}, // the probe binary the tests build
	"fs/fs_test.go":                         {"exe"}, // files of the test's own mount, and the test binary
	"fs/prefill_test.go":                    {"exe"}, // the test binary, mapping files of the test's mount
	"actiond_test.go":                       {"exe"}, // the actiond binary the test builds
	"propagation_test.go":                   {"exe"}, // the actiond binary the test builds
	"internal/testutil/sharedroot_linux.go": {"unshare"},
	"localusers_linux_test.go":              {"setpriv"},
	"e2e/observe_test.go":                   {"exe"},
	"e2e/remote_exec_test.go":               {"exe"},
	"internal/payload/standalone_test.go":   {"go", "exe"},
	"bench/execlatency/main.go":             {"bazel", "exe"},
	"bench/internal/benchutil/benchutil.go": {"exe"},
}

// TestMakefileInstallsEveryProgram: every external program the code and
// the tests run is installed by `make test` (the Makefile's DEB_DEPS), so
// the suite passes on a fresh Debian machine, not only on one where
// someone installed the missing piece by hand.
func TestMakefileInstallsEveryProgram(t *testing.T) {
	mk, err := os.ReadFile("Makefile")
	if err != nil {
		t.Fatal(err)
	}
	deps := debDeps(t, string(mk))
	used := map[string][]string{} // program → files running it
	unlisted := map[string]bool{}
	nonLiteral := map[string]bool{}
	err = filepath.WalkDir(".", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if n := d.Name(); p != "." && (strings.HasPrefix(n, ".") || strings.HasPrefix(n, "bazel-")) {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(p, ".go") {
			return nil
		}
		for _, c := range execCalls(t, p) {
			if c.literal {
				used[c.program] = append(used[c.program], p)
			} else {
				nonLiteral[filepath.ToSlash(p)] = true
				if _, ok := indirect[filepath.ToSlash(p)]; !ok {
					unlisted[filepath.ToSlash(p)] = true
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for p, progs := range indirect {
		if !nonLiteral[p] {
			t.Errorf("makedeps_test.go's indirect table lists %s, which no longer runs a program by a non-literal name: remove it", p)
		}
		for _, prog := range progs {
			used[prog] = append(used[prog], p)
		}
	}
	for p := range unlisted {
		t.Errorf("%s runs a program named by a non-literal; list what it runs in makedeps_test.go's indirect table", p)
	}
	// The Makefile's own recipes.
	for _, prog := range []string{"debootstrap", "mksquashfs"} { // tools/mkruntimes.sh
		used[prog] = append(used[prog], "tools/mkruntimes.sh")
	}
	var names []string
	for prog := range used {
		names = append(names, prog)
	}
	slices.Sort(names)
	for _, prog := range names {
		if preinstalled[prog] || deps[prog] {
			continue
		}
		files := slices.Compact(slices.Sorted(slices.Values(used[prog])))
		t.Errorf("%s (run by %s) is not in the Makefile's DEB_DEPS: add \"%s:<debian package>\" so `make test` installs it", prog, strings.Join(files, ", "), prog)
	}
	for _, must := range []string{"chromium", "bazel", "qemu-system-x86_64", "mksquashfs"} {
		if _, ok := used[must]; !ok {
			t.Errorf("the scan found no use of %s: it no longer sees what it should", must)
		}
	}
}

// debDeps returns the commands of the Makefile's DEB_DEPS ("command:package").
func debDeps(t *testing.T, mk string) map[string]bool {
	t.Helper()
	mk = strings.ReplaceAll(mk, "\\\n", " ")
	m := regexp.MustCompile(`(?m)^DEB_DEPS\s*:?=(.*)$`).FindStringSubmatch(mk)
	if m == nil {
		t.Fatal("Makefile has no DEB_DEPS")
	}
	deps := map[string]bool{}
	for _, f := range strings.Fields(m[1]) {
		cmd, pkg, ok := strings.Cut(f, ":")
		if !ok || cmd == "" || pkg == "" {
			t.Fatalf("DEB_DEPS entry %q is not command:package", f)
		}
		deps[cmd] = true
	}
	return deps
}

type execCall struct {
	program string // base name, when literal
	literal bool
}

// execCalls finds exec.Command, exec.CommandContext and exec.LookPath calls
// in a Go file.
func execCalls(t *testing.T, file string) []execCall {
	t.Helper()
	f, err := parser.ParseFile(token.NewFileSet(), file, nil, parser.SkipObjectResolution)
	if err != nil {
		t.Fatal(err)
	}
	var calls []execCall
	ast.Inspect(f, func(n ast.Node) bool {
		call, ok := n.(*ast.CallExpr)
		if !ok {
			return true
		}
		sel, ok := call.Fun.(*ast.SelectorExpr)
		if !ok {
			return true
		}
		if x, ok := sel.X.(*ast.Ident); !ok || x.Name != "exec" {
			return true
		}
		arg := 0
		switch sel.Sel.Name {
		case "Command", "LookPath":
		case "CommandContext":
			arg = 1
		default:
			return true
		}
		if len(call.Args) <= arg {
			return true
		}
		if lit, ok := call.Args[arg].(*ast.BasicLit); ok && lit.Kind == token.STRING {
			s, _ := strconv.Unquote(lit.Value)
			calls = append(calls, execCall{program: path.Base(s), literal: true})
		} else {
			calls = append(calls, execCall{})
		}
		return true
	})
	return calls
}
