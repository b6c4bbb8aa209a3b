// Command summary prints the Markdown summary table of a bench/run.sh
// results directory: execlatency.json, staging.txt (go test -bench output of
// BenchmarkStageInputs), bazel.json, and for actiondfs fs.txt (go test
// -bench output of ./fs) and compile.json, each optional.
//
// Usage: go run ./bench/summary DIR
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/actiond/actiond/bench/internal/benchutil"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: summary DIR")
		os.Exit(2)
	}
	dir := os.Args[1]
	fmt.Println("| measurement | actiond | Bazel linux-sandbox | actiond / sandbox | goal |")
	fmt.Println("|---|---:|---:|---:|---|")

	var el benchutil.ExecResult
	if readJSON(filepath.Join(dir, "execlatency.json"), &el) {
		find := func(prefix string) *benchutil.Stats {
			for i := range el.Subject {
				if strings.HasPrefix(el.Subject[i].Name, prefix) {
					return &el.Subject[i]
				}
			}
			return nil
		}
		a, s := find("actiond"), find("linux-sandbox (")
		if a != nil && s != nil {
			row(fmt.Sprintf("trivial action latency p50 (n=%d, load %s, input root %s)", a.N, el.Load, el.InputRoot), a.P50, s.P50, "ms", fmt.Sprintf("≤ 5 ms and ≤ sandbox: %s", verdict(a.P50 <= 5 && a.P50 <= s.P50)))
			row("trivial action latency p95", a.P95, s.P95, "ms", "")
		}
		if f := find("fork+exec"); f != nil {
			fmt.Printf("| fork+exec of the same command (floor), p50 | %.2f ms | | | |\n", f.P50)
		}
		for _, p := range el.Phases {
			fmt.Printf("| actiond phase: %s, p50 | %.2f ms | | | |\n", strings.TrimSpace(p.Name), p.P50)
		}
	}

	var el1 benchutil.ExecResult
	if readJSON(filepath.Join(dir, "execlatency-1input.json"), &el1) {
		var a, s *benchutil.Stats
		for i := range el1.Subject {
			switch {
			case strings.HasPrefix(el1.Subject[i].Name, "actiond"):
				a = &el1.Subject[i]
			case strings.HasPrefix(el1.Subject[i].Name, "linux-sandbox ("):
				s = &el1.Subject[i]
			}
		}
		if a != nil && s != nil {
			row("action reading 1 input (`cat in/f0`), latency p50", a.P50, s.P50, "ms", "")
		}
	}

	var br benchutil.BazelResult
	haveBazel := readJSON(filepath.Join(dir, "bazel.json"), &br)
	if haveBazel {
		pairs := map[string][2]*benchutil.Measurement{}
		for i := range br.Genrules {
			m := &br.Genrules[i]
			key := m.Name[strings.LastIndex(m.Name, ", ")+2:]
			p := pairs[key]
			if strings.Contains(m.Name, "actiond") {
				p[0] = m
			} else {
				p[1] = m
			}
			pairs[key] = p
		}
		for _, key := range []string{"--jobs=1", "default --jobs"} {
			if p := pairs[key]; p[0] != nil && p[1] != nil {
				row(fmt.Sprintf("200 trivial genrules, wall per action, %s", key), p[0].PerActionMs, p[1].PerActionMs, "ms", "")
			}
		}
	}

	if f, err := os.Open(filepath.Join(dir, "staging.txt")); err == nil {
		re := regexp.MustCompile(`^BenchmarkStageInputs/(\w+)/(\w+)-\d+\s+\d+\s+([0-9.]+) ns/op\s+([0-9.]+) µs/file`)
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				ns, _ := strconv.ParseFloat(m[3], 64)
				fmt.Printf("| input staging, %s inputs, %s | %.1f ms (%s µs/file) | | | |\n", m[2], m[1], ns/1e6, m[4])
			}
		}
		f.Close()
	}

	if haveBazel && len(br.Stress) == 4 {
		local, sb, cold, warm := br.Stress[0], br.Stress[1], br.Stress[2], br.Stress[3]
		row(fmt.Sprintf("//:agg cold build wall (median of %d, load %s, input root %s)", len(cold.Runs), br.Load, br.InputRoot), cold.MedianMs/1000, sb.MedianMs/1000, "s",
			fmt.Sprintf("≤ 1.2× sandbox: %s", verdict(cold.MedianMs <= 1.2*sb.MedianMs)))
		fmt.Printf("| //:agg warm rebuild after clean (all remote cache hits) | %.2f s | | | |\n", warm.MedianMs/1000)
		fmt.Printf("| //:agg --spawn_strategy=local (unsandboxed reference) | | %.2f s (local) | | |\n", local.MedianMs/1000)
	}
	if haveBazel && len(br.Wide) == 3 {
		sb, cold, group := br.Wide[0], br.Wide[1], br.Wide[2]
		row(fmt.Sprintf("//wide:all cold build wall, 45,000 inputs (median of %d)", len(cold.Runs)), cold.MedianMs/1000, sb.MedianMs/1000, "s",
			fmt.Sprintf("≤ 1.0× sandbox: %s", verdict(cold.MedianMs <= sb.MedianMs)))
		row("//wide:all, actiond with --durability=group", group.MedianMs/1000, sb.MedianMs/1000, "s", "")
	}
	actiondfs(dir)
}

// actiondfs prints the input root table (issue 4): setup per tree size,
// sequential read, and the compile-heavy build, fuse against hardlinks.
func actiondfs(dir string) {
	var cr benchutil.BazelResult
	haveCompile := readJSON(filepath.Join(dir, "compile.json"), &cr) && len(cr.Compile) == 3
	f, err := os.Open(filepath.Join(dir, "fs.txt"))
	if err != nil && !haveCompile {
		return
	}
	fmt.Println()
	fmt.Println("| actiondfs | fuse | hardlink | fuse / hardlink | goal |")
	fmt.Println("|---|---:|---:|---:|---|")
	if err == nil {
		setup := map[string]float64{} // "fuse/1k" -> ms
		var reads []string
		stage := regexp.MustCompile(`^BenchmarkStageInputs/([\w-]+)/(\w+)-\d+\s+\d+\s+([0-9.]+) ns/op`)
		read := regexp.MustCompile(`^BenchmarkSequentialRead/([\w-]+)-\d+\s+\d+\s+[0-9.]+ ns/op\s+([0-9.]+) MB/s`)
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if m := stage.FindStringSubmatch(sc.Text()); m != nil {
				ns, _ := strconv.ParseFloat(m[3], 64)
				setup[m[1]+"/"+m[2]] = ns / 1e6
			} else if m := read.FindStringSubmatch(sc.Text()); m != nil {
				reads = append(reads, fmt.Sprintf("%s %s MB/s", m[1], m[2]))
			}
		}
		f.Close()
		for _, n := range []string{"1k", "10k", "100k"} {
			fu, hl := setup["fuse/"+n], setup["hardlink/"+n]
			if fu == 0 || hl == 0 {
				continue
			}
			goal := ""
			if n == "100k" {
				goal = fmt.Sprintf("fuse < 5 ms at 100k: %s", verdict(fu < 5))
			}
			fmt.Printf("| input root setup, %s files (fresh mount; spare mount %.3f ms) | %.2f ms | %.1f ms | %.3f | %s |\n", n, setup["fuse-spare/"+n], fu, hl, fu/hl, goal)
		}
		if len(reads) > 0 {
			fmt.Printf("| sequential read of a 256 MiB input | %s | | | |\n", strings.Join(reads, "; "))
		}
	}
	if haveCompile {
		sb, fu, hl := cr.Compile[0], cr.Compile[1], cr.Compile[2]
		fmt.Printf("| %s (median of %d, load %s) | %.2f s | %.2f s | %.3f | ≤ 1.15×: %s |\n", strings.TrimSuffix(fu.Name[:strings.Index(fu.Name, ")")+1], ","), len(fu.Runs), cr.Load,
			fu.MedianMs/1000, hl.MedianMs/1000, fu.MedianMs/hl.MedianMs, verdict(fu.MedianMs <= 1.15*hl.MedianMs))
		fmt.Printf("| the same with Bazel's linux-sandbox (reference) | %.2f s | | | |\n", sb.MedianMs/1000)
	}
}

func row(name string, actiond, sandbox float64, unit, goal string) {
	fmt.Printf("| %s | %.2f %s | %.2f %s | %.2f | %s |\n", name, actiond, unit, sandbox, unit, actiond/sandbox, goal)
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "**missed**"
}

func readJSON(path string, v any) bool {
	b, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	if err := json.Unmarshal(b, v); err != nil {
		fmt.Fprintf(os.Stderr, "summary: %s: %v\n", path, err)
		return false
	}
	return true
}
