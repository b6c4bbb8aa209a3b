package cas

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/actiond/actiond/internal/grpctest"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// sparseFile makes a file of size bytes that holds no data blocks.
func sparseFile(t *testing.T, dir string, size int64) string {
	t.Helper()
	p := filepath.Join(dir, "sparse")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestPutFileChecksSizeBeforeHashing: a sparse output larger than the
// store's limit is refused by its size, before any byte is hashed (a
// cancelled context proves nothing was read: hashing would fail with it),
// with an error naming the limit, and nothing stored is evicted.
func TestPutFileChecksSizeBeforeHashing(t *testing.T) {
	s := newStore(t, "", WithFsync(false), WithMaxSize(8<<20))
	kept := put(t, s, blob(1, 4<<20))
	p := sparseFile(t, s.TempDir(), 1<<30)
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, err := s.PutFile(cctx, p)
	if !errors.Is(err, ErrNoSpace) || !strings.Contains(err.Error(), "--max-size") || errors.Is(err, context.Canceled) {
		t.Fatalf("PutFile of a 1 GiB sparse file into an 8 MiB store: %v; want ErrNoSpace naming --max-size, decided before hashing", err)
	}
	if !present(t, s, kept) {
		t.Fatal("a stored blob was evicted for a file that was refused")
	}
	checkInvariants(t, s)
}

// TestPutFileHashingHonoursContext: hashing a large file stops when the
// caller's context ends; nothing is stored.
func TestPutFileHashingHonoursContext(t *testing.T) {
	s := newStore(t, "", WithFsync(false))
	p := sparseFile(t, s.TempDir(), 1<<30)
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, err := s.PutFile(cctx, p)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("PutFile with a cancelled context: %v, want context.Canceled", err)
	}
	if st := s.Stats(); st.Blobs != 0 {
		t.Fatalf("%d blobs stored after a cancelled PutFile", st.Blobs)
	}
}

// TestZstdBatchEntryDoesNotPreallocate: entries that declare 64 MiB but
// decode to a few bytes must not make the server allocate 64 MiB each
// before decoding; they fail as mismatches and good entries still land.
func TestZstdBatchEntryDoesNotPreallocate(t *testing.T) {
	s := newStore(t, "", WithFsync(false))
	svc := NewService(s, ServiceOptions{})
	small := zstdEncoder.EncodeAll([]byte("tiny"), nil)
	good := []byte("a good blob")
	req := &repb.BatchUpdateBlobsRequest{}
	const liars = 16
	for i := range liars {
		d := Digest{Hash: fmt.Sprintf("%064x", i+1), Size: maxBatchEntry}
		req.Requests = append(req.Requests, &repb.BatchUpdateBlobsRequest_Request{Digest: d.Proto(), Data: small, Compressor: repb.Compressor_ZSTD})
	}
	gd := DigestOf(good)
	req.Requests = append(req.Requests, &repb.BatchUpdateBlobsRequest_Request{Digest: gd.Proto(), Data: zstdEncoder.EncodeAll(good, nil), Compressor: repb.Compressor_ZSTD})
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	resp, err := svc.BatchUpdateBlobs(ctx, req)
	runtime.ReadMemStats(&after)
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range resp.Responses[:liars] {
		if codes.Code(r.Status.GetCode()) != codes.InvalidArgument {
			t.Errorf("entry %d declaring %d bytes: status %v, want INVALID_ARGUMENT", i, maxBatchEntry, r.Status)
		}
	}
	if r := resp.Responses[liars]; r.Status.GetCode() != 0 || !present(t, s, gd) {
		t.Errorf("the good entry: %v", r.Status)
	}
	t.Logf("the batch allocated %d KiB", (after.TotalAlloc-before.TotalAlloc)>>10)
	if got := after.TotalAlloc - before.TotalAlloc; got > 64<<20 {
		t.Errorf("the batch allocated %d MiB for %d entries of a few bytes each; want well under one entry's declared 64 MiB per entry", got>>20, liars)
	}
}

// byteStreamClient serves svc's ByteStream in process.
func byteStreamClient(t *testing.T, svc *Service) bspb.ByteStreamClient {
	t.Helper()
	g := grpc.NewServer()
	RegisterByteStream(g, svc.ByteStream())
	conn := grpctest.Dial(t, g, grpctest.BufSize)
	t.Cleanup(func() {
		conn.Close()
		g.Stop()
		svc.Close()
	})
	return bspb.NewByteStreamClient(conn)
}

// abandonUpload starts a resumable upload of data, sends its first n bytes
// and goes away without finish_write. It returns the resource name.
func abandonUpload(t *testing.T, bs bspb.ByteStreamClient, data []byte, n int) (string, error) {
	t.Helper()
	d := DigestOf(data)
	name := fmt.Sprintf("uploads/%s/blobs/%s/%d", d.Hash[:12], d.Hash, d.Size)
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := bs.Write(cctx)
	if err != nil {
		return name, err
	}
	for off := 0; off < n; off += 1 << 20 {
		end := min(off+1<<20, n)
		if err := stream.Send(&bspb.WriteRequest{ResourceName: name, WriteOffset: int64(off), Data: data[off:end]}); err != nil {
			return name, err
		}
	}
	// Half-close: the server keeps the upload for a resume and answers.
	_, err = stream.CloseAndRecv()
	if status.Code(err) == codes.InvalidArgument && strings.Contains(err.Error(), "without finish_write") {
		err = nil
	}
	return name, err
}

// TestAbandonedUploadsAreBounded: clients that start resumable uploads and
// go away leave at most the configured number of them, each without
// buffers or a descriptor; the oldest make room for new ones.
func TestAbandonedUploadsAreBounded(t *testing.T) {
	s := newStore(t, "", WithFsync(false))
	svc := NewService(s, ServiceOptions{MaxUploads: 4, MaxUploadBytes: 1 << 30})
	bs := byteStreamClient(t, svc)
	var names []string
	for i := range 10 {
		name, err := abandonUpload(t, bs, blob(100+i, 3<<20), 1<<20+5)
		if err != nil {
			t.Fatalf("upload %d: %v", i, err)
		}
		names = append(names, name)
	}
	svc.uploads.mu.Lock()
	n := len(svc.uploads.m)
	for _, up := range svc.uploads.m {
		w := up.w.(*Writer)
		if w.f != nil || w.buf != nil || w.queue != nil {
			t.Errorf("an idle upload holds a descriptor or buffers (f=%v, buffer %d bytes, writer goroutine %v)", w.f != nil, cap(w.buf), w.queue != nil)
		}
	}
	svc.uploads.mu.Unlock()
	if n > 4 {
		t.Fatalf("%d abandoned uploads are kept; the limit is 4", n)
	}
	if ents, _ := os.ReadDir(s.TempDir()); len(ents) > 4 {
		t.Fatalf("%d upload files in %s; the limit is 4 uploads", len(ents), s.TempDir())
	}
	// The newest is still resumable; the oldest has gone.
	for i, want := range map[int]int64{0: 0, 9: 1<<20 + 5} {
		r, err := bs.QueryWriteStatus(ctx, &bspb.QueryWriteStatusRequest{ResourceName: names[i]})
		if err != nil || r.CommittedSize != want {
			t.Errorf("QueryWriteStatus of upload %d: %v %v, want committed %d", i, r, err, want)
		}
	}
}

// TestUploadsCountAgainstMaxSize: the bytes of unfinished uploads are on
// disk, so they count against the store's size limit like blobs.
func TestUploadsCountAgainstMaxSize(t *testing.T) {
	const limit = 16 << 20
	s := newStore(t, "", WithFsync(false), WithMaxSize(limit))
	svc := NewService(s, ServiceOptions{})
	bs := byteStreamClient(t, svc)
	put(t, s, blob(1, 6<<20))
	put(t, s, blob(2, 6<<20))
	if _, err := abandonUpload(t, bs, blob(3, 12<<20), 10<<20); err != nil {
		t.Fatal(err)
	}
	var tmp int64
	ents, _ := os.ReadDir(s.TempDir())
	for _, e := range ents {
		if fi, err := e.Info(); err == nil {
			tmp += fi.Size()
		}
	}
	if st := s.Stats(); st.Bytes+tmp > limit {
		t.Fatalf("blobs (%d bytes) and unfinished uploads (%d bytes) take more than the %d-byte limit", st.Bytes, tmp, limit)
	}
	checkInvariants(t, s)
}
