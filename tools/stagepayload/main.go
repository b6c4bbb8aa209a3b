// Command stagepayload copies a guest payload directory written by
// tools/vmpayload into internal/payload/files (zstd-compressed), where
// `go build -tags actiond_standalone ./cmd/actiond` embeds it. `make
// standalone` runs it. The staged files are git-ignored.
//
//	go run ./tools/stagepayload [-payload-dir DIR] [-out internal/payload/files]
package main

import (
	"flag"
	"fmt"
	"os"
	"runtime"
	"time"

	"github.com/actiond/actiond/internal/payload"
	"github.com/actiond/actiond/vmhost"
)

func main() {
	dir := flag.String("payload-dir", vmhost.DefaultPayloadDir(runtime.GOARCH), "payload directory built by `actiond vm payload`")
	out := flag.String("out", payload.StageDir, "embed directory (run from the module root)")
	flag.Parse()
	start := time.Now()
	if err := payload.Stage(*dir, *out); err != nil {
		fmt.Fprintln(os.Stderr, "stagepayload:", err)
		os.Exit(1)
	}
	fmt.Printf("staged %s into %s in %v\n", *dir, *out, time.Since(start).Round(time.Millisecond))
}
