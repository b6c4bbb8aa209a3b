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

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
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
	svc := NewService(s, 0, nil)
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
	if got := after.TotalAlloc - before.TotalAlloc; got > 64<<20 {
		t.Errorf("the batch allocated %d MiB for %d entries of a few bytes each; want well under one entry's declared 64 MiB per entry", got>>20, liars)
	}
}
