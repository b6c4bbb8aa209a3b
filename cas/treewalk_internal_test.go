package cas

import (
	"fmt"
	"testing"
)

// TestTreeWalksAreBounded: the walks GetTree keeps for resuming are few
// and small, whatever clients ask for.
func TestTreeWalksAreBounded(t *testing.T) {
	var w treeWalks
	walk := func(i, n int) *treeWalk {
		tw := &treeWalk{root: DigestOf(fmt.Appendf(nil, "root %d", i)), read: n}
		for j := range n {
			tw.order = append(tw.order, DigestOf(fmt.Appendf(nil, "%d/%d", i, j)))
		}
		return tw
	}
	for i := range 3 * maxWalks {
		w.keep(walk(i, 10))
	}
	if len(w.walks) != maxWalks {
		t.Fatalf("%d walks kept; at most %d", len(w.walks), maxWalks)
	}
	if w.resume(walk(0, 10).root, 5) != nil || w.resume(walk(3*maxWalks-1, 10).root, 5) == nil {
		t.Fatal("the least recently used walks should be the ones forgotten")
	}
	w.keep(walk(1000, maxWalkDirs+1))
	if w.resume(walk(1000, 1).root, 0) != nil {
		t.Fatal("a walk larger than maxWalkDirs was kept")
	}
	for i := range 4 {
		w.keep(walk(2000+i, maxWalkDirs/3))
	}
	if w.dirs > maxWalkDirs {
		t.Fatalf("%d directories kept; at most %d", w.dirs, maxWalkDirs)
	}
	// A resume cannot start past what the walk has read.
	tw := walk(3000, 10)
	tw.read = 4
	w.keep(tw)
	if w.resume(tw.root, 5) != nil || w.resume(tw.root, 4) == nil {
		t.Fatal("resume must start within the part of the walk already read")
	}
}
