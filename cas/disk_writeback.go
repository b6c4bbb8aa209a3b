// Write-back durability: blobs are acknowledged once the kernel has them,
// a background flusher makes them durable a moment later, and a checkpoint
// file says up to when everything is durable, on which boot, so that after
// a power loss only the blobs of the last moments need hashing.

package cas

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	// writebackInterval is how often the flusher syncs the store's file
	// system while blobs are being written: what a power loss can take
	// from acknowledged blobs under WriteBack.
	writebackInterval = time.Second
	// checkpointFile, in the store's directory, records the last flush.
	checkpointFile = "writeback.json"
)

// ctimeSlack widens the window of blobs checked after a power loss: file
// timestamps come from the kernel's coarse clock (up to a tick behind the
// time the flusher read), and it covers small clock steps. A variable for
// tests.
var ctimeSlack = 2 * time.Second

// syncCheckpoint is what checkpointFile holds.
type syncCheckpoint struct {
	// BootID is the kernel's boot ID when it was written: on the same
	// boot, whatever a dead server wrote is still in the page cache (a
	// kill -9 loses nothing); on another, anything not flushed may be gone.
	BootID string `json:"boot_id"`
	// SyncedThrough: every blob placed before it was on disk when the
	// checkpoint was written.
	SyncedThrough time.Time `json:"synced_through"`
	// Clean is set by Close, after the last flush: nothing is unflushed.
	Clean bool `json:"clean"`
	// PackID and PackEnd say which pack records the flush covered:
	// every record of an older pack, and those of pack PackID that end
	// at or before PackEnd (see packMark).
	PackID  uint64 `json:"pack_id,omitempty"`
	PackEnd int64  `json:"pack_end,omitempty"`
}

// checkpointFault, set by tests, is what writing a checkpoint fails with
// (a full disk, say).
var checkpointFault error

// bootID returns the running kernel's boot ID ("" where unknown: then
// every unclean stop is treated as a possible power loss). A variable so
// that tests can pretend to reboot.
var bootID = readBootID

// writeback is the state of the flusher under WriteBack.
type writeback struct {
	// flushMu orders flushes (the flusher's, Close's): each takes its
	// mark and writes its checkpoint after the previous one, so the
	// checkpoint never moves back, and they never share the temp file.
	flushMu sync.Mutex
	dirty   atomic.Bool // a blob was placed since the last flush began
	rounds  atomic.Uint64
	stop    chan struct{}
	done    chan struct{}
}

// readCheckpoint returns the store's checkpoint, or nil if it has none.
func (s *DiskStore) readCheckpoint() (*syncCheckpoint, error) {
	b, err := os.ReadFile(filepath.Join(s.dir, checkpointFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read write-back checkpoint: %w", err)
	}
	var cp syncCheckpoint
	if err := json.Unmarshal(b, &cp); err != nil {
		// A checkpoint that cannot be read says nothing about what is
		// durable: check everything, as after a power loss since the
		// beginning of time.
		s.log.Warn("unreadable write-back checkpoint: checking every blob", "path", filepath.Join(s.dir, checkpointFile), "err", err)
		return &syncCheckpoint{}, nil
	}
	return &cp, nil
}

// writeCheckpoint replaces the checkpoint; its content is synced before
// the rename, so the name never shows a torn file. With durableName the
// rename is synced too: the checkpoint written at start-up must be on
// disk before any blob is acknowledged without a flush, or a power loss
// could leave the previous run's clean mark. A later checkpoint whose
// rename is lost leaves an earlier one, which only widens the check (and
// the next flush's syncfs makes the rename durable anyway).
func (s *DiskStore) writeCheckpoint(cp syncCheckpoint, durableName bool) error {
	if checkpointFault != nil {
		return checkpointFault
	}
	b, err := json.Marshal(cp)
	if err != nil {
		return err
	}
	tmp := filepath.Join(s.dir, checkpointFile+"."+s.tmpPrefix)
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("write write-back checkpoint: %w", err)
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(s.dir, checkpointFile))
	}
	if err == nil && durableName {
		err = fsyncDir(s.dir)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write write-back checkpoint: %w", err)
	}
	return nil
}

// uncheckedSince reads the checkpoint a previous run left and returns the
// time from which blobs must be hashed before they are trusted (zero:
// none). After an unclean stop on this boot it flushes instead: the page
// cache still holds what that run wrote.
func (s *DiskStore) uncheckedSince() (cp *syncCheckpoint, since time.Time, err error) {
	cp, err = s.readCheckpoint()
	if err != nil || cp == nil || cp.Clean {
		return cp, time.Time{}, err
	}
	if id := bootID(); id != "" && id == cp.BootID {
		if err := syncFS(s.blobDir); err != nil {
			return cp, time.Time{}, fmt.Errorf("flush blobs of the previous run: %w", err)
		}
		return cp, time.Time{}, nil
	}
	since = cp.SyncedThrough.Add(-ctimeSlack)
	if cp.SyncedThrough.IsZero() {
		since = time.Unix(0, 1) // everything
	}
	return cp, since, nil
}

// checkUnflushed hashes the blobs a power loss may have damaged (placed
// after the last flush before an unclean stop on another boot): the bad
// ones are quarantined, so FindMissing reports them missing and clients
// upload them again instead of relying on them.
func (s *DiskStore) checkUnflushed(recent []Digest, since time.Time) error {
	if len(recent) == 0 {
		s.log.Info("CAS: unclean stop before a reboot; no blob was placed after the last flush", "synced_through", since.Add(ctimeSlack))
		return nil
	}
	var bytes int64
	for _, d := range recent {
		bytes += d.Size
	}
	start := time.Now()
	s.log.Info("CAS: unclean stop before a reboot; hashing the blobs placed after the last flush", "blobs", len(recent), "bytes", bytes, "synced_through", since.Add(ctimeSlack))
	corrupt, err := s.VerifyBlobs(context.Background(), recent)
	if err != nil {
		return fmt.Errorf("check blobs written after the last flush: %w", err)
	}
	s.log.Info("CAS: checked the blobs placed after the last flush", "blobs", len(recent), "damaged", len(corrupt), "took", time.Since(start).Round(time.Millisecond))
	return nil
}

// startWriteBack flushes what is there, records the checkpoint that marks
// this run unclean, and starts the flusher.
func (s *DiskStore) startWriteBack() error {
	at := time.Now()
	mark := s.packMark()
	if err := syncFS(s.blobDir); err != nil {
		return fmt.Errorf("flush CAS: %w", err)
	}
	if err := s.writeCheckpoint(syncCheckpoint{BootID: bootID(), SyncedThrough: at, PackID: mark.id, PackEnd: mark.end}, true); err != nil {
		return err
	}
	wb := &writeback{stop: make(chan struct{}), done: make(chan struct{})}
	s.wb = wb
	go s.flushLoop(wb)
	return nil
}

// flushLoop flushes every writebackInterval while blobs are being placed.
func (s *DiskStore) flushLoop(wb *writeback) {
	defer close(wb.done)
	t := time.NewTicker(writebackInterval)
	defer t.Stop()
	for {
		select {
		case <-wb.stop:
			return
		case <-t.C:
		}
		if wb.dirty.Swap(false) {
			if err := s.flush(false); err != nil {
				wb.dirty.Store(true) // retried next tick
				s.log.Warn("CAS: write-back flush failed; retrying", "err", err)
			}
		}
	}
}

// flush makes every blob placed so far durable and records it.
func (s *DiskStore) flush(clean bool) error {
	s.wb.flushMu.Lock()
	defer s.wb.flushMu.Unlock()
	at := time.Now()
	mark := s.packMark() // before the sync: what it is sure to cover
	if err := syncFS(s.blobDir); err != nil {
		return fmt.Errorf("flush CAS: %w", err)
	}
	s.wb.rounds.Add(1)
	return s.writeCheckpoint(syncCheckpoint{BootID: bootID(), SyncedThrough: at, Clean: clean, PackID: mark.id, PackEnd: mark.end}, false)
}

// placed notes that a blob was placed without waiting for the disk.
func (s *DiskStore) placed() {
	if s.wb != nil {
		s.wb.dirty.Store(true)
	}
}

// Close flushes what write-back has not and marks the store clean, so the
// next start checks nothing. A store that is not closed (a crash) is
// checked at the next start only after a reboot. Close is for the end: the
// store must not be used after it.
func (s *DiskStore) Close() error {
	s.stopCompactions() // before the last flush: nothing is written after it
	defer s.closePacks()
	wb := s.wb
	if wb == nil {
		return nil
	}
	select {
	case <-wb.stop:
		return nil // already closed
	default:
	}
	close(wb.stop)
	<-wb.done
	return s.flush(true)
}

// readBootID reads the kernel's boot ID.
func readBootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}
