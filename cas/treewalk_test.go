package cas_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/grpctest"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
)

// countingStore counts the blobs read from a disk store.
type countingStore struct {
	*cas.DiskStore
	gets atomic.Int64
}

func (s *countingStore) Get(ctx context.Context, d cas.Digest, offset int64) (io.ReadCloser, error) {
	s.gets.Add(1)
	return s.DiskStore.Get(ctx, d, offset)
}

// TestGetTreeResumesWithoutReadingFromTheRoot: resuming GetTree from a
// page token used to walk the tree from the root again, reading every
// directory before the token; a client resuming page after page read the
// tree quadratically. A resume now reads only the directories it lists.
func TestGetTreeResumesWithoutReadingFromTheRoot(t *testing.T) {
	disk, err := cas.NewDiskStore(filepath.Join(t.TempDir(), "cas"), cas.WithFsync(false))
	if err != nil {
		t.Fatal(err)
	}
	store := &countingStore{DiskStore: disk}
	put := func(m proto.Message) cas.Digest {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		d := cas.DigestOf(b)
		if err := disk.Put(bg, d, bytes.NewReader(b)); err != nil {
			t.Fatal(err)
		}
		return d
	}
	// 1 + 10 + 100 directories, all different.
	root := &repb.Directory{}
	var level2 []*repb.Directory
	for i := range 10 {
		mid := &repb.Directory{}
		for j := range 10 {
			leaf := &repb.Directory{Symlinks: []*repb.SymlinkNode{{Name: "l", Target: fmt.Sprintf("%d/%d", i, j)}}}
			level2 = append(level2, leaf)
			mid.Directories = append(mid.Directories, &repb.DirectoryNode{Name: fmt.Sprintf("d%d", j), Digest: put(leaf).Proto()})
		}
		root.Directories = append(root.Directories, &repb.DirectoryNode{Name: fmt.Sprintf("d%d", i), Digest: put(mid).Proto()})
	}
	rd := put(root)

	g := grpc.NewServer()
	repb.RegisterContentAddressableStorageServer(g, cas.NewService(store, cas.ServiceOptions{Logger: quietLogger()}))
	defer g.Stop()
	conn := grpctest.Dial(t, g, grpctest.BufSize)
	defer conn.Close()
	e := &env{cas: repb.NewContentAddressableStorageClient(conn)}

	resps, err := e.getTree(t, &repb.GetTreeRequest{RootDigest: rd.Proto(), PageSize: 10})
	if err != nil {
		t.Fatal(err)
	}
	if len(resps) != 12 {
		t.Fatalf("%d pages of 10 for 111 directories; want 12", len(resps))
	}
	// Resume each of the last pages in turn, as a client whose streams keep
	// breaking would.
	for page := 5; page < 12; page++ {
		store.gets.Store(0)
		got, err := e.getTree(t, &repb.GetTreeRequest{RootDigest: rd.Proto(), PageSize: 10, PageToken: resps[page-1].NextPageToken})
		if err != nil {
			t.Fatal(err)
		}
		var dirs []*repb.Directory
		for _, r := range got {
			dirs = append(dirs, r.Directories...)
		}
		sameDirs(t, dirs, level2[page*10-11:]) // positions: root 0, level 1 at 1-10, leaves from 11
		if n, want := store.gets.Load(), int64(len(dirs)); n != want {
			t.Fatalf("resuming at page %d read %d directories to list %d", page, n, want)
		}
	}
}
