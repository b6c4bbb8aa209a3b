// Command darwincheck type-checks this module's macOS build on any host:
// it loads the packages (default: DefaultPatterns, what `actiond serve-vm`
// on macOS is built from) with go/packages under GOOS=darwin GOARCH=arm64
// CGO_ENABLED=1 and reports type errors in this module's packages (the
// patterns and everything of this module they import), exiting 1 when
// there are any.
//
// Dependencies that use cgo (github.com/Code-Hex/vz/v3) cannot be fully
// checked without a macOS C toolchain: their `import "C"` does not
// resolve, and errors inside them are expected. Their Go API still
// resolves, which is what this module's code is checked against. So only
// errors located in this module's packages count.
//
//	go run ./tools/darwincheck [-v] [-tests] [-goarch arm64] [patterns...]
package main

import (
	"flag"
	"fmt"
	"os"
	"sort"

	"golang.org/x/tools/go/packages"
)

func main() {
	verbose := flag.Bool("v", false, "list the checked packages and the ignored dependency errors")
	goarch := flag.String("goarch", "arm64", "GOARCH to check (arm64: Apple silicon; amd64: Intel Macs)")
	tests := flag.Bool("tests", false, "check the packages' tests too")
	flag.Parse()
	patterns := flag.Args()
	if len(patterns) == 0 {
		patterns = DefaultPatterns
	}
	errs, checked, ignored, err := check(patterns, *goarch, *tests)
	if err != nil {
		fmt.Fprintln(os.Stderr, "darwincheck:", err)
		os.Exit(2)
	}
	if *verbose {
		for _, p := range checked {
			fmt.Println("checked", p)
		}
		for _, e := range ignored {
			fmt.Println("ignored (dependency):", e)
		}
	}
	for _, e := range errs {
		fmt.Fprintln(os.Stderr, e)
	}
	if len(errs) > 0 {
		fmt.Fprintf(os.Stderr, "darwincheck: %d error(s) in the darwin/%s build\n", len(errs), *goarch)
		os.Exit(1)
	}
	fmt.Printf("darwincheck: %d packages type-check for darwin/%s\n", len(checked), *goarch)
}

// DefaultPatterns are the packages that must build on macOS: the command
// and the VM host packages (with everything of this module they import).
var DefaultPatterns = []string{"github.com/actiond/actiond/cmd/...", "github.com/actiond/actiond/vmhost/..."}

// check loads patterns for darwin and returns the errors in this module's
// packages, the module packages checked, and the dependency errors ignored.
func check(patterns []string, goarch string, tests bool) (errs, checked, ignored []string, err error) {
	cfg := &packages.Config{
		Mode: packages.NeedName | packages.NeedFiles | packages.NeedImports | packages.NeedDeps |
			packages.NeedTypes | packages.NeedSyntax | packages.NeedTypesInfo | packages.NeedModule,
		Env:   append(os.Environ(), "GOOS=darwin", "GOARCH="+goarch, "CGO_ENABLED=1"),
		Tests: tests,
	}
	pkgs, err := packages.Load(cfg, patterns...)
	if err != nil {
		return nil, nil, nil, err
	}
	if len(pkgs) == 0 {
		return nil, nil, nil, fmt.Errorf("no packages match %v", patterns)
	}
	// This module is the main module of the root packages.
	var mainMod string
	for _, p := range pkgs {
		if p.Module != nil && p.Module.Main {
			mainMod = p.Module.Path
			break
		}
	}
	if mainMod == "" {
		return nil, nil, nil, fmt.Errorf("cannot tell the main module from %v", patterns)
	}
	seenErr := map[string]bool{}
	seenPkg := map[string]bool{}
	packages.Visit(pkgs, nil, func(p *packages.Package) {
		ours := p.Module != nil && p.Module.Path == mainMod
		if ours && !seenPkg[p.ID] {
			seenPkg[p.ID] = true
			checked = append(checked, p.ID)
		}
		for _, e := range p.Errors {
			msg := e.Error()
			if seenErr[msg] {
				continue
			}
			seenErr[msg] = true
			if ours {
				errs = append(errs, msg)
			} else {
				ignored = append(ignored, p.PkgPath+": "+msg)
			}
		}
	})
	sort.Strings(checked)
	sort.Strings(errs)
	sort.Strings(ignored)
	return errs, checked, ignored, nil
}
