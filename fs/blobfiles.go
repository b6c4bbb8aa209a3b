package fs

import (
	"container/list"
	"fmt"
	"os"
	"sync"

	"github.com/actiond/actiond/cas"
)

// blobFiles keeps CAS blob files open for reads, shared by all mounts: a
// blob is opened once however many handles (and actions) read it, and up
// to max unused files stay open for the next action. A cached file stays
// readable even if the store evicts the blob meanwhile (content is
// addressed by hash, so it cannot be stale), except when the store finds
// the file no longer matches its digest: then the store quarantines it and
// tells us (dropQuarantined), so a re-uploaded blob is opened afresh
// instead of reading the bad file through a cached descriptor.
type blobFiles struct {
	store cas.LocalStore
	max   int

	mu    sync.Mutex
	files map[cas.Digest]*blobFile
	idle  *list.List // of *blobFile with refs == 0, most recent at the front
}

type blobFile struct {
	d    cas.Digest
	f    *os.File
	refs int
	elem *list.Element // in idle while refs == 0
	gone bool          // quarantined: close when the last user releases it
}

func newBlobFiles(store cas.LocalStore, max int) *blobFiles {
	b := &blobFiles{store: store, max: max, files: make(map[cas.Digest]*blobFile), idle: list.New()}
	if q, ok := store.(interface{ OnQuarantine(func(cas.Digest)) }); ok {
		q.OnQuarantine(b.dropQuarantined)
	}
	return b
}

// dropQuarantined forgets the open file of d, which the store found bad.
func (b *blobFiles) dropQuarantined(d cas.Digest) {
	b.mu.Lock()
	defer b.mu.Unlock()
	bf, ok := b.files[d]
	if !ok {
		return
	}
	delete(b.files, d)
	if bf.refs == 0 {
		b.idle.Remove(bf.elem)
		bf.elem = nil
		bf.f.Close()
		return
	}
	bf.gone = true
}

// acquire returns the open blob file for d; release it when done.
func (b *blobFiles) acquire(d cas.Digest) (*blobFile, error) {
	b.mu.Lock()
	if bf, ok := b.files[d]; ok {
		if bf.refs == 0 {
			b.idle.Remove(bf.elem)
			bf.elem = nil
		}
		bf.refs++
		b.mu.Unlock()
		return bf, nil
	}
	b.mu.Unlock()
	p, err := b.store.BlobPath(d, false)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if err != nil {
		return nil, fmt.Errorf("open blob %s: %w", d, err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if bf, ok := b.files[d]; ok { // opened concurrently
		f.Close()
		if bf.refs == 0 {
			b.idle.Remove(bf.elem)
			bf.elem = nil
		}
		bf.refs++
		return bf, nil
	}
	bf := &blobFile{d: d, f: f, refs: 1}
	b.files[d] = bf
	return bf, nil
}

// release gives back a file from acquire.
func (b *blobFiles) release(bf *blobFile) {
	b.mu.Lock()
	defer b.mu.Unlock()
	bf.refs--
	if bf.refs > 0 {
		return
	}
	if bf.gone {
		bf.f.Close()
		return
	}
	bf.elem = b.idle.PushFront(bf)
	for b.idle.Len() > b.max {
		el := b.idle.Back()
		old := el.Value.(*blobFile)
		b.idle.Remove(el)
		delete(b.files, old.d)
		old.f.Close()
	}
}

// closeIdle closes every file nobody uses.
func (b *blobFiles) closeIdle() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for el := b.idle.Front(); el != nil; el = el.Next() {
		bf := el.Value.(*blobFile)
		delete(b.files, bf.d)
		bf.f.Close()
	}
	b.idle.Init()
}
