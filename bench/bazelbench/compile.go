package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/actiond/actiond/bench/internal/benchutil"
)

// The compile-heavy workload: compileLibs cc_library targets of
// compileFilesPerLib C files each, every file including a shared header
// library and its own library's header, linked into one cc_binary.
const (
	compileLibs        = 12
	compileFilesPerLib = 20
	compileCount       = compileLibs * compileFilesPerLib // C compiles per build
)

// writeCompileWorkload generates the package //compile in the workspace.
func writeCompileWorkload(ws string) error {
	dir := filepath.Join(ws, "compile")
	if err := os.MkdirAll(filepath.Join(dir, "common"), 0o755); err != nil {
		return err
	}
	var build strings.Builder
	build.WriteString("load(\"@rules_cc//cc:defs.bzl\", \"cc_binary\", \"cc_library\")\n\n")
	build.WriteString("cc_library(\n    name = \"common\",\n    hdrs = glob([\"common/*.h\"]),\n    visibility = [\"//visibility:public\"],\n)\n\n")
	// Shared headers: every compile reads all of them.
	for h := 0; h < 8; h++ {
		var b strings.Builder
		fmt.Fprintf(&b, "#ifndef COMMON_%d_H\n#define COMMON_%d_H\n#include <stdint.h>\n#include <string.h>\n", h, h)
		for k := 0; k < 20; k++ {
			fmt.Fprintf(&b, "static inline uint64_t common_%d_%d(uint64_t x) { x ^= x >> %d; x *= 0x9e3779b97f4a7c15ULL; return x + %d; }\n", h, k, 7+k%13, h*100+k)
		}
		b.WriteString("#endif\n")
		if err := os.WriteFile(filepath.Join(dir, "common", fmt.Sprintf("c%d.h", h)), []byte(b.String()), 0o644); err != nil {
			return err
		}
	}
	var libs []string
	for l := 0; l < compileLibs; l++ {
		lib := fmt.Sprintf("lib%02d", l)
		libs = append(libs, ":"+lib)
		ldir := filepath.Join(dir, lib)
		if err := os.MkdirAll(ldir, 0o755); err != nil {
			return err
		}
		var hdr strings.Builder
		fmt.Fprintf(&hdr, "#ifndef %s_H\n#define %s_H\n#include <stdint.h>\n", strings.ToUpper(lib), strings.ToUpper(lib))
		var srcs []string
		for f := 0; f < compileFilesPerLib; f++ {
			fn := fmt.Sprintf("%s_f%02d", lib, f)
			fmt.Fprintf(&hdr, "uint64_t %s(uint64_t seed);\n", fn)
			var c strings.Builder
			fmt.Fprintf(&c, "#include <stdio.h>\n#include <stdlib.h>\n#include \"compile/%s/%s.h\"\n", lib, lib)
			for h := 0; h < 8; h++ {
				fmt.Fprintf(&c, "#include \"compile/common/c%d.h\"\n", h)
			}
			// Some real work for the optimiser: loops, a table, a switch.
			fmt.Fprintf(&c, "static const uint64_t table[64] = {")
			for k := 0; k < 64; k++ {
				fmt.Fprintf(&c, "%dULL,", (l*7919+f*104729+k*1299709)%1000003)
			}
			c.WriteString("};\n")
			for k := 0; k < 6; k++ {
				fmt.Fprintf(&c, "static uint64_t step%d(uint64_t x) {\n  for (int i = 0; i < %d; i++) {\n    switch ((x + i) %% 4) {\n    case 0: x = common_%d_%d(x) + table[i %% 64]; break;\n    case 1: x ^= table[(x >> 3) %% 64]; break;\n    case 2: x = x * %d + 1; break;\n    default: x = common_%d_%d(x ^ %dULL);\n    }\n  }\n  return x;\n}\n", k, 10+k, k%8, k, 3+2*k, (k+1)%8, k+3, f)
			}
			fmt.Fprintf(&c, "uint64_t %s(uint64_t seed) {\n  uint64_t x = seed;\n", fn)
			for k := 0; k < 6; k++ {
				fmt.Fprintf(&c, "  x = step%d(x);\n", k)
			}
			c.WriteString("  return x;\n}\n")
			name := fmt.Sprintf("f%02d.c", f)
			srcs = append(srcs, strconv.Quote(name))
			if err := os.WriteFile(filepath.Join(ldir, name), []byte(c.String()), 0o644); err != nil {
				return err
			}
		}
		hdr.WriteString("#endif\n")
		if err := os.WriteFile(filepath.Join(ldir, lib+".h"), []byte(hdr.String()), 0o644); err != nil {
			return err
		}
		lbuild := fmt.Sprintf("load(\"@rules_cc//cc:defs.bzl\", \"cc_library\")\n\ncc_library(\n    name = %q,\n    srcs = [%s],\n    hdrs = [%q],\n    copts = [\"-O2\"],\n    visibility = [\"//visibility:public\"],\n    deps = [\"//compile:common\"],\n)\n", lib, strings.Join(srcs, ", "), lib+".h")
		if err := os.WriteFile(filepath.Join(ldir, "BUILD"), []byte(lbuild), 0o644); err != nil {
			return err
		}
	}
	for i := range libs {
		libs[i] = strconv.Quote("//compile/" + libs[i][1:])
	}
	var main strings.Builder
	main.WriteString("#include <stdio.h>\n#include <stdint.h>\n")
	for l := 0; l < compileLibs; l++ {
		fmt.Fprintf(&main, "#include \"compile/lib%02d/lib%02d.h\"\n", l, l)
	}
	main.WriteString("int main(void) {\n  uint64_t x = 1;\n")
	for l := 0; l < compileLibs; l++ {
		for f := 0; f < compileFilesPerLib; f++ {
			fmt.Fprintf(&main, "  x = lib%02d_f%02d(x);\n", l, f)
		}
	}
	main.WriteString("  printf(\"%llu\\n\", (unsigned long long)x);\n  return 0;\n}\n")
	if err := os.WriteFile(filepath.Join(dir, "main.c"), []byte(main.String()), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(&build, "cc_binary(\n    name = \"prog\",\n    srcs = [\"main.c\"],\n    deps = [%s],\n)\n", strings.Join(libs, ", "))
	return os.WriteFile(filepath.Join(dir, "BUILD"), []byte(build.String()), 0o644)
}

// compile times //compile:prog (compileCount+1 C compiles, the archives
// and a link) executed remotely by actiond with each input root, against
// linux-sandbox. Every timed build follows `bazel clean`, and remote builds
// pass --noremote_accept_cached, so every action executes again while the
// inputs are already in the CAS: what is timed is execution, not upload.
func (b *bench) compile() ([]benchutil.Measurement, error) {
	if err := writeCompileWorkload(b.ws); err != nil {
		return nil, fmt.Errorf("generate the compile workload: %w", err)
	}
	type config struct {
		name, want string
		flags      []string
	}
	configs := []config{{"linux-sandbox", "linux-sandbox", sandboxFlags}}
	for _, ir := range []string{"fuse", "hardlink"} {
		srv, err := b.startServer("--input-root=" + ir)
		if err != nil {
			return nil, err
		}
		defer srv.Stop()
		if got := srv.InputRoot(); got != ir {
			return nil, fmt.Errorf("actiond started with --input-root=%s reports input_root=%s", ir, got)
		}
		configs = append(configs, config{"actiond remote, input root " + ir, "remote", append(remoteFlags(srv.Addr), "--noremote_accept_cached", "--noremote_upload_local_results")})
	}
	ms := make([]benchutil.Measurement, len(configs))
	for i, c := range configs {
		ms[i].Name = fmt.Sprintf("//compile:prog (%d C compiles), %s", compileCount+1, c.name)
	}
	for run := 0; run <= b.runs; run++ { // run 0 warms up (and uploads the sources)
		for i, c := range configs {
			if _, err := b.bazel("clean"); err != nil {
				return nil, err
			}
			took, p, err := b.analyseThenTime(c.want, append(append([]string{}, c.flags...), "//compile:prog"))
			if err != nil {
				return nil, err
			}
			if p[c.want] < compileCount+1 {
				return nil, fmt.Errorf("%s: %d %s processes, want at least %d", c.name, p[c.want], c.want, compileCount+1)
			}
			if run > 0 {
				ms[i].Add(took, p)
			}
		}
	}
	fmt.Println("compile-heavy build //compile:prog after bazel clean (wall of the build after an untimed analysis):")
	for i := range ms {
		ms[i].MedianMs = median(ms[i].Runs)
		fmt.Printf("  %-60s median %8.0f ms  runs %v  %v\n", ms[i].Name, ms[i].MedianMs, roundAll(ms[i].Runs), ms[i].Processes)
	}
	fmt.Printf("  fuse / hardlink = %.3f (goal <= 1.15)\n", ms[1].MedianMs/ms[2].MedianMs)
	return ms, nil
}
