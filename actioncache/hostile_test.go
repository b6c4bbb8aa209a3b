package actioncache

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/grpctest"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// observedStore is a real disk store that records how it is used: reads
// per digest and the largest FindMissing call (the disk store holds its
// index lock for a whole call).
type observedStore struct {
	*cas.DiskStore
	mu          sync.Mutex
	reads       map[cas.Digest]int
	maxFindCall int
}

func (s *observedStore) Get(ctx context.Context, d cas.Digest, off int64) (io.ReadCloser, error) {
	s.mu.Lock()
	s.reads[d]++
	s.mu.Unlock()
	return s.DiskStore.Get(ctx, d, off)
}

func (s *observedStore) FindMissing(ctx context.Context, ds []cas.Digest) ([]cas.Digest, error) {
	s.mu.Lock()
	s.maxFindCall = max(s.maxFindCall, len(ds))
	s.mu.Unlock()
	return s.DiskStore.FindMissing(ctx, ds)
}

type hostileEnv struct {
	store *observedStore
	cache *BoltCache
	svc   *Service
	ac    repb.ActionCacheClient
	cas   repb.ContentAddressableStorageClient
}

func newHostileEnv(t *testing.T) *hostileEnv {
	t.Helper()
	root := t.TempDir()
	ds, err := cas.NewDiskStore(filepath.Join(root, "cas"), cas.WithFsync(false))
	if err != nil {
		t.Fatal(err)
	}
	store := &observedStore{DiskStore: ds, reads: map[cas.Digest]int{}}
	cache, err := Open(filepath.Join(root, "ac.db"), store)
	if err != nil {
		t.Fatal(err)
	}
	svc := NewService(cache, store, ServiceOptions{})
	g := grpc.NewServer(grpc.MaxRecvMsgSize(64 << 20))
	repb.RegisterActionCacheServer(g, svc)
	repb.RegisterContentAddressableStorageServer(g, cas.NewService(ds, cas.ServiceOptions{}))
	conn := grpctest.Dial(t, g, grpctest.BufSize)
	t.Cleanup(func() {
		conn.Close()
		g.Stop()
		cache.Close()
	})
	return &hostileEnv{store: store, cache: cache, svc: svc, ac: repb.NewActionCacheClient(conn), cas: repb.NewContentAddressableStorageClient(conn)}
}

// bigTree stores n distinct small files and a Tree holding them all.
func (e *hostileEnv) bigTree(t *testing.T, tag string, n int) cas.Digest {
	t.Helper()
	var blobs []cas.Blob
	root := &repb.Directory{}
	for i := range n {
		data := []byte(fmt.Sprintf("%s file %d\n", tag, i))
		d := cas.DigestOf(data)
		blobs = append(blobs, cas.Blob{Digest: d, Data: data})
		root.Files = append(root.Files, &repb.FileNode{Name: fmt.Sprintf("f%07d", i), Digest: d.Proto()})
	}
	data, err := proto.Marshal(&repb.Tree{Root: root})
	if err != nil {
		t.Fatal(err)
	}
	td := cas.DigestOf(data)
	blobs = append(blobs, cas.Blob{Digest: td, Data: data})
	for _, err := range e.store.PutBatch(context.Background(), blobs) {
		if err != nil {
			t.Fatal(err)
		}
	}
	return td
}

func amplifying(tree cas.Digest, dirs int) *repb.ActionResult {
	res := &repb.ActionResult{}
	for i := range dirs {
		res.OutputDirectories = append(res.OutputDirectories, &repb.OutputDirectory{Path: fmt.Sprintf("out%d", i), TreeDigest: tree.Proto()})
	}
	return res
}

// TestAmplifyingResultIsCheckedOnce: 200 output directories naming one
// 40k-file Tree. The completeness check reads the Tree once per lookup
// (not 200 times), and never hands the store's index more than a chunk of
// digests at a time, while another client's FindMissingBlobs completes.
func TestAmplifyingResultIsCheckedOnce(t *testing.T) {
	e := newHostileEnv(t)
	tree := e.bigTree(t, "amp", 40000)
	kept := cas.DigestOf([]byte("amp file 7\n"))
	action := cas.DigestOf([]byte("amplifying action")).Proto()
	ctx := context.Background()
	if _, err := e.ac.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{ActionDigest: action, ActionResult: amplifying(tree, 200)}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 3 {
		wg.Go(func() {
			if _, err := e.ac.GetActionResult(ctx, &repb.GetActionResultRequest{ActionDigest: action}); err != nil {
				t.Errorf("GetActionResult: %v", err)
			}
		})
	}
	wg.Go(func() {
		fctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		r, err := e.cas.FindMissingBlobs(fctx, &repb.FindMissingBlobsRequest{BlobDigests: []*repb.Digest{kept.Proto()}})
		if err != nil || len(r.MissingBlobDigests) != 0 {
			t.Errorf("FindMissingBlobs alongside: %v %v", err, r.GetMissingBlobDigests())
		}
	})
	wg.Wait()
	e.store.mu.Lock()
	defer e.store.mu.Unlock()
	// One read for UpdateActionResult's check, one per lookup.
	if got := e.store.reads[tree]; got > 4 {
		t.Errorf("the Tree was read %d times for one update and 3 lookups; want at most once each", got)
	}
	if e.store.maxFindCall > findMissingChunk {
		t.Errorf("one FindMissing call checked %d digests under the store's lock; want at most %d", e.store.maxFindCall, findMissingChunk)
	}
	if m, _ := e.store.DiskStore.FindMissing(ctx, []cas.Digest{tree, kept}); len(m) != 0 {
		t.Errorf("stored blobs were lost: %v", m)
	}
}

// TestOversizeResultIsRefused: a result referencing more distinct blobs
// (or more Tree bytes) than the limits is refused at UpdateActionResult
// with INVALID_ARGUMENT naming the limit, and one stored before the limits
// is a cache miss, not a slow hit.
func TestOversizeResultIsRefused(t *testing.T) {
	e := newHostileEnv(t)
	e.svc.SetLimits(Limits{MaxBlobs: 1000, MaxTreeBytes: 1 << 20})
	e.cache.SetLimits(Limits{MaxBlobs: 1000, MaxTreeBytes: 1 << 20})
	ctx := context.Background()
	a := e.bigTree(t, "a", 600)
	b := e.bigTree(t, "b", 600)
	action := cas.DigestOf([]byte("oversize action")).Proto()
	res := &repb.ActionResult{OutputDirectories: []*repb.OutputDirectory{{Path: "a", TreeDigest: a.Proto()}, {Path: "b", TreeDigest: b.Proto()}}}
	_, err := e.ac.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{ActionDigest: action, ActionResult: res})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "1000 distinct blobs") {
		t.Fatalf("UpdateActionResult of a result with 1,200 files: %v, want INVALID_ARGUMENT naming the limit of 1000", err)
	}
	// As if stored before the limit: a miss.
	ad, _ := cas.FromProto(action)
	if err := e.cache.Put(ctx, ad, res); err != nil {
		t.Fatal(err)
	}
	if _, err := e.ac.GetActionResult(ctx, &repb.GetActionResultRequest{ActionDigest: action}); status.Code(err) != codes.NotFound {
		t.Fatalf("GetActionResult of an oversize stored result: %v, want NOT_FOUND", err)
	}
	// Within the limits: accepted and a hit.
	small := &repb.ActionResult{OutputDirectories: []*repb.OutputDirectory{{Path: "a", TreeDigest: a.Proto()}, {Path: "a2", TreeDigest: a.Proto()}}}
	if _, err := e.ac.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{ActionDigest: action, ActionResult: small}); err != nil {
		t.Fatalf("a result naming one 600-file Tree twice: %v", err)
	}
	if _, err := e.ac.GetActionResult(ctx, &repb.GetActionResultRequest{ActionDigest: action}); err != nil {
		t.Fatalf("GetActionResult: %v", err)
	}
}
