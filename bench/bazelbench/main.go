// Command bazelbench times Bazel 4.2.3 builds of the test workspace
// (testdata/bazel) executed remotely by actiond against the same builds
// with Bazel's own linux-sandbox strategy, side by side in one run:
//
//   - genrules: 200 trivial genrules (//trivial), per-action wall time
//     (build wall / 200) with --jobs=1 (the per-action cost) and with the
//     default --jobs; each run uses a new --define=SALT so that every
//     action executes again; the analysis is done by an untimed --nobuild
//     first, so the timed build is (almost) only execution;
//   - stress: //:agg (genrules, cc_binary/cc_test, tree artifacts, a
//     2,049-input action, ...) after `bazel clean`: cold with
//     --spawn_strategy=linux-sandbox, cold with --remote_executor against
//     an actiond on a fresh root, and the warm rebuild (all remote cache
//     hits) after another clean; --spawn_strategy=local for reference;
//   - compile: a generated package of 240 C files in 12 cc_library targets
//     plus a cc_binary (241 compiles, -O2), after `bazel clean`, executed by
//     actiond with --input-root=fuse and with --input-root=hardlink
//     (--noremote_accept_cached: inputs are in the CAS, every action runs),
//     and with linux-sandbox for reference;
//   - wide: 21 genrules over 45,000 small input files (2,000 each, 5,000
//     for one), each reading all of its inputs, after `bazel clean`:
//     linux-sandbox against actiond remote on a fresh root (every input
//     uploaded), with the default durability and with --durability=group.
//
// Strategies take turns within each round, so load changes on the machine
// affect them alike. Every build passes --nosandbox_debug (Debian's
// /etc/bazel/bazelrc turns sandbox_debug on). Medians over --runs.
//
// Usage (as root): go run ./bench/bazelbench --actiond /path/to/actiond [--runs 3] [--json out.json]
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/actiond/actiond/bench/internal/benchutil"
	"github.com/actiond/actiond/internal/bazelws"
	"github.com/actiond/actiond/internal/srctree"
)

// trivialCount is N in testdata/bazel/trivial/BUILD.
const trivialCount = 200

func main() {
	actiond := flag.String("actiond", "", "actiond binary (required)")
	serverArgs := flag.String("server-args", "", "extra `actiond serve` flags (space-separated)")
	wsSrc := flag.String("workspace", "", "the test workspace (default: testdata/bazel of this module)")
	runs := flag.Int("runs", 3, "runs per measurement (median reported)")
	only := flag.String("only", "", "run only these parts (comma-separated): genrules, stress, compile, wide")
	jsonOut := flag.String("json", "", "also write the results as JSON to this file")
	keep := flag.Bool("keep", false, "keep the temporary directory (workspace, output base, server roots)")
	flag.Parse()
	b := &bench{actiond: *actiond, serverArgs: strings.Fields(*serverArgs), runs: *runs, keep: *keep}
	if err := b.main(*wsSrc, *only, *jsonOut); err != nil {
		fmt.Fprintln(os.Stderr, "bazelbench:", err)
		os.Exit(1)
	}
}

type bench struct {
	actiond    string
	serverArgs []string
	runs       int
	keep       bool
	tmp        string
	ws         string
	our        string
	nServers   int
	inputRoot  string
}

func (b *bench) main(wsSrc, only, jsonOut string) error {
	if b.actiond == "" {
		return errors.New("--actiond is required")
	}
	if b.runs <= 0 {
		return errors.New("--runs must be positive")
	}
	if os.Geteuid() != 0 {
		return errors.New("needs root (actiond executes actions in its sandbox only as root)")
	}
	if wsSrc == "" {
		root, err := srctree.ModuleRoot(".")
		if err != nil {
			return fmt.Errorf("%w; pass --workspace", err)
		}
		wsSrc = filepath.Join(root, "testdata", "bazel")
	}
	var err error
	if b.tmp, err = os.MkdirTemp("", "bazelbench-"); err != nil {
		return err
	}
	b.ws = filepath.Join(b.tmp, "ws")
	b.our = filepath.Join(b.tmp, "our")
	defer func() {
		b.bazel("shutdown")
		if b.keep {
			fmt.Println("kept", b.tmp)
			return
		}
		bazelws.MakeWritable(b.tmp)
		os.RemoveAll(b.tmp)
	}()
	if err := bazelws.Copy(wsSrc, b.ws); err != nil {
		return err
	}
	res := benchutil.BazelResult{Load: benchutil.Load()}
	fmt.Printf("bazelbench: %d runs per measurement, workspace copy in %s (load before: %s)\n", b.runs, b.ws, res.Load)
	// Start the Bazel server and warm it up (JIT, loading of the packages).
	if _, err := b.bazel("build", "--nobuild", "//:agg"); err != nil {
		return err
	}
	parts := map[string]bool{}
	if only != "" {
		for _, p := range strings.Split(only, ",") {
			if p != "genrules" && p != "stress" && p != "compile" && p != "wide" {
				return fmt.Errorf("--only %q: want genrules, stress, compile or wide (comma-separated)", only)
			}
			parts[p] = true
		}
	}
	want := func(part string) bool { return only == "" || parts[part] }
	if want("genrules") {
		if res.Genrules, err = b.genrules(); err != nil {
			return err
		}
	}
	if want("stress") {
		if res.Stress, err = b.stress(); err != nil {
			return err
		}
	}
	if want("compile") {
		if res.Compile, err = b.compile(); err != nil {
			return err
		}
	}
	if want("wide") {
		if res.Wide, err = b.wide(); err != nil {
			return err
		}
	}
	res.InputRoot = b.inputRoot
	return benchutil.WriteJSON(jsonOut, res)
}

// bazel runs one Bazel command in the workspace and returns its output.
func (b *bench) bazel(args ...string) (string, error) {
	startup := []string{"--output_user_root=" + b.our, "--nohome_rc", "--max_idle_secs=300"}
	cmd := exec.Command("bazel", append(startup, args...)...)
	cmd.Dir = b.ws
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("bazel %s: %v\n%s", strings.Join(args, " "), err, tail(string(out), 4000))
	}
	return string(out), nil
}

// timedBuild runs `bazel build args...` and returns its wall time and
// process summary, checking that every non-internal process used the
// expected strategy ("linux-sandbox", "remote", "remote cache hit", "local").
func (b *bench) timedBuild(want string, args ...string) (time.Duration, map[string]int, error) {
	start := time.Now()
	out, err := b.bazel(append([]string{"build"}, args...)...)
	took := time.Since(start)
	if err != nil {
		return 0, nil, err
	}
	p := bazelws.ParseProcesses(out)
	if p == nil || p[want] == 0 || p[want] != p["total"]-p["internal"] {
		return 0, nil, fmt.Errorf("bazel build %s: want every non-internal process to be %q, got %v", strings.Join(args, " "), want, p)
	}
	return took, p, nil
}

// analyseThenTime runs `bazel build --nobuild args...` (the analysis,
// untimed) and then times `bazel build args...` with timedBuild.
func (b *bench) analyseThenTime(want string, args []string) (time.Duration, map[string]int, error) {
	if _, err := b.bazel(append([]string{"build", "--nobuild"}, args...)...); err != nil {
		return 0, nil, err
	}
	return b.timedBuild(want, args...)
}

// cpuUse is the CPU a timed build cost: Bazel's server process (with the
// linux-sandbox processes and commands it reaps) and, for remote builds,
// the actiond server (with its helpers and commands).
type cpuUse struct{ client, server time.Duration }

// addRun records one timed build, with its CPU, in m.
func addRun(m *benchutil.Measurement, took time.Duration, p map[string]int, use cpuUse) {
	m.Add(took, p)
	m.ClientCPUMs = append(m.ClientCPUMs, benchutil.Ms(use.client))
	m.ServerCPUMs = append(m.ServerCPUMs, benchutil.Ms(use.server))
}

// timeRun times one build of args (see analyseThenTimeCPU), checks that it
// ran count processes of kind want, and adds it to m when record is set
// (not a warm-up).
func (b *bench) timeRun(m *benchutil.Measurement, record bool, name, want string, args []string, srv *benchutil.Server, count int) error {
	took, p, use, err := b.analyseThenTimeCPU(want, args, srv)
	if err != nil {
		return err
	}
	if p[want] != count {
		return fmt.Errorf("%s: %d %s processes, want %d", name, p[want], want, count)
	}
	if record {
		addRun(m, took, p, use)
	}
	return nil
}

// analyseThenTimeCPU is analyseThenTime that also measures cpuUse; srv is
// nil for builds that do not use actiond.
func (b *bench) analyseThenTimeCPU(want string, args []string, srv *benchutil.Server) (time.Duration, map[string]int, cpuUse, error) {
	var use cpuUse
	if _, err := b.bazel(append([]string{"build", "--nobuild"}, args...)...); err != nil {
		return 0, nil, use, err
	}
	out, err := b.bazel("info", "server_pid")
	if err != nil {
		return 0, nil, use, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(lastLine(out)))
	if err != nil {
		return 0, nil, use, fmt.Errorf("bazel info server_pid: %q", out)
	}
	sample := func() (c, s time.Duration, err error) {
		if c, err = benchutil.ProcessCPU(pid); err != nil || srv == nil {
			return c, 0, err
		}
		s, err = srv.CPU()
		return c, s, err
	}
	c0, s0, err := sample()
	if err != nil {
		return 0, nil, use, err
	}
	took, p, err := b.timedBuild(want, args...)
	if err != nil {
		return 0, nil, use, err
	}
	c1, s1, err := sample()
	return took, p, cpuUse{c1 - c0, s1 - s0}, err
}

// lastLine is the last non-empty line of s.
func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

func (b *bench) startServer(extra ...string) (*benchutil.Server, error) {
	b.nServers++
	args := append(append([]string{}, b.serverArgs...), extra...)
	srv, err := benchutil.StartServer(b.actiond, filepath.Join(b.tmp, fmt.Sprintf("actiond-root-%d", b.nServers)), args...)
	if err == nil && b.inputRoot == "" && len(extra) == 0 {
		b.inputRoot = srv.InputRoot()
		fmt.Printf("actiond input root: %s\n", b.inputRoot)
	}
	return srv, err
}

func remoteFlags(addr string) []string {
	return []string{"--remote_executor=grpc://" + addr, "--spawn_strategy=remote", "--remote_local_fallback=false", "--remote_timeout=300", "--nosandbox_debug"}
}

var sandboxFlags = []string{"--spawn_strategy=linux-sandbox", "--nosandbox_debug"}

// genrules times the 200 trivial genrules per strategy and --jobs.
func (b *bench) genrules() ([]benchutil.Measurement, error) {
	srv, err := b.startServer()
	if err != nil {
		return nil, err
	}
	defer srv.Stop()
	type config struct {
		name, want string
		flags      []string
	}
	var configs []config
	for _, jobs := range []string{"1", ""} {
		suffix, jobFlags := ", --jobs=1", []string{"--jobs=1"}
		if jobs == "" {
			suffix, jobFlags = ", default --jobs", nil
		}
		configs = append(configs,
			config{"linux-sandbox" + suffix, "linux-sandbox", append(append([]string{}, sandboxFlags...), jobFlags...)},
			config{"actiond remote" + suffix, "remote", append(remoteFlags(srv.Addr), jobFlags...)})
	}
	ms := make([]benchutil.Measurement, len(configs))
	for i, c := range configs {
		ms[i].Name = fmt.Sprintf("%d trivial genrules, %s", trivialCount, c.name)
	}
	salt := time.Now().UnixNano()
	for run := 0; run <= b.runs; run++ { // run 0 warms up
		for i, c := range configs {
			salt++
			define := "--define=SALT=" + strconv.FormatInt(salt, 36)
			var cs *benchutil.Server
			if c.want == "remote" {
				cs = srv
			}
			if err := b.timeRun(&ms[i], run > 0, c.name, c.want, append(append([]string{}, c.flags...), define, "//trivial"), cs, trivialCount); err != nil {
				return nil, err
			}
		}
	}
	fmt.Println("trivial genrules (wall of the build after an untimed analysis; per action = wall / N; CPU per action: Bazel's server with what it reaps + actiond's, medians):")
	for i := range ms {
		ms[i].MedianMs = median(ms[i].Runs)
		ms[i].PerActionMs = ms[i].MedianMs / trivialCount
		bz, ad := median(ms[i].ClientCPUMs)/trivialCount, median(ms[i].ServerCPUMs)/trivialCount
		fmt.Printf("  %-52s median %8.0f ms  per action %6.2f ms  CPU/action bazel %5.2f + actiond %5.2f ms  runs %v\n", ms[i].Name, ms[i].MedianMs, ms[i].PerActionMs, bz, ad, roundAll(ms[i].Runs))
	}
	return ms, nil
}

// stress times //:agg: local, linux-sandbox, remote cold (fresh actiond
// root), remote warm (after clean, against the same actiond).
func (b *bench) stress() ([]benchutil.Measurement, error) {
	names := []string{"//:agg local (reference)", "//:agg linux-sandbox", "//:agg actiond remote, cold (fresh root)", "//:agg actiond remote, warm (all cache hits)"}
	ms := make([]benchutil.Measurement, len(names))
	for i, n := range names {
		ms[i].Name = n
	}
	// Each timed build follows `bazel clean` and an untimed analysis.
	build := func(want string, flags ...string) (time.Duration, map[string]int, error) {
		if _, err := b.bazel("clean"); err != nil {
			return 0, nil, err
		}
		return b.analyseThenTime(want, append(flags, "//:agg"))
	}
	for run := 0; run < b.runs; run++ {
		took, p, err := build("local", "--spawn_strategy=local", "--nosandbox_debug")
		if err != nil {
			return nil, err
		}
		ms[0].Add(took, p)
		if took, p, err = build("linux-sandbox", sandboxFlags...); err != nil {
			return nil, err
		}
		ms[1].Add(took, p)
		srv, err := b.startServer()
		if err != nil {
			return nil, err
		}
		if took, p, err = build("remote", remoteFlags(srv.Addr)...); err != nil {
			srv.Stop()
			return nil, err
		}
		ms[2].Add(took, p)
		took, p, err = build("remote cache hit", remoteFlags(srv.Addr)...)
		srv.Stop()
		if err != nil {
			return nil, err
		}
		ms[3].Add(took, p)
		os.RemoveAll(srv.Root)
	}
	fmt.Println("stress workspace //:agg after bazel clean (wall of the build after an untimed analysis):")
	for i := range ms {
		ms[i].MedianMs = median(ms[i].Runs)
		fmt.Printf("  %-52s median %8.0f ms  runs %v  %v\n", ms[i].Name, ms[i].MedianMs, roundAll(ms[i].Runs), ms[i].Processes)
	}
	fmt.Printf("  remote cold / linux-sandbox = %.2f\n", ms[2].MedianMs/ms[1].MedianMs)
	return ms, nil
}

func median(v []float64) float64 {
	d := make([]time.Duration, len(v))
	for i, x := range v {
		d[i] = time.Duration(x * 1e6)
	}
	return benchutil.Ms(benchutil.Median(d))
}

func roundAll(v []float64) []int {
	r := make([]int, len(v))
	for i, x := range v {
		r[i] = int(x + 0.5)
	}
	return r
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "...\n" + s[len(s)-n:]
}
