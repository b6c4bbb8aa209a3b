package cas

import (
	"slices"
	"sync"
)

// GetTree pages are resumed from a page token: a client whose stream broke
// asks again from where it got to. Resuming by walking from the root again
// reads every directory before the token once more, for every resume; a
// 40k-directory tree resumed page by page is quadratic. treeWalks keeps,
// for a few recently paged trees, how far their walk got, so a resume
// reads only the directories from the token on.

// Bounds of the walks kept: a walk is its directories' digests in walk
// order (about 100 bytes each), so at most maxWalkDirs of them in all.
const (
	maxWalks    = 16
	maxWalkDirs = 1 << 17
)

// treeWalk is the state of a breadth-first walk of one tree: order lists
// every directory found so far, in the order GetTree lists them (page
// tokens are positions in it); the first read of them have been read, so
// everything they name is in order too.
type treeWalk struct {
	root  Digest
	order []Digest
	read  int
}

// treeWalks is a small most-recently-used set of walks, by root.
type treeWalks struct {
	mu    sync.Mutex
	walks []*treeWalk // most recently used last
	dirs  int
}

// resume returns a copy of the walk of root that can continue from
// position pos, or nil when none is kept.
func (w *treeWalks) resume(root Digest, pos int) *treeWalk {
	w.mu.Lock()
	defer w.mu.Unlock()
	for i, tw := range w.walks {
		if tw.root == root && pos <= tw.read && pos < len(tw.order) {
			w.walks = append(slices.Delete(w.walks, i, i+1), tw)
			// Clipped: the resumed walk appends to its own array.
			return &treeWalk{root: root, order: slices.Clip(tw.order), read: tw.read}
		}
	}
	return nil
}

// keep stores tw as the walk of its root, replacing an older one, and
// forgets the least recently used walks beyond the bounds.
func (w *treeWalks) keep(tw *treeWalk) {
	if len(tw.order) > maxWalkDirs {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for i, old := range w.walks {
		if old.root == tw.root {
			if old.read > tw.read {
				return // a walk that got further is already kept
			}
			w.dirs -= len(old.order)
			w.walks = slices.Delete(w.walks, i, i+1)
			break
		}
	}
	w.walks = append(w.walks, tw)
	w.dirs += len(tw.order)
	for len(w.walks) > maxWalks || w.dirs > maxWalkDirs {
		w.dirs -= len(w.walks[0].order)
		w.walks = slices.Delete(w.walks, 0, 1)
	}
}
