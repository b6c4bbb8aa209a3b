package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/actiond/actiond/internal/testutil"
)

// glibcRuntimes are the runtimes that `make runtimes` builds, each with the
// glibc version that `ldd --version` must report inside it.
var glibcRuntimes = map[string]string{
	"glibc2.31": "2.31",
	"glibc2.36": "2.36",
	"glibc2.41": "2.41",
}

// shellOutputs are the outputs of //:agg_shell plus //cc:hello_out (paths
// relative to bazel-bin): the smaller target set built with the input root
// strategies other than the default.
var shellOutputs = []string{
	"big.bin", "big_digest.txt", "joined.txt", "numbered.txt", "rot13.txt", "seed.txt", "upper.txt",
	"multi/a.txt", "multi/nested/b.txt", "multi/nested/deeper/c.txt", "multi/empty.txt",
	"many/many.txt", "srcdir/srcdir_digest.txt",
	"tree/tree", "tree/tree_listing.txt", "tree/tree_manifest.txt", "tree/tree_upper",
	"cc/hello_out.txt",
}

// RuntimeDir is where the server looks for runtime images by default:
// $ACTIOND_RUNTIME_DIR or /var/cache/actiond/runtimes.
func RuntimeDir() string {
	if d := os.Getenv("ACTIOND_RUNTIME_DIR"); d != "" {
		return d
	}
	return "/var/cache/actiond/runtimes"
}

// RequireRuntimes skips (fails under CI) unless every glibc runtime image
// is in RuntimeDir, and returns RuntimeDir.
func RequireRuntimes(t testing.TB) string {
	t.Helper()
	dir := RuntimeDir()
	var missing []string
	for rt := range glibcRuntimes {
		if _, err := os.Stat(filepath.Join(dir, rt+".squashfs")); err != nil {
			missing = append(missing, rt)
		}
	}
	slices.Sort(missing)
	testutil.Require(t, len(missing) == 0,
		fmt.Sprintf("runtime images %s missing in %s: run make runtimes", strings.Join(missing, ", "), dir))
	return dir
}

// InputRootStrategies reads `actiond serve -h`: the default of
// --input-root (e.g. "auto") and the explicit strategies it offers among
// fuse, hardlink and copy (hardlink and copy are required).
func InputRootStrategies(t testing.TB) (def string, strategies []string) {
	t.Helper()
	out, err := exec.Command(actiondBinary(t), "serve", "-h").CombinedOutput()
	if err != nil {
		t.Fatalf("actiond serve -h: %v (asking for the usage must exit 0)\n%s", err, out)
	}
	help := string(out)
	i := strings.Index(help, "-input-root")
	if i < 0 {
		t.Fatalf("actiond serve -h does not list -input-root:\n%s", help)
	}
	usage := help[i:]
	if j := strings.Index(usage, "\n  -"); j >= 0 {
		usage = usage[:j]
	}
	for _, s := range []string{"fuse", "hardlink", "copy"} {
		if strings.Contains(usage, s) {
			strategies = append(strategies, s)
		}
	}
	if !slices.Contains(strategies, "hardlink") || !slices.Contains(strategies, "copy") {
		t.Fatalf("actiond serve -h: -input-root does not offer hardlink and copy: %s", usage)
	}
	m := regexp.MustCompile(`\(default "([^"]*)"\)`).FindStringSubmatch(usage)
	if m == nil {
		t.Fatalf("actiond serve -h: no default for -input-root: %s", usage)
	}
	return m[1], strategies
}

var inputRootLogRE = regexp.MustCompile(`input_root=(\S+)`)

// remoteExecFlags are the Bazel flags that send every action to addr and
// never fall back to local execution, with a remote call timeout of
// timeout (whole seconds).
func remoteExecFlags(addr string, timeout time.Duration) []string {
	return []string{
		"--remote_executor=grpc://" + addr,
		"--spawn_strategy=remote",
		"--remote_local_fallback=false",
		fmt.Sprintf("--remote_timeout=%d", int(timeout.Seconds())),
	}
}

// remoteTimeout is the host tests' remote call timeout.
const remoteTimeout = 300 * time.Second

// requireAllRemote fails unless every non-internal process of the build
// ran remotely (and there was at least one).
func requireAllRemote(t *testing.T, what, out string) map[string]int {
	t.Helper()
	p := ParseProcesses(out)
	if p == nil {
		t.Fatalf("%s: no process summary in the output:\n%s", what, out)
	}
	if p["remote"] == 0 || p["remote"] != p["total"]-p["internal"] {
		t.Fatalf("%s: want every non-internal process to run remotely, got %v (%s)", what, p, strings.TrimSpace(lines(out, " processes")))
	}
	t.Logf("%s: %v", what, p)
	return p
}

// checkRuntimeOutputs checks that //runtimes ran each action in its own
// runtime, one of runtimes (name to glibc version):
// bazel-bin/runtimes/<rt>.txt is the first line of `ldd --version` there,
// e.g. "ldd (Debian GLIBC 2.31-13+deb11u11) 2.31".
func checkRuntimeOutputs(t *testing.T, ws string, runtimes map[string]string) {
	t.Helper()
	for rt, version := range runtimes {
		b, err := os.ReadFile(filepath.Join(ws, "bazel-bin", "runtimes", rt+".txt"))
		if err != nil {
			t.Errorf("runtime %s: %v", rt, err)
			continue
		}
		line := strings.TrimSpace(string(b))
		re := regexp.MustCompile(`^ldd \(.*GLIBC ` + regexp.QuoteMeta(version) + `[-)].* ` + regexp.QuoteMeta(version) + `$`)
		if !re.MatchString(line) {
			t.Errorf("runtime %s: ldd --version says %q, want glibc %s", rt, line, version)
		}
	}
}

// withoutRuntimes drops the //runtimes outputs, which a local build does
// not have.
func withoutRuntimes(h map[string]string) map[string]string {
	res := map[string]string{}
	for k, v := range h {
		if !strings.HasPrefix(k, "runtimes/") {
			res[k] = v
		}
	}
	return res
}

// TestBazelRemoteExec: Bazel 4.2.3 with --remote_executor pointed at
// `actiond serve`, once per input root strategy (subtest "default" with the
// server's default --input-root, then each other strategy that `actiond
// serve -h` offers). A local build (--spawn_strategy=local) of //:agg is
// the reference.
//
// With the default strategy, the full matrix: //:agg (genrules,
// cc_binary/cc_test with the host runtime's gcc, a tree artifact consumed by
// three actions, source-directory inputs, a 2,049-input action, output
// directories) plus //runtimes (one action per glibc runtime): every action
// runs remotely, outputs are byte-identical to the local build, each runtime
// reports its glibc version; `bazel test //cc:greet_test` passes remotely;
// after `bazel clean` everything is a remote cache hit with identical
// outputs; and with --remote_download_minimal (and --noremote_accept_cached,
// so that everything executes again) the build and the test pass remotely.
//
// With the other strategies, a smaller set: //:agg_shell, //cc:hello_out and
// //runtimes, executed remotely, identical to the local build.
func TestBazelRemoteExec(t *testing.T) {
	RequireBazel(t)
	testutil.RequireRoot(t)
	runtimeDir := RequireRuntimes(t)
	def, strategies := InputRootStrategies(t)
	t.Logf("input root strategies: %v (default %q)", strategies, def)

	ws := CopyWorkspace(t, WorkspaceDir(t))
	our := t.TempDir()
	bazel := func(t *testing.T, args ...string) string {
		t.Helper()
		return MustBazel(t, ws, our, args...)
	}

	// The reference: a local, unsandboxed build.
	out := bazel(t, "build", "--spawn_strategy=local", "//:agg")
	if p := ParseProcesses(out); p == nil || p["local"] == 0 {
		t.Fatalf("local build: want local processes, got %v (%s)", p, strings.TrimSpace(lines(out, " processes")))
	}
	local := OutputsHash(t, ws)
	for _, f := range topLevel {
		if _, ok := local[f]; !ok && !strings.HasPrefix(f, "tree/tree") {
			t.Fatalf("local build: %s missing from bazel-bin", f)
		}
	}

	// The server's default first (the full matrix), then every other
	// strategy explicitly.
	resolved := def // what the default resolves to ("auto" picks one)
	cases := []string{"default"}
	for _, s := range strategies {
		if s != def {
			cases = append(cases, s)
		}
	}
	for _, strategy := range cases {
		full := strategy == "default"
		if !full && strategy == resolved {
			t.Logf("%s: covered by the default run", strategy)
			continue
		}
		t.Run(strategy, func(t *testing.T) {
			if strategy == "fuse" && def == "auto" && resolved != "fuse" {
				testutil.Require(t, false, "actiondfs (FUSE) is unavailable here: --input-root=auto chose "+resolved)
			}
			args := []string{"--runtime-dir", runtimeDir}
			if !full {
				args = append(args, "--input-root", strategy)
			}
			addr, serverLog := StartServerWithLog(t, args...)
			m := inputRootLogRE.FindStringSubmatch(serverLog())
			if m == nil {
				t.Fatalf("server log does not name its input root:\n%s", serverLog())
			}
			if full {
				resolved = m[1]
				t.Logf("default input root %q is %s", def, resolved)
			} else if m[1] != strategy {
				t.Fatalf("server uses input root %s, want %s", m[1], strategy)
			}
			remote := remoteExecFlags(addr, remoteTimeout)
			build := func(extra ...string) string {
				t.Helper()
				args := append(append([]string{"build"}, remote...), extra...)
				return bazel(t, args...)
			}
			bazel(t, "clean")

			if !full {
				out := build("//:agg_shell", "//cc:hello_out", "//runtimes")
				requireAllRemote(t, "remote build", out)
				got := withoutRuntimes(OutputsHash(t, ws))
				requireSameOutputs(t, "remote build (smaller set)", subset(local, shellOutputs), subset(got, shellOutputs))
				requireSameOutputs(t, "remote build (all outputs it made)", subsetKeys(local, got), got)
				checkRuntimeOutputs(t, ws, glibcRuntimes)
				return
			}

			// 1. Cold: everything executes remotely.
			out := build("//:agg", "//runtimes")
			requireAllRemote(t, "remote build", out)
			requireSameOutputs(t, "remote build", local, withoutRuntimes(OutputsHash(t, ws)))
			checkRuntimeOutputs(t, ws, glibcRuntimes)

			// 2. bazel test, remotely.
			out = bazel(t, append(append([]string{"test"}, remote...), "//cc:greet_test")...)
			requireAllRemote(t, "remote test", out)
			requirePassed(t, "remote test", out, "//cc:greet_test")

			// 3. After bazel clean: all remote cache hits, same bytes.
			bazel(t, "clean")
			out = build("//:agg", "//runtimes")
			requireAllCacheHits(t, "rebuild after bazel clean", out)
			requireSameOutputs(t, "rebuild after bazel clean", local, withoutRuntimes(OutputsHash(t, ws)))
			checkRuntimeOutputs(t, ws, glibcRuntimes)

			// 4. --remote_download_minimal, executing everything again
			// (--noremote_accept_cached sets skip_cache_lookup): the
			// build and the test pass with outputs left remote.
			bazel(t, "clean")
			minimal := []string{"--remote_download_minimal", "--noremote_accept_cached"}
			out = build(append(minimal, "//:agg", "//runtimes")...)
			requireAllRemote(t, "remote build, --remote_download_minimal", out)
			if _, err := os.Stat(filepath.Join(ws, "bazel-bin", "big.bin")); err == nil {
				t.Errorf("--remote_download_minimal: bazel-bin/big.bin was downloaded")
			}
			out = bazel(t, append(append(append([]string{"test"}, remote...), minimal...), "//cc:greet_test")...)
			requireAllRemote(t, "remote test, --remote_download_minimal", out)
			requirePassed(t, "remote test, --remote_download_minimal", out, "//cc:greet_test")
		})
	}
}

// subsetKeys returns the entries of hashes whose keys are in keys.
func subsetKeys(hashes, keys map[string]string) map[string]string {
	res := map[string]string{}
	for k := range keys {
		if v, ok := hashes[k]; ok {
			res[k] = v
		}
	}
	return res
}

func requirePassed(t *testing.T, what, out, target string) {
	t.Helper()
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(target) + `\s+PASSED`)
	if !re.MatchString(out) {
		t.Fatalf("%s: no %q PASSED line:\n%s", what, target, out)
	}
}

// escapeAttempts are the targets of //escape:attempts and the diagnostic
// each must fail with when executed by actiond.
var escapeAttempts = map[string]string{
	"read_shadow":    `cat: /etc/shadow: (No such file or directory|Permission denied)`,
	"append_input":   `escape/victim.txt: (Permission denied|Read-only file system)`,
	"chmod_input":    `chmod: changing permissions of 'escape/victim.txt': (Operation not permitted|Read-only file system)`,
	"replace_input":  `rm: cannot remove 'escape/victim.txt': (Permission denied|Read-only file system)`,
	"write_system":   `touch: cannot touch '/usr/bin/pwned': (Read-only file system|Permission denied)`,
	"connect_server": `/dev/tcp/127\.0\.0\.1/[0-9]+: (Connection refused|Network is unreachable|Cannot assign requested address)`,
	"proc_root":      `cat: /proc/1/root/etc/shadow: (Permission denied|No such file or directory)`,
	"become_root":    `uid is [1-9][0-9]*, not root`,
	// Refused by the server when collecting outputs (INVALID_ARGUMENT).
	"output_symlink_abs": `output symlink "[^"]*/output_symlink_abs\.txt".*(absolute|outside)`,
	"output_symlink_rel": `output symlink "[^"]*/output_symlink_rel\.txt".*outside`,
}

// TestBazelRemoteExecSandbox: escape attempts made through Bazel (reading
// the host's /etc/shadow, writing to or replacing an input, writing to the
// runtime, connecting to the actiond server, reaching the host root through
// /proc/1/root, running as root, output symlinks to host files) all fail when executed remotely, each
// with the expected diagnostic, and the attacked input still has its
// original content afterwards (hardlinked inputs share bytes with the CAS);
// with the server's default input root and each other one it offers but
// copy.
func TestBazelRemoteExecSandbox(t *testing.T) {
	RequireBazel(t)
	testutil.RequireRoot(t)
	def, strategies := InputRootStrategies(t)
	ws := CopyWorkspace(t, WorkspaceDir(t))
	our := t.TempDir()
	want, err := os.ReadFile(filepath.Join(ws, "escape", "victim.txt"))
	if err != nil {
		t.Fatal(err)
	}
	// Copies protect nothing that hardlinks do not (and share no bytes with
	// the CAS): the default and every other strategy but copy.
	cases := []string{"default"}
	for _, s := range strategies {
		if s != def && s != "copy" {
			cases = append(cases, s)
		}
	}
	resolved := def
	for _, strategy := range cases {
		if strategy == resolved {
			t.Logf("%s: covered by the default run", strategy)
			continue
		}
		t.Run(strategy, func(t *testing.T) {
			if strategy == "fuse" && def == "auto" && resolved != "fuse" {
				testutil.Require(t, false, "actiondfs (FUSE) is unavailable here: --input-root=auto chose "+resolved)
			}
			var args []string
			if strategy != "default" {
				args = []string{"--input-root", strategy}
			}
			addr, serverLog := StartServerWithLog(t, args...)
			m := inputRootLogRE.FindStringSubmatch(serverLog())
			if m == nil {
				t.Fatalf("server log does not name its input root:\n%s", serverLog())
			}
			if strategy == "default" {
				resolved = m[1]
			}
			t.Logf("input root: %s", m[1])
			_, port, _ := strings.Cut(addr, ":")
			build := append(append([]string{"build"}, remoteExecFlags(addr, remoteTimeout)...), "--keep_going", "--define=ACTIOND_PORT="+port)
			MustBazel(t, ws, our, "clean")

			out, err := Bazel(t, ws, our, append(build, "//escape:attempts")...)
			if err == nil {
				t.Fatalf("bazel build //escape:attempts succeeded; every attempt must fail:\n%s", out)
			}
			for name, diag := range escapeAttempts {
				if !strings.Contains(out, "Executing genrule //escape:"+name+" failed") {
					t.Errorf("%s: no failure reported for it", name)
				}
				if !regexp.MustCompile(diag).MatchString(out) {
					t.Errorf("%s: no diagnostic matching %q", name, diag)
				}
				// A failed remote action's outputs are still downloaded: a
				// shell redirection may have created an empty one.
				if b, err := os.ReadFile(filepath.Join(ws, "bazel-bin", "escape", name+".txt")); err == nil && len(b) > 0 {
					t.Errorf("%s: produced its output: %q", name, b)
				}
			}
			if t.Failed() {
				t.Logf("bazel output:\n%s", out)
			}

			out = MustBazel(t, ws, our, append(build, "//escape:victim_copy")...)
			requireAllRemote(t, "victim_copy", out)
			got, err := os.ReadFile(filepath.Join(ws, "bazel-bin", "escape", "victim_copy.txt"))
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != string(want) {
				t.Errorf("the victim input changed: got %q, want %q", got, want)
			}
		})
	}
}
