package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/actiond/actiond/bench/internal/benchutil"
)

// The wide-input workload: wideRules genrules, each over its own
// directory of small source files (2,000, and 5,000 for the last), 45,000
// inputs in all, every one of them read by its action. Cold, it is
// dominated by what each input costs: an upload and a CAS file for
// actiond, a symlink in the sandbox for linux-sandbox.
const (
	wideRules    = 21
	wideFiles    = 2000
	wideLastRule = 5000
	wideInputs   = (wideRules-1)*wideFiles + wideLastRule
)

// writeWideWorkload generates the package //wide in the workspace.
func writeWideWorkload(ws string) error {
	dir := filepath.Join(ws, "wide")
	var build strings.Builder
	var all []string
	for r := 0; r < wideRules; r++ {
		n := wideFiles
		if r == wideRules-1 {
			n = wideLastRule
		}
		g := fmt.Sprintf("g%02d", r)
		if err := os.MkdirAll(filepath.Join(dir, g), 0o755); err != nil {
			return err
		}
		for f := 0; f < n; f++ {
			content := fmt.Sprintf("wide input %s/%05d\n%s\n", g, f, strings.Repeat(fmt.Sprintf("%x", r*100003+f*7919), 8))
			if err := os.WriteFile(filepath.Join(dir, g, fmt.Sprintf("f%05d.txt", f)), []byte(content), 0o644); err != nil {
				return err
			}
		}
		fmt.Fprintf(&build, "genrule(\n    name = %q,\n    srcs = glob([%q]),\n    outs = [%q],\n    cmd = \"cat $(SRCS) | sha256sum > $@\",\n)\n\n", g, g+"/*.txt", g+".sum")
		all = append(all, fmt.Sprintf("%q", ":"+g))
	}
	fmt.Fprintf(&build, "filegroup(\n    name = \"all\",\n    srcs = [%s],\n)\n", strings.Join(all, ", "))
	return os.WriteFile(filepath.Join(dir, "BUILD"), []byte(build.String()), 0o644)
}

// wide times //wide:all after `bazel clean`: linux-sandbox, and actiond
// remote on a fresh root (a cold CAS: every input is uploaded), once with
// the default durability and once with --durability=group.
func (b *bench) wide() ([]benchutil.Measurement, error) {
	if err := writeWideWorkload(b.ws); err != nil {
		return nil, fmt.Errorf("generate the wide workload: %w", err)
	}
	type config struct {
		name, want string
		server     []string // nil: no actiond
	}
	configs := []config{
		{"linux-sandbox", "linux-sandbox", nil},
		{"actiond remote, cold (fresh root)", "remote", []string{}},
		{"actiond remote, cold (fresh root), --durability=group", "remote", []string{"--durability=group"}},
	}
	ms := make([]benchutil.Measurement, len(configs))
	for i, c := range configs {
		ms[i].Name = fmt.Sprintf("//wide:all (%d genrules, %d inputs), %s", wideRules, wideInputs, c.name)
	}
	for run := 0; run <= b.runs; run++ { // run 0 warms up
		for i, c := range configs {
			if _, err := b.bazel("clean"); err != nil {
				return nil, err
			}
			flags := sandboxFlags
			var srv *benchutil.Server
			if c.server != nil {
				var err error
				if srv, err = b.startServer(c.server...); err != nil {
					return nil, err
				}
				flags = remoteFlags(srv.Addr)
			}
			err := b.timeRun(&ms[i], run > 0, c.name, c.want, append(append([]string{}, flags...), "//wide:all"), srv, wideRules)
			if srv != nil {
				srv.Stop()
				os.RemoveAll(srv.Root)
			}
			if err != nil {
				return nil, err
			}
		}
	}
	fmt.Println("wide-input build //wide:all after bazel clean (wall of the build after an untimed analysis; CPU: Bazel's server with what it reaps, actiond's):")
	for i := range ms {
		ms[i].MedianMs = median(ms[i].Runs)
		fmt.Printf("  %-80s median %8.0f ms  CPU bazel %6.0f + actiond %6.0f ms  runs %v\n", ms[i].Name, ms[i].MedianMs, median(ms[i].ClientCPUMs), median(ms[i].ServerCPUMs), roundAll(ms[i].Runs))
	}
	fmt.Printf("  actiond cold / linux-sandbox = %.2f (group: %.2f)\n", ms[1].MedianMs/ms[0].MedianMs, ms[2].MedianMs/ms[0].MedianMs)
	return ms, nil
}
