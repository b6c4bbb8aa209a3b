// Command stagepayload copies a guest payload directory written by
// tools/vmpayload into internal/payload/files (zstd-compressed), where
// `go build -tags actiond_standalone ./cmd/actiond` embeds it. `make
// standalone` runs it. The staged files are git-ignored.
//
//	go run ./tools/stagepayload [-payload-dir DIR] [-runtime-dir DIR] [-out internal/payload/files]
//
// With -runtime-dir, the host runtime images there (<name>.squashfs, from
// `make runtimes`) are embedded too, for `actiond serve`.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"github.com/actiond/actiond/internal/payload"
	"github.com/actiond/actiond/vmhost"
)

func main() {
	dir := flag.String("payload-dir", vmhost.DefaultPayloadDir(runtime.GOARCH), "payload directory built by `actiond vm payload`")
	out := flag.String("out", payload.StageDir, "embed directory (run from the module root)")
	rtDir := flag.String("runtime-dir", "", "directory of host runtime images (<name>.squashfs) to embed for `actiond serve` (empty: none)")
	flag.Parse()
	start := time.Now()
	var host []string
	if *rtDir != "" {
		var err error
		if host, err = filepath.Glob(filepath.Join(*rtDir, "*.squashfs")); err != nil || len(host) == 0 {
			fmt.Fprintf(os.Stderr, "stagepayload: no <name>.squashfs in -runtime-dir %s (make runtimes)\n", *rtDir)
			os.Exit(1)
		}
	}
	if err := payload.Stage(*dir, *out, host...); err != nil {
		fmt.Fprintln(os.Stderr, "stagepayload:", err)
		os.Exit(1)
	}
	fmt.Printf("staged %s into %s in %v\n", *dir, *out, time.Since(start).Round(time.Millisecond))
}
