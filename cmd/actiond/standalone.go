package main

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/actiond/actiond/internal/payload"
	"github.com/actiond/actiond/internal/units"
)

// The standalone binary (-tags actiond_standalone, `make standalone`)
// carries the guest payload (package internal/payload): serve-vm boots it
// and serve uses its runtimes disk when there are no runtime images.

// embeddedPayloadDir extracts the embedded payload for arch under
// root/payload/<arch> (unchanged files are not written again) and returns
// that directory; ok is false when the binary has no payload for arch.
func embeddedPayloadDir(root, arch string, log *slog.Logger) (dir string, ok bool, err error) {
	if !payload.Embedded() {
		return "", false, nil
	}
	m, err := payload.ReadManifest()
	if err != nil {
		return "", false, err
	}
	if m.Arch != arch {
		log.Info("the embedded payload is for another arch; not using it", "embedded", m.Arch, "arch", arch)
		return "", false, nil
	}
	dir = filepath.Join(root, "payload", arch)
	start := time.Now()
	res, err := payload.Extract(dir)
	if err != nil {
		return "", false, fmt.Errorf("extract the embedded payload: %w", err)
	}
	logExtract(log, res, start)
	return dir, true, nil
}

func logExtract(log *slog.Logger, res payload.Result, start time.Time) {
	if len(res.Written) > 0 {
		var size int64
		for _, n := range res.Written {
			if st, err := os.Stat(filepath.Join(res.Dir, n)); err == nil {
				size += st.Size()
			}
		}
		log.Info("extracted the embedded payload", "dir", res.Dir, "files", strings.Join(res.Written, ","),
			"size", units.Format(size), "took", time.Since(start).Round(time.Millisecond), "unchanged", strings.Join(res.Unchanged, ","))
	} else {
		log.Info("embedded payload already extracted and unchanged", "dir", res.Dir, "files", strings.Join(res.Unchanged, ","))
	}
}
