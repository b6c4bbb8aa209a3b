//go:build linux

package guest

// First-boot preparation of a tar runtimes disk in the background. Under
// emulation (QEMU TCG) a Debian base system's second stage takes minutes
// per runtime, and even natively the three runtimes take longer than a
// client waits for a server to come up. So PID 1 only plans: runtimes
// prepared on an earlier boot are sealed at once, the others are listed as
// pending. The server starts serving at once and prepares the pending
// runtimes itself (it is an ordinary process that may run children; PID 1
// reaps every child), the default runtime first; an action that names a
// runtime still being prepared waits for it (runtimeGate), bounded by its
// own timeout.

import (
	"archive/tar"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/actiond/actiond/sandbox"
)

// pendingRuntime is a runtime of the tar disk that this boot must prepare.
type pendingRuntime struct {
	Entry runtimeEntry
	// Dir is its final directory under /cas/runtimes; Target is where it
	// is sealed (mountPoint/<name>, created empty by the plan).
	Dir    string
	Target string
}

// info describes a prepared runtime for the guest Info call.
func (rm readyMarker) info(dir string, reused bool) map[string]any {
	return map[string]any{"dir": dir, "reused": reused, "extract_s": rm.ExtractS,
		"configure_s": rm.ConfigureS, "bytes": float64(rm.Bytes), "sha256": rm.SHA256}
}

// planTarRuntimes reads the manifest of the tar runtimes disk dev, removes
// interrupted and stale preparations from the CAS disk, seals the runtimes
// an earlier boot prepared and returns them with the ones still to
// prepare (their Target an empty directory until sealed), first the
// runtime named first, then in the manifest's order.
func planTarRuntimes(dev, casMount, mountPoint, first string, log *slog.Logger) (tarRuntimes, []pendingRuntime, error) {
	res := tarRuntimes{Failed: map[string]string{}, Info: map[string]any{}}
	dir := filepath.Join(casMount, casRuntimesDir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return res, nil, err
	}
	removeInterrupted(dir, log)
	f, err := os.Open(dev)
	if err != nil {
		return res, nil, err
	}
	defer f.Close()
	m, err := readRuntimesManifest(tar.NewReader(f), runtime.GOARCH)
	if err != nil {
		return res, nil, fmt.Errorf("runtimes disk %s: %w", dev, err)
	}
	keep := map[string]bool{}
	var pending []pendingRuntime
	for _, e := range m.Runtimes {
		final := filepath.Join(dir, runtimeDirName(e))
		keep[filepath.Base(final)] = true
		target := filepath.Join(mountPoint, e.Name)
		rm, ok := readReady(final, e)
		if !ok {
			if err := os.MkdirAll(target, 0o755); err != nil {
				return res, nil, err
			}
			pending = append(pending, pendingRuntime{Entry: e, Dir: final, Target: target})
			continue
		}
		log.Info("runtime ready from an earlier boot (not extracted)", "runtime", e.Name, "dir", final, "prepared", rm.Prepared.Format(time.RFC3339))
		if err := sealBind(filepath.Join(final, "tree"), target); err != nil {
			log.Error("runtime unavailable", "runtime", e.Name, "err", err)
			res.Failed[e.Name] = err.Error()
			continue
		}
		res.Mounts = append(res.Mounts, target)
		res.Runtimes = append(res.Runtimes, sandbox.Runtime{Name: e.Name, Root: target})
		res.Bytes += rm.Bytes
		res.Info[e.Name] = rm.info(final, true)
	}
	removeStale(dir, keep, log)
	slices.SortStableFunc(pending, func(a, b pendingRuntime) int {
		switch {
		case a.Entry.Name == first && b.Entry.Name != first:
			return -1
		case b.Entry.Name == first && a.Entry.Name != first:
			return 1
		}
		return 0
	})
	for _, p := range pending {
		res.Info[p.Entry.Name] = map[string]any{"state": "pending"}
	}
	return res, pending, nil
}

// prepareRuntimes prepares each pending runtime (extract, second stage,
// seal on its Target) with up to workers at once, in the order given, and
// calls done for each as it ends. Each worker reads the disk on its own:
// tar seeks over the members it skips. When ctx ends, running second
// stages are killed and the rest is left for the next boot.
func prepareRuntimes(ctx context.Context, dev, dir string, pending []pendingRuntime, workers int, log *slog.Logger, done func(pendingRuntime, readyMarker, error)) {
	workers = max(1, min(workers, len(pending)))
	next := make(chan pendingRuntime)
	var wg sync.WaitGroup
	var mu sync.Mutex // serializes done
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for p := range next {
				rm, err := prepareOne(ctx, dev, dir, p, log)
				switch {
				case err != nil && ctx.Err() != nil:
					log.Info("runtime preparation stopped (shutting down); the next boot redoes it", "runtime", p.Entry.Name)
				case err != nil:
					log.Error("runtime unavailable: preparing it failed; the other runtimes still serve", "runtime", p.Entry.Name, "err", err)
				}
				mu.Lock()
				done(p, rm, err)
				mu.Unlock()
			}
		}()
	}
	for _, p := range pending {
		next <- p
	}
	close(next)
	wg.Wait()
}

// prepareOne finds p's member on the disk, prepares it and seals it.
func prepareOne(ctx context.Context, dev, dir string, p pendingRuntime, log *slog.Logger) (readyMarker, error) {
	if err := ctx.Err(); err != nil {
		return readyMarker{}, fmt.Errorf("not prepared: %w", err)
	}
	f, err := os.Open(dev)
	if err != nil {
		return readyMarker{}, err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return readyMarker{}, fmt.Errorf("member %s is not on the runtimes disk", p.Entry.Member)
		}
		if err != nil {
			return readyMarker{}, fmt.Errorf("runtimes disk %s: looking for member %s: %w", dev, p.Entry.Member, err)
		}
		if filepath.Clean(hdr.Name) != p.Entry.Member {
			continue
		}
		rm, err := prepareRuntime(ctx, p.Entry, hdr, tr, dir, log)
		if err != nil {
			return rm, err
		}
		if err := sealBind(filepath.Join(p.Dir, "tree"), p.Target); err != nil {
			return rm, err
		}
		return rm, nil
	}
}
