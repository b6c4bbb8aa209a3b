package cas

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"sync/atomic"
	"time"
)

// DefaultScrubRate is how many bytes per second the background scrubber
// hashes unless told otherwise: about 0.5% of one core at the ~1,800 MB/s
// SHA-256 runs at, and a read rate any disk serves beside its clients. A
// 100 GiB CAS is scrubbed every ~3.6 hours.
const DefaultScrubRate = 8 << 20

// DefaultScrubPause is how long the scrubber waits after the store opens,
// and between passes, before it starts reading.
const DefaultScrubPause = time.Minute

// scrubChunk is how much the scrubber hashes between rate-limit sleeps, so
// that a large blob is read at the rate too rather than in one burst.
const scrubChunk = 1 << 20

// ScrubStats report the background scrubber's progress.
type ScrubStats struct {
	Bytes  int64 // hashed since start
	Blobs  int64 // checked since start
	Passes int64 // completed walks over every blob
}

type scrubCounters struct{ bytes, blobs, passes atomic.Int64 }

// ScrubStats returns the scrubber's counts.
func (s *DiskStore) ScrubStats() ScrubStats {
	return ScrubStats{Bytes: s.scrub.bytes.Load(), Blobs: s.scrub.blobs.Load(), Passes: s.scrub.passes.Load()}
}

// Scrub is the online form of Verify: until ctx ends, it walks every blob
// (least recently used first: those nobody reads, so no read verifies
// them), hashing at most rate bytes per second, and quarantines each blob
// whose file no longer matches its digest, so clients upload it again
// before anyone needs it. Blobs that pass are marked verified, which spares
// the executor hashing them before they back an action's input. It waits
// pause before each pass. rate <= 0 means DefaultScrubRate.
func (s *DiskStore) Scrub(ctx context.Context, rate int64, pause time.Duration) {
	if rate <= 0 {
		rate = DefaultScrubRate
	}
	s.log.Info("CAS scrubber started", "rate_bytes_per_second", rate, "pause", pause)
	buf := make([]byte, scrubChunk)
	start, done := time.Now(), int64(0) // for the rate: bytes hashed since start
	throttle := func(n int) bool {
		done += int64(n)
		wait := time.Until(start.Add(time.Duration(float64(done) / float64(rate) * float64(time.Second))))
		if wait <= 0 {
			return ctx.Err() == nil
		}
		t := time.NewTimer(wait)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
			return true
		}
	}
	for {
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		// Idle time is not credit: the rate holds from the start of a pass.
		start, done = time.Now(), 0
		var blobs []Digest
		s.mu.Lock()
		for el := s.lru.Back(); el != nil; el = el.Prev() {
			e := el.Value.(*entry)
			blobs = append(blobs, Digest{Hash: e.hash, Size: e.size})
		}
		s.mu.Unlock()
		bad := 0
		for _, d := range blobs {
			corrupt, err := s.scrubOne(d, buf, throttle)
			if ctx.Err() != nil {
				return
			}
			if err != nil {
				s.log.Warn("scrub: cannot check blob", "digest", d.String(), "err", err)
			}
			if corrupt {
				bad++
			}
			s.scrub.blobs.Add(1)
		}
		s.scrub.passes.Add(1)
		level := slog.LevelDebug // each corrupt blob was logged as a warning already
		if bad > 0 {
			level = slog.LevelInfo
		}
		s.log.Log(context.Background(), level, "CAS scrub pass done", "blobs", len(blobs), "corrupt", bad, "took", time.Since(start).Round(time.Second))
	}
}

// scrubOne hashes the stored file of d, calling throttle after each chunk
// (it returns false to stop), and quarantines the file if it is bad.
func (s *DiskStore) scrubOne(d Digest, buf []byte, throttle func(int) bool) (corrupt bool, err error) {
	if _, packed, err := s.readPacked(d); packed {
		s.scrub.bytes.Add(d.Size)
		if errors.Is(err, ErrCorrupt) {
			return true, nil
		}
		if err == nil && !throttle(int(d.Size)) {
			return false, nil
		}
		return false, err
	}
	f, err := os.Open(s.blobPath(d.Hash))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return false, nil // evicted or replaced since the walk began
		}
		return false, fmt.Errorf("open blob %s: %w", d, err)
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Size() != d.Size {
		s.corruptErr(d, f, fmt.Sprintf("the file has %d bytes (found by the scrubber)", fi.Size()))
		return true, nil
	}
	r := &verifyingReader{s: s, d: d, f: f, h: sha256.New()}
	for r.pos < d.Size {
		n, err := r.Read(buf[:min(int64(len(buf)), d.Size-r.pos)])
		s.scrub.bytes.Add(int64(n))
		if errors.Is(err, ErrCorrupt) {
			return true, nil
		}
		if err != nil {
			return false, err
		}
		if !throttle(n) {
			return false, nil
		}
	}
	return false, nil
}
