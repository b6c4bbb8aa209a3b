package cas

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// QuarantineDir is where Verify moves blobs whose content does not match
// their name, relative to the store's directory.
const QuarantineDir = "quarantine"

// Corrupt is a blob whose content does not hash to its name.
type Corrupt struct {
	Hash string // the name it was stored under
	Got  string // what its content hashes to ("" when unreadable)
	Size int64
	// Quarantined is where it was moved ("" if moving failed; see Err).
	Quarantined string
	Err         error // read or move error, if any
}

// VerifyReport summarises a Verify run.
type VerifyReport struct {
	Blobs   int64
	Bytes   int64
	Corrupt []Corrupt
	Took    time.Duration
}

// Verify re-hashes every blob of the disk store in dir (a store not open
// in any process: the caller holds the root's lock) and moves each blob
// whose content does not match its name to dir/quarantine/, so that a
// store opened afterwards reports it missing and clients upload it again.
// It logs progress to log every couple of seconds. The error is for
// failures to walk the store; corrupt blobs are in the report.
func Verify(ctx context.Context, dir string, log *slog.Logger) (*VerifyReport, error) {
	if log == nil {
		log = slog.Default()
	}
	start := time.Now()
	blobDir := filepath.Join(dir, "sha256")
	qdir := filepath.Join(dir, QuarantineDir)
	shards, err := os.ReadDir(blobDir)
	if err != nil {
		return nil, fmt.Errorf("verify %s: %w", dir, err)
	}
	var (
		rep       VerifyReport
		mu        sync.Mutex
		blobs     atomic.Int64
		bytesDone atomic.Int64
		paths     = make(chan string, 256)
		wg        sync.WaitGroup
	)
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, copyBufSize)
			for p := range paths {
				c, n := verifyBlob(p, buf)
				blobs.Add(1)
				bytesDone.Add(n)
				if c == nil {
					continue
				}
				if err := os.MkdirAll(qdir, 0o755); err != nil {
					c.Err = errors.Join(c.Err, fmt.Errorf("create quarantine: %w", err))
				} else if q, err := quarantine(p, qdir, c.Hash); err != nil {
					c.Err = errors.Join(c.Err, err)
				} else {
					c.Quarantined = q
				}
				log.Warn("corrupt blob", "hash", c.Hash, "content_hash", c.Got, "quarantined", c.Quarantined, "err", c.Err)
				mu.Lock()
				rep.Corrupt = append(rep.Corrupt, *c)
				mu.Unlock()
			}
		}()
	}
	lastLog := time.Now()
	var walkErr error
walk:
	for i, shard := range shards {
		if !shard.IsDir() || len(shard.Name()) != 2 {
			continue
		}
		ents, err := os.ReadDir(filepath.Join(blobDir, shard.Name()))
		if err != nil {
			walkErr = fmt.Errorf("verify: read shard: %w", err)
			break
		}
		for _, e := range ents {
			if ctx.Err() != nil {
				walkErr = ctx.Err()
				break walk
			}
			if !e.Type().IsRegular() {
				continue
			}
			paths <- filepath.Join(blobDir, shard.Name(), e.Name())
		}
		if time.Since(lastLog) >= 2*time.Second {
			log.Info("verifying CAS", "shards", fmt.Sprintf("%d/%d", i+1, len(shards)), "blobs", blobs.Load(), "bytes", bytesDone.Load())
			lastLog = time.Now()
		}
	}
	close(paths)
	wg.Wait()
	rep.Blobs, rep.Bytes = blobs.Load(), bytesDone.Load()
	if walkErr == nil {
		walkErr = verifyPacks(ctx, dir, qdir, &rep)
	}
	rep.Took = time.Since(start)
	return &rep, walkErr
}

// verifyBlob hashes the blob at p; it returns nil if its content matches
// its name.
func verifyBlob(p string, buf []byte) (*Corrupt, int64) {
	name := filepath.Base(p)
	f, err := os.Open(p)
	if err != nil {
		return &Corrupt{Hash: name, Err: fmt.Errorf("open blob: %w", err)}, 0
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.CopyBuffer(h, f, buf)
	if err != nil {
		return &Corrupt{Hash: name, Size: n, Err: fmt.Errorf("read blob: %w", err)}, n
	}
	got := hex.EncodeToString(h.Sum(nil))
	if got == name {
		return nil, n
	}
	return &Corrupt{Hash: name, Got: got, Size: n}, n
}

// quarantine moves p into qdir under a name that does not clash with an
// earlier quarantined copy.
func quarantine(p, qdir, hash string) (string, error) {
	for i := 0; ; i++ {
		q := filepath.Join(qdir, hash)
		if i > 0 {
			q = fmt.Sprintf("%s.%d", q, i)
		}
		if _, err := os.Lstat(q); err == nil {
			continue
		} else if !errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("quarantine %s: %w", hash, err)
		}
		if err := os.Rename(p, q); err != nil {
			return "", fmt.Errorf("quarantine %s: %w", hash, err)
		}
		return q, nil
	}
}
