package cas_test

// In-process gRPC tests of the CAS and ByteStream services: the real
// actiond.Server on a bufconn listener, driven by the generated clients.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/actiondtest"
	"github.com/actiond/actiond/internal/testutil"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	"google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

var bg = context.Background()

type env struct {
	srv *actiond.Server
	cas repb.ContentAddressableStorageClient
	bs  bytestream.ByteStreamClient
	ac  repb.ActionCacheClient
	// stop shuts the server down (for a restart on the same root); the
	// test's cleanup calls it too, once in all.
	stop func()
}

func quietLogger() *slog.Logger { return actiondtest.Quiet() }

// newEnv starts a server on a fresh root (or the given one).
func newEnv(t testing.TB, opts actiond.Options) *env {
	t.Helper()
	srv, conn, stop := actiondtest.Bufconn(t, opts, 4<<20, grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)))
	return &env{srv: srv, cas: repb.NewContentAddressableStorageClient(conn), bs: bytestream.NewByteStreamClient(conn), ac: repb.NewActionCacheClient(conn), stop: stop}
}

func data(seed, n int) []byte { return testutil.Data(seed, n) }

func wantCode(t testing.TB, err error, code codes.Code, contains ...string) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("got %v; want code %v", err, code)
	}
	for _, c := range contains {
		if !strings.Contains(err.Error(), c) {
			t.Fatalf("error %q does not mention %q", err, c)
		}
	}
}

func (e *env) missing(t testing.TB, ds ...cas.Digest) []cas.Digest {
	t.Helper()
	req := &repb.FindMissingBlobsRequest{}
	for _, d := range ds {
		req.BlobDigests = append(req.BlobDigests, d.Proto())
	}
	resp, err := e.cas.FindMissingBlobs(bg, req)
	if err != nil {
		t.Fatal(err)
	}
	var out []cas.Digest
	for _, pd := range resp.MissingBlobDigests {
		out = append(out, cas.Digest{Hash: pd.Hash, Size: pd.SizeBytes})
	}
	return out
}

func (e *env) has(t testing.TB, d cas.Digest) bool { return len(e.missing(t, d)) == 0 }

func (e *env) upload(t testing.TB, blobs ...[]byte) []cas.Digest {
	t.Helper()
	return actiondtest.Upload(t, e.cas, blobs...)
}

// write uploads data under name in chunks, finishing on the last one.
func (e *env) write(ctx context.Context, name string, data []byte, chunk int) (*bytestream.WriteResponse, error) {
	return actiondtest.WriteBlob(ctx, e.bs, name, data, chunk, 0)
}

func (e *env) read(ctx context.Context, name string, offset, limit int64) ([]byte, error) {
	return actiondtest.ReadBlob(ctx, e.bs, name, offset, limit)
}

func uploadName(d cas.Digest) string {
	return fmt.Sprintf("inst/uploads/%d-%s/blobs/%s", time.Now().UnixNano(), d.Hash[:8], d)
}

func assertNoUploadsLeft(t testing.TB, e *env) {
	t.Helper()
	ents, err := os.ReadDir(e.srv.DiskStore.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) > 0 {
		t.Fatalf("%d files left in tmp/ (%s...)", len(ents), ents[0].Name())
	}
}

func TestFindMissingBlobs(t *testing.T) {
	e := newEnv(t, actiond.Options{})
	ds := e.upload(t, data(1, 10), data(2, 20))
	absent := cas.DigestOf(data(3, 30))
	got := e.missing(t, ds[0], absent, ds[1], cas.EmptyDigest, cas.Digest{Hash: ds[0].Hash, Size: 11})
	if fmt.Sprint(got) != fmt.Sprint([]cas.Digest{absent, {Hash: ds[0].Hash, Size: 11}}) {
		t.Fatalf("missing = %v", got)
	}

	// Malformed digests: the whole request is refused, naming the field.
	for name, pd := range map[string]*repb.Digest{
		"short hash":    {Hash: "abc", SizeBytes: 1},
		"upper case":    {Hash: strings.ToUpper(ds[0].Hash), SizeBytes: 10},
		"non hex":       {Hash: strings.Repeat("g", 64), SizeBytes: 1},
		"negative size": {Hash: ds[0].Hash, SizeBytes: -10},
		"nil":           nil,
	} {
		_, err := e.cas.FindMissingBlobs(bg, &repb.FindMissingBlobsRequest{BlobDigests: []*repb.Digest{ds[0].Proto(), pd}})
		wantCode(t, err, codes.InvalidArgument, "blob_digests[1]")
		var found bool
		for _, d := range status.Convert(err).Details() {
			if br, ok := d.(*errdetails.BadRequest); ok && br.FieldViolations[0].Field == "blob_digests[1]" {
				found = true
			}
		}
		if !found {
			t.Errorf("%s: no BadRequest detail in %v", name, err)
		}
	}
	_, err := e.cas.FindMissingBlobs(bg, &repb.FindMissingBlobsRequest{DigestFunction: repb.DigestFunction_SHA256, BlobDigests: []*repb.Digest{absent.Proto()}})
	if err != nil {
		t.Fatalf("explicit SHA256: %v", err)
	}
}

func TestUnknownDigestFunction(t *testing.T) {
	e := newEnv(t, actiond.Options{})
	d := e.upload(t, data(1, 10))[0]
	for _, f := range []repb.DigestFunction_Value{repb.DigestFunction_SHA1, repb.DigestFunction_BLAKE3, repb.DigestFunction_MD5, repb.DigestFunction_Value(999)} {
		_, err := e.cas.FindMissingBlobs(bg, &repb.FindMissingBlobsRequest{DigestFunction: f, BlobDigests: []*repb.Digest{d.Proto()}})
		wantCode(t, err, codes.InvalidArgument, "digest function")
		_, err = e.cas.BatchUpdateBlobs(bg, &repb.BatchUpdateBlobsRequest{DigestFunction: f})
		wantCode(t, err, codes.InvalidArgument, "digest function")
		_, err = e.cas.BatchReadBlobs(bg, &repb.BatchReadBlobsRequest{DigestFunction: f, Digests: []*repb.Digest{d.Proto()}})
		wantCode(t, err, codes.InvalidArgument, "digest function")
		st, err := e.cas.GetTree(bg, &repb.GetTreeRequest{DigestFunction: f, RootDigest: d.Proto()})
		if err == nil {
			_, err = st.Recv()
		}
		wantCode(t, err, codes.InvalidArgument, "digest function")
	}
}

func TestBatchUpdateBlobs(t *testing.T) {
	e := newEnv(t, actiond.Options{})
	good := data(1, 1000)
	gd := cas.DigestOf(good)
	small := data(2, 100)
	sd := cas.DigestOf(small)
	enc, _ := zstd.NewWriter(nil)
	zdata := data(3, 5000)
	zd := cas.DigestOf(zdata)
	zeros := make([]byte, 1<<20)
	bombDigest := cas.DigestOf(zeros[:1000])
	req := &repb.BatchUpdateBlobsRequest{Requests: []*repb.BatchUpdateBlobsRequest_Request{
		0:  {Digest: gd.Proto(), Data: good},
		1:  {Digest: sd.Proto(), Data: data(9, 100)},                                                // data does not match
		2:  {Digest: &repb.Digest{Hash: sd.Hash, SizeBytes: 50}, Data: small},                       // lying size
		3:  {Digest: &repb.Digest{Hash: sd.Hash, SizeBytes: -100}, Data: small},                     // negative size
		4:  {Digest: &repb.Digest{Hash: "xyz", SizeBytes: 100}, Data: small},                        // bad hash
		5:  {Digest: zd.Proto(), Data: enc.EncodeAll(zdata, nil), Compressor: repb.Compressor_ZSTD}, // compressed
		6:  {Digest: zd.Proto(), Data: []byte("not zstd"), Compressor: repb.Compressor_ZSTD},        // corrupt
		7:  {Digest: bombDigest.Proto(), Data: enc.EncodeAll(zeros, nil), Compressor: repb.Compressor_ZSTD},
		8:  {Digest: sd.Proto(), Data: small, Compressor: repb.Compressor_DEFLATE},
		9:  {Digest: cas.EmptyDigest.Proto()},
		10: {Digest: gd.Proto(), Data: good}, // duplicate
		11: {Digest: &repb.Digest{Hash: zd.Hash, SizeBytes: 1 << 50}, Data: []byte{0x28, 0xb5, 0x2f, 0xfd}, Compressor: repb.Compressor_ZSTD},
		12: {Data: small}, // no digest
	}}
	resp, err := e.cas.BatchUpdateBlobs(bg, req)
	if err != nil {
		t.Fatal(err)
	}
	want := []codes.Code{codes.OK, codes.InvalidArgument, codes.InvalidArgument, codes.InvalidArgument, codes.InvalidArgument,
		codes.OK, codes.InvalidArgument, codes.InvalidArgument, codes.InvalidArgument, codes.OK, codes.OK, codes.InvalidArgument, codes.InvalidArgument}
	if len(resp.Responses) != len(want) {
		t.Fatalf("%d responses", len(resp.Responses))
	}
	for i, r := range resp.Responses {
		if codes.Code(r.Status.GetCode()) != want[i] {
			t.Errorf("request %d: status %v; want %v", i, r.Status, want[i])
		}
		if !proto.Equal(r.Digest, req.Requests[i].Digest) {
			t.Errorf("request %d: response digest %v", i, r.Digest)
		}
	}
	if m := e.missing(t, gd, zd, sd, bombDigest); fmt.Sprint(m) != fmt.Sprint([]cas.Digest{sd, bombDigest}) {
		t.Fatalf("missing after batch = %v", m)
	}
	if got, err := e.read(bg, "blobs/"+zd.String(), 0, 0); err != nil || !bytes.Equal(got, zdata) {
		t.Fatalf("compressed upload reads back wrong: %v", err)
	}

	// Over the limit: refused as a whole, naming the limit.
	var big []*repb.BatchUpdateBlobsRequest_Request
	for i := 0; i < 5; i++ {
		b := data(100+i, 1<<20)
		big = append(big, &repb.BatchUpdateBlobsRequest_Request{Digest: cas.DigestOf(b).Proto(), Data: b})
	}
	_, err = e.cas.BatchUpdateBlobs(bg, &repb.BatchUpdateBlobsRequest{Requests: big})
	wantCode(t, err, codes.InvalidArgument, fmt.Sprint(cas.DefaultMaxBatchSize), "max_batch_total_size_bytes")
	if e.has(t, cas.DigestOf(data(100, 1<<20))) {
		t.Fatal("part of an oversized batch was stored")
	}
	// Exactly at the limit is fine.
	b := data(200, cas.DefaultMaxBatchSize)
	e.upload(t, b)
	assertNoUploadsLeft(t, e)
}

func TestBatchUpdateManySmallBlobs(t *testing.T) {
	e := newEnv(t, actiond.Options{})
	var blobs [][]byte
	for i := 0; i < 3000; i++ {
		blobs = append(blobs, data(i, 100+i%200))
	}
	ds := e.upload(t, blobs...)
	if m := e.missing(t, ds...); len(m) != 0 {
		t.Fatalf("%d missing after upload", len(m))
	}
	assertNoUploadsLeft(t, e)
}

func TestBatchReadBlobs(t *testing.T) {
	e := newEnv(t, actiond.Options{})
	blobs := [][]byte{data(1, 100), data(2, 3000), bytes.Repeat([]byte("compressible "), 1000)}
	ds := e.upload(t, blobs...)
	absent := cas.DigestOf(data(3, 10))
	bogus := cas.Digest{Hash: ds[0].Hash, Size: 0} // size 0, not the empty hash
	req := &repb.BatchReadBlobsRequest{Digests: []*repb.Digest{ds[0].Proto(), absent.Proto(), ds[1].Proto(), cas.EmptyDigest.Proto(), bogus.Proto(), ds[2].Proto()}}
	resp, err := e.cas.BatchReadBlobs(bg, req)
	if err != nil {
		t.Fatal(err)
	}
	want := [][]byte{blobs[0], nil, blobs[1], {}, nil, blobs[2]}
	codesWant := []codes.Code{codes.OK, codes.NotFound, codes.OK, codes.OK, codes.NotFound, codes.OK}
	for i, r := range resp.Responses {
		if codes.Code(r.Status.GetCode()) != codesWant[i] || !proto.Equal(r.Digest, req.Digests[i]) {
			t.Fatalf("response %d: %v %v", i, r.Status, r.Digest)
		}
		if codesWant[i] == codes.OK && (!bytes.Equal(r.Data, want[i]) || r.Compressor != repb.Compressor_IDENTITY) {
			t.Fatalf("response %d: wrong data", i)
		}
	}
	// zstd when the client accepts it.
	req.AcceptableCompressors = []repb.Compressor_Value{repb.Compressor_ZSTD}
	resp, err = e.cas.BatchReadBlobs(bg, req)
	if err != nil {
		t.Fatal(err)
	}
	dec, _ := zstd.NewReader(nil)
	for i, r := range resp.Responses {
		if codesWant[i] != codes.OK {
			continue
		}
		got := r.Data
		if r.Compressor == repb.Compressor_ZSTD {
			if got, err = dec.DecodeAll(r.Data, nil); err != nil {
				t.Fatal(err)
			}
		}
		if !bytes.Equal(got, want[i]) {
			t.Fatalf("response %d: zstd data wrong", i)
		}
	}
	if resp.Responses[5].Compressor != repb.Compressor_ZSTD || len(resp.Responses[5].Data) >= len(blobs[2]) {
		t.Fatal("compressible blob not compressed")
	}

	// Bad input.
	for name, pd := range map[string]*repb.Digest{"bad hash": {Hash: "00", SizeBytes: 1}, "negative": {Hash: ds[0].Hash, SizeBytes: -1}, "nil": nil} {
		_, err := e.cas.BatchReadBlobs(bg, &repb.BatchReadBlobsRequest{Digests: []*repb.Digest{pd}})
		wantCode(t, err, codes.InvalidArgument, "digests[0]")
		_ = name
	}
	// Over the limit, also when the sizes would overflow int64.
	_, err = e.cas.BatchReadBlobs(bg, &repb.BatchReadBlobsRequest{Digests: []*repb.Digest{{Hash: ds[0].Hash, SizeBytes: 3 << 20}, {Hash: ds[1].Hash, SizeBytes: 3 << 20}}})
	wantCode(t, err, codes.InvalidArgument, fmt.Sprint(cas.DefaultMaxBatchSize))
	_, err = e.cas.BatchReadBlobs(bg, &repb.BatchReadBlobsRequest{Digests: []*repb.Digest{{Hash: ds[0].Hash, SizeBytes: 1 << 62}, {Hash: ds[1].Hash, SizeBytes: 1 << 62}, {Hash: ds[1].Hash, SizeBytes: 1 << 62}}})
	wantCode(t, err, codes.InvalidArgument, fmt.Sprint(cas.DefaultMaxBatchSize))
}

// tree builds a directory tree: a root with 5 children with 4 children
// each, and one directory shared by two parents. It returns the Directory
// blobs, the root digest and the directories in breadth-first order.
func tree() (blobs [][]byte, root cas.Digest, bfs []*repb.Directory) {
	marshal := func(d *repb.Directory) (cas.Digest, []byte) {
		b, _ := proto.Marshal(d)
		blobs = append(blobs, b)
		return cas.DigestOf(b), b
	}
	fileDigest := cas.DigestOf([]byte("file"))
	shared := &repb.Directory{Files: []*repb.FileNode{{Name: "shared.txt", Digest: fileDigest.Proto()}}}
	sharedD, _ := marshal(shared)
	rootDir := &repb.Directory{}
	var level1, level2 []*repb.Directory
	for i := 0; i < 5; i++ {
		mid := &repb.Directory{}
		for j := 0; j < 4; j++ {
			leaf := &repb.Directory{Files: []*repb.FileNode{{Name: fmt.Sprintf("f%d-%d", i, j), Digest: fileDigest.Proto()}}}
			ld, _ := marshal(leaf)
			mid.Directories = append(mid.Directories, &repb.DirectoryNode{Name: fmt.Sprintf("d%d", j), Digest: ld.Proto()})
			level2 = append(level2, leaf)
		}
		if i < 2 {
			mid.Directories = append(mid.Directories, &repb.DirectoryNode{Name: "shared", Digest: sharedD.Proto()})
			if i == 0 {
				level2 = append(level2, shared)
			}
		}
		md, _ := marshal(mid)
		rootDir.Directories = append(rootDir.Directories, &repb.DirectoryNode{Name: fmt.Sprintf("m%d", i), Digest: md.Proto()})
		level1 = append(level1, mid)
	}
	root, _ = marshal(rootDir)
	bfs = append(append([]*repb.Directory{rootDir}, level1...), level2...)
	return blobs, root, bfs
}

func (e *env) getTree(t testing.TB, req *repb.GetTreeRequest) ([]*repb.GetTreeResponse, error) {
	t.Helper()
	st, err := e.cas.GetTree(bg, req)
	if err != nil {
		return nil, err
	}
	var out []*repb.GetTreeResponse
	for {
		resp, err := st.Recv()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		out = append(out, resp)
	}
}

func sameDirs(t testing.TB, got, want []*repb.Directory) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d directories; want %d", len(got), len(want))
	}
	for i := range got {
		if !proto.Equal(got[i], want[i]) {
			t.Fatalf("directory %d differs: %v; want %v", i, got[i], want[i])
		}
	}
}

func TestGetTree(t *testing.T) {
	e := newEnv(t, actiond.Options{})
	blobs, root, bfs := tree()
	e.upload(t, blobs...)
	if len(bfs) != 27 {
		t.Fatalf("tree has %d directories", len(bfs))
	}

	// Without a page size: everything in one response.
	resps, err := e.getTree(t, &repb.GetTreeRequest{RootDigest: root.Proto()})
	if err != nil || len(resps) != 1 || resps[0].NextPageToken != "" {
		t.Fatalf("GetTree = %v, %v", resps, err)
	}
	sameDirs(t, resps[0].Directories, bfs)

	// Paged: every page streamed, each with a token but the last.
	resps, err = e.getTree(t, &repb.GetTreeRequest{RootDigest: root.Proto(), PageSize: 7})
	if err != nil {
		t.Fatal(err)
	}
	var all []*repb.Directory
	for i, r := range resps {
		if len(r.Directories) > 7 || (i < len(resps)-1) != (r.NextPageToken != "") {
			t.Fatalf("page %d: %d directories, token %q", i, len(r.Directories), r.NextPageToken)
		}
		all = append(all, r.Directories...)
	}
	if len(resps) != 4 {
		t.Fatalf("%d pages; want 4", len(resps))
	}
	sameDirs(t, all, bfs)

	// Resuming from a token returns that page and the ones after it.
	resps2, err := e.getTree(t, &repb.GetTreeRequest{RootDigest: root.Proto(), PageSize: 7, PageToken: resps[1].NextPageToken})
	if err != nil {
		t.Fatal(err)
	}
	all = nil
	for _, r := range resps2 {
		all = append(all, r.Directories...)
	}
	sameDirs(t, all, bfs[14:])

	// Bad input.
	for _, tok := range []string{"garbage", "offset:-1", "offset:x", "5"} {
		_, err = e.getTree(t, &repb.GetTreeRequest{RootDigest: root.Proto(), PageToken: tok})
		wantCode(t, err, codes.InvalidArgument, "page_token")
	}
	_, err = e.getTree(t, &repb.GetTreeRequest{RootDigest: root.Proto(), PageSize: -1})
	wantCode(t, err, codes.InvalidArgument, "page_size")
	_, err = e.getTree(t, &repb.GetTreeRequest{RootDigest: &repb.Digest{Hash: "nope", SizeBytes: 3}})
	wantCode(t, err, codes.InvalidArgument, "root_digest")
	_, err = e.getTree(t, &repb.GetTreeRequest{})
	wantCode(t, err, codes.InvalidArgument, "root_digest")
	_, err = e.getTree(t, &repb.GetTreeRequest{RootDigest: cas.DigestOf([]byte("absent")).Proto()})
	wantCode(t, err, codes.NotFound)
	notDir := e.upload(t, []byte{0xff, 0xff, 0xff})[0]
	_, err = e.getTree(t, &repb.GetTreeRequest{RootDigest: notDir.Proto()})
	wantCode(t, err, codes.InvalidArgument, "not a Directory")

	// A missing subdirectory is left out; its siblings are not.
	present := &repb.Directory{Files: []*repb.FileNode{{Name: "x", Digest: cas.EmptyDigest.Proto()}}}
	pb, _ := proto.Marshal(present)
	partial := &repb.Directory{Directories: []*repb.DirectoryNode{
		{Name: "a", Digest: cas.DigestOf([]byte("not uploaded")).Proto()},
		{Name: "b", Digest: cas.DigestOf(pb).Proto()},
	}}
	partialBytes, _ := proto.Marshal(partial)
	pd := e.upload(t, pb, partialBytes)[1]
	resps, err = e.getTree(t, &repb.GetTreeRequest{RootDigest: pd.Proto()})
	if err != nil {
		t.Fatal(err)
	}
	sameDirs(t, resps[0].Directories, []*repb.Directory{partial, present})

	// The empty directory is the empty blob.
	resps, err = e.getTree(t, &repb.GetTreeRequest{RootDigest: cas.EmptyDigest.Proto()})
	if err != nil || len(resps) != 1 || len(resps[0].Directories) != 1 {
		t.Fatalf("GetTree(empty) = %v, %v", resps, err)
	}
}

// TestGetTreeLargeDirectories checks that pages stay under the 4 MiB
// default message limit of gRPC clients even without a page size.
func TestGetTreeLargeDirectories(t *testing.T) {
	e := newEnv(t, actiond.Options{})
	var blobs [][]byte
	root := &repb.Directory{}
	var want []*repb.Directory
	for i := 0; i < 40; i++ {
		dir := &repb.Directory{}
		for j := 0; j < 1000; j++ {
			dir.Files = append(dir.Files, &repb.FileNode{Name: fmt.Sprintf("file-%d-%04d-%s", i, j, strings.Repeat("x", 40)), Digest: cas.EmptyDigest.Proto()})
		}
		b, _ := proto.Marshal(dir)
		blobs = append(blobs, b)
		want = append(want, dir)
		root.Directories = append(root.Directories, &repb.DirectoryNode{Name: fmt.Sprintf("d%02d", i), Digest: cas.DigestOf(b).Proto()})
	}
	rb, _ := proto.Marshal(root)
	for i := 0; i < len(blobs); i += 20 {
		e.upload(t, blobs[i:min(i+20, len(blobs))]...)
	}
	rd := e.upload(t, rb)[0]
	resps, err := e.getTree(t, &repb.GetTreeRequest{RootDigest: rd.Proto()})
	if err != nil {
		t.Fatal(err)
	}
	if len(resps) < 2 {
		t.Fatalf("%d pages for %d bytes of directories", len(resps), 40*len(blobs[0]))
	}
	var all []*repb.Directory
	for _, r := range resps {
		if n := proto.Size(r); n >= 4<<20 {
			t.Fatalf("a page of %d bytes", n)
		}
		all = append(all, r.Directories...)
	}
	sameDirs(t, all, append([]*repb.Directory{root}, want...))
}

func TestByteStreamRead(t *testing.T) {
	e := newEnv(t, actiond.Options{})
	blob := data(1, 3<<20+123)
	d := cas.DigestOf(blob)
	if _, err := e.write(bg, uploadName(d), blob, 1<<20); err != nil {
		t.Fatal(err)
	}
	name := "inst/blobs/" + d.String()
	for _, tc := range []struct{ off, limit int64 }{{0, 0}, {1, 0}, {1 << 20, 0}, {0, 10}, {5, 1 << 21}, {d.Size - 1, 0}, {d.Size, 0}, {100, d.Size * 2}} {
		got, err := e.read(bg, name, tc.off, tc.limit)
		want := blob[tc.off:]
		if tc.limit > 0 && tc.limit < int64(len(want)) {
			want = want[:tc.limit]
		}
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("read at %d limit %d: %d bytes, %v; want %d bytes", tc.off, tc.limit, len(got), err, len(want))
		}
	}
	if got, err := e.read(bg, "blobs/"+cas.EmptyDigest.String(), 0, 0); err != nil || len(got) != 0 {
		t.Fatalf("read empty blob = %q, %v", got, err)
	}

	// Compressed reads, from an offset too.
	dec, _ := zstd.NewReader(nil)
	for _, off := range []int64{0, 12345} {
		z, err := e.read(bg, "inst/compressed-blobs/zstd/"+d.String(), off, 0)
		if err != nil {
			t.Fatal(err)
		}
		got, err := dec.DecodeAll(z, nil)
		if err != nil || !bytes.Equal(got, blob[off:]) {
			t.Fatalf("compressed read at %d: %v", off, err)
		}
	}

	// Bad input.
	_, err := e.read(bg, name, d.Size+1, 0)
	wantCode(t, err, codes.OutOfRange)
	_, err = e.read(bg, name, -1, 0)
	wantCode(t, err, codes.InvalidArgument, "read_offset")
	_, err = e.read(bg, name, 0, -1)
	wantCode(t, err, codes.InvalidArgument, "read_limit")
	_, err = e.read(bg, "compressed-blobs/zstd/"+d.String(), 0, 10)
	wantCode(t, err, codes.InvalidArgument, "read_limit")
	_, err = e.read(bg, "blobs/"+cas.DigestOf([]byte("absent")).String(), 0, 0)
	wantCode(t, err, codes.NotFound)
	_, err = e.read(bg, "blobs/"+d.Hash+"/5", 0, 0) // lying size
	wantCode(t, err, codes.NotFound)
	for _, bad := range []string{"", "blobs", "blobs/" + d.Hash, "blobs/" + d.Hash + "/-1", "blobs/xyz/5", "blobs/" + strings.ToUpper(d.Hash) + "/5",
		"blobs/blake3/" + d.String(), "compressed-blobs/lz4/" + d.String(), "uploads/x/blobs/" + d.String(), "actions/blobs/" + d.String()} {
		_, err := e.read(bg, bad, 0, 0)
		wantCode(t, err, codes.InvalidArgument)
	}
}

func TestByteStreamWrite(t *testing.T) {
	e := newEnv(t, actiond.Options{})
	blob := data(1, 2<<20+7)
	d := cas.DigestOf(blob)
	resp, err := e.write(bg, uploadName(d), blob, 256<<10)
	if err != nil || resp.CommittedSize != d.Size {
		t.Fatalf("Write = %v, %v", resp, err)
	}
	if got, _ := e.read(bg, "blobs/"+d.String(), 0, 0); !bytes.Equal(got, blob) {
		t.Fatal("read back differs")
	}
	// Writing a blob that is already there finishes at once with its size.
	resp, err = e.write(bg, uploadName(d), blob, 1024)
	if err != nil || resp.CommittedSize != d.Size {
		t.Fatalf("Write of a present blob = %v, %v", resp, err)
	}
	// The empty blob.
	resp, err = e.write(bg, "uploads/u/blobs/"+cas.EmptyDigest.String(), nil, 1)
	if err != nil || resp.CommittedSize != 0 {
		t.Fatalf("Write(empty) = %v, %v", resp, err)
	}
	// Without an instance name, and with metadata after the size.
	small := data(2, 100)
	sd := cas.DigestOf(small)
	if _, err := e.write(bg, "uploads/x/blobs/"+sd.String()+"/meta", small, 30); err != nil {
		t.Fatal(err)
	}
	if !e.has(t, sd) {
		t.Fatal("not stored")
	}
	assertNoUploadsLeft(t, e)
}

func TestByteStreamWriteBadInput(t *testing.T) {
	e := newEnv(t, actiond.Options{})
	blob := data(1, 100000)
	d := cas.DigestOf(blob)

	// Data that does not match its digest: INVALID_ARGUMENT, nothing stored.
	wrong := append([]byte{}, blob...)
	wrong[5000] ^= 1
	_, err := e.write(bg, uploadName(d), wrong, 30000)
	wantCode(t, err, codes.InvalidArgument, "hashes to")
	// Lying sizes: more data than declared, less data than declared.
	_, err = e.write(bg, uploadName(cas.Digest{Hash: d.Hash, Size: d.Size - 1}), blob, 30000)
	wantCode(t, err, codes.InvalidArgument)
	_, err = e.write(bg, uploadName(cas.Digest{Hash: d.Hash, Size: d.Size + 1}), blob, 30000)
	wantCode(t, err, codes.InvalidArgument)
	// The hash of other data.
	_, err = e.write(bg, uploadName(cas.DigestOf(data(2, 100000))), blob, 30000)
	wantCode(t, err, codes.InvalidArgument)
	if e.has(t, d) {
		t.Fatal("a bad write stored the blob")
	}

	// Bad resource names.
	for _, name := range []string{"", "blobs/" + d.String(), "uploads/u/blobs/" + d.Hash + "/-5", "uploads/u/blobs/" + d.Hash[1:] + "/5",
		"uploads/u/blobs/blake3/" + d.String(), "uploads/u/compressed-blobs/brotli/" + d.String(), "uploads//blobs/" + d.String()} {
		_, err := e.write(bg, name, blob, 50000)
		wantCode(t, err, codes.InvalidArgument)
	}
	// Offsets that do not continue the upload.
	st, _ := e.bs.Write(bg)
	st.Send(&bytestream.WriteRequest{ResourceName: uploadName(d), Data: blob[:10]})
	st.Send(&bytestream.WriteRequest{WriteOffset: 20, Data: blob[20:30]})
	_, err = st.CloseAndRecv()
	wantCode(t, err, codes.InvalidArgument, "write_offset")
	// Starting past 0 on an upload the server does not know.
	st, _ = e.bs.Write(bg)
	st.Send(&bytestream.WriteRequest{ResourceName: uploadName(d), WriteOffset: 10, Data: blob[10:20]})
	_, err = st.CloseAndRecv()
	wantCode(t, err, codes.InvalidArgument, "write_offset")
	// A resource name that changes mid-stream.
	st, _ = e.bs.Write(bg)
	st.Send(&bytestream.WriteRequest{ResourceName: uploadName(d), Data: blob[:10]})
	st.Send(&bytestream.WriteRequest{ResourceName: uploadName(cas.DigestOf(data(3, 9))), WriteOffset: 10, Data: blob[10:20]})
	_, err = st.CloseAndRecv()
	wantCode(t, err, codes.InvalidArgument, "resource_name")
	// A stream with no request at all.
	st, _ = e.bs.Write(bg)
	_, err = st.CloseAndRecv()
	wantCode(t, err, codes.InvalidArgument)

	if e.has(t, d) {
		t.Fatal("a bad write stored the blob")
	}
	e.srv.Close() // aborts the uploads kept for resuming
	assertNoUploadsLeft(t, e)
}

func (e *env) committed(t testing.TB, name string) (int64, bool) {
	t.Helper()
	r, err := e.bs.QueryWriteStatus(bg, &bytestream.QueryWriteStatusRequest{ResourceName: name})
	if err != nil {
		t.Fatal(err)
	}
	return r.CommittedSize, r.Complete
}

// resume writes data[from:] under name, retrying while the interrupted
// stream still holds the upload (ABORTED), as clients do.
func (e *env) resume(t testing.TB, name string, blob []byte, from int64) *bytestream.WriteResponse {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := e.bs.Write(bg)
		if err != nil {
			t.Fatal(err)
		}
		st.Send(&bytestream.WriteRequest{ResourceName: name, WriteOffset: from, Data: blob[from:], FinishWrite: true})
		resp, err := st.CloseAndRecv()
		if status.Code(err) == codes.Aborted && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if err != nil {
			t.Fatalf("resume at %d: %v", from, err)
		}
		return resp
	}
}

func TestByteStreamResumableWrite(t *testing.T) {
	e := newEnv(t, actiond.Options{})
	blob := data(1, 1<<20)
	d := cas.DigestOf(blob)
	half := int64(len(blob) / 2)

	t.Run("interrupted", func(t *testing.T) {
		name := uploadName(d)
		if c, done := e.committed(t, name); c != 0 || done {
			t.Fatalf("unknown upload: committed %d, complete %v", c, done)
		}
		ctx, cancel := context.WithCancel(bg)
		st, _ := e.bs.Write(ctx)
		for off := int64(0); off < half; off += 64 << 10 {
			if err := st.Send(&bytestream.WriteRequest{ResourceName: name, WriteOffset: off, Data: blob[off:min(off+64<<10, half)]}); err != nil {
				t.Fatal(err)
			}
		}
		// Wait until the server has it all, then drop the connection mid-upload.
		for deadline := time.Now().Add(10 * time.Second); ; {
			if c, _ := e.committed(t, name); c == half {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("server never received the first half")
			}
			time.Sleep(5 * time.Millisecond)
		}
		cancel()
		if e.has(t, d) {
			t.Fatal("half an upload is visible")
		}
		c, done := e.committed(t, name)
		if c != half || done {
			t.Fatalf("QueryWriteStatus after interruption: %d, %v", c, done)
		}
		if resp := e.resume(t, name, blob, c); resp.CommittedSize != d.Size {
			t.Fatalf("resumed write: %v", resp)
		}
		if got, _ := e.read(bg, "blobs/"+d.String(), 0, 0); !bytes.Equal(got, blob) {
			t.Fatal("resumed blob differs")
		}
		if c, done := e.committed(t, name); c != d.Size || !done {
			t.Fatalf("QueryWriteStatus after completion: %d, %v", c, done)
		}
	})

	t.Run("half-closed without finish_write", func(t *testing.T) {
		blob := data(2, 300000)
		d := cas.DigestOf(blob)
		name := uploadName(d)
		st, _ := e.bs.Write(bg)
		st.Send(&bytestream.WriteRequest{ResourceName: name, Data: blob[:100000]})
		_, err := st.CloseAndRecv()
		wantCode(t, err, codes.InvalidArgument, "finish_write")
		if c, _ := e.committed(t, name); c != 100000 {
			t.Fatalf("committed %d", c)
		}
		// A wrong resume offset is refused and the upload kept.
		st, _ = e.bs.Write(bg)
		st.Send(&bytestream.WriteRequest{ResourceName: name, WriteOffset: 50000, Data: blob[50000:], FinishWrite: true})
		_, err = st.CloseAndRecv()
		wantCode(t, err, codes.InvalidArgument, "write_offset")
		if resp := e.resume(t, name, blob, 100000); resp.CommittedSize != d.Size {
			t.Fatalf("resume: %v", resp)
		}
		if !e.has(t, d) {
			t.Fatal("not stored")
		}
	})

	t.Run("restart from zero", func(t *testing.T) {
		blob := data(3, 200000)
		d := cas.DigestOf(blob)
		name := uploadName(d)
		st, _ := e.bs.Write(bg)
		st.Send(&bytestream.WriteRequest{ResourceName: name, Data: data(4, 1000)}) // garbage start
		st.CloseAndRecv()
		if resp := e.resume(t, name, blob, 0); resp.CommittedSize != d.Size {
			t.Fatalf("restart: %v", resp)
		}
	})

	_, err := e.bs.QueryWriteStatus(bg, &bytestream.QueryWriteStatusRequest{ResourceName: "blobs/" + d.String()})
	wantCode(t, err, codes.InvalidArgument)
	assertNoUploadsLeft(t, e)
}

func TestByteStreamConcurrentWritesOfOneBlob(t *testing.T) {
	e := newEnv(t, actiond.Options{})
	blob := data(1, 3<<20)
	d := cas.DigestOf(blob)
	const clients = 4
	const chunk = 256 << 10
	streams := make([]bytestream.ByteStream_WriteClient, clients)
	names := make([]string, clients)
	for i := range streams {
		streams[i], _ = e.bs.Write(bg)
		names[i] = fmt.Sprintf("uploads/client-%d/blobs/%s", i, d)
	}
	// Interleave the chunks of all clients so every upload is in flight
	// at once; then all finish.
	for off := 0; off < len(blob); off += chunk {
		for i, st := range streams {
			req := &bytestream.WriteRequest{WriteOffset: int64(off), Data: blob[off : off+chunk], FinishWrite: off+chunk == len(blob)}
			if off == 0 {
				req.ResourceName = names[i]
			}
			if err := st.Send(req); err != nil && err != io.EOF {
				t.Fatal(err)
			}
		}
		if off == len(blob)/2 && e.has(t, d) {
			t.Fatal("visible before any upload finished")
		}
	}
	var wg sync.WaitGroup
	for i, st := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := st.CloseAndRecv()
			if err != nil || resp.CommittedSize != d.Size {
				t.Errorf("client %d: %v, %v", i, resp, err)
			}
		}()
	}
	wg.Wait()
	if got, _ := e.read(bg, "blobs/"+d.String(), 0, 0); !bytes.Equal(got, blob) {
		t.Fatal("blob differs")
	}

	// Two streams on the same upload name at once: the second is told to
	// come back later, and the first still completes.
	blob2 := data(2, 100000)
	d2 := cas.DigestOf(blob2)
	name := uploadName(d2)
	first, _ := e.bs.Write(bg)
	first.Send(&bytestream.WriteRequest{ResourceName: name, Data: blob2[:1000]})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if c, _ := e.committed(t, name); c == 1000 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("first stream never arrived")
		}
	}
	second, _ := e.bs.Write(bg)
	second.Send(&bytestream.WriteRequest{ResourceName: name, WriteOffset: 1000, Data: blob2[1000:], FinishWrite: true})
	_, err := second.CloseAndRecv()
	wantCode(t, err, codes.Aborted)
	first.Send(&bytestream.WriteRequest{WriteOffset: 1000, Data: blob2[1000:], FinishWrite: true})
	if resp, err := first.CloseAndRecv(); err != nil || resp.CommittedSize != d2.Size {
		t.Fatalf("first stream: %v, %v", resp, err)
	}
	assertNoUploadsLeft(t, e)
}

// TestByteStreamConcurrentDifferentBlobs writes many blobs in parallel
// with reads and lookups; with -race it checks the upload bookkeeping.
func TestByteStreamConcurrentDifferentBlobs(t *testing.T) {
	e := newEnv(t, actiond.Options{})
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			blob := data(100+i, 100000+i*1000)
			d := cas.DigestOf(blob)
			name := uploadName(d)
			if _, err := e.write(bg, name, blob, 8000); err != nil {
				t.Error(err)
				return
			}
			e.bs.QueryWriteStatus(bg, &bytestream.QueryWriteStatusRequest{ResourceName: name})
			if got, err := e.read(bg, "blobs/"+d.String(), 0, 0); err != nil || !bytes.Equal(got, blob) {
				t.Errorf("blob %d: %v", i, err)
			}
		}()
	}
	wg.Wait()
	assertNoUploadsLeft(t, e)
}

func TestByteStreamCompressedWrite(t *testing.T) {
	e := newEnv(t, actiond.Options{})
	enc, _ := zstd.NewWriter(nil)
	blob := append(data(1, 500000), bytes.Repeat([]byte("abc"), 300000)...)
	d := cas.DigestOf(blob)
	z := enc.EncodeAll(blob, nil)
	resp, err := e.write(bg, "inst/uploads/z1/compressed-blobs/zstd/"+d.String(), z, 50000)
	if err != nil {
		t.Fatal(err)
	}
	// committed_size is what the client sent (Bazel checks it).
	if resp.CommittedSize != int64(len(z)) {
		t.Fatalf("committed_size %d; want %d", resp.CommittedSize, len(z))
	}
	if got, _ := e.read(bg, "blobs/"+d.String(), 0, 0); !bytes.Equal(got, blob) {
		t.Fatal("blob differs")
	}
	// Already present: -1, as REAPI says for compressed uploads.
	resp, err = e.write(bg, "uploads/z2/compressed-blobs/zstd/"+d.String(), z, 50000)
	if err != nil || resp.CommittedSize != -1 {
		t.Fatalf("compressed write of a present blob: %v, %v", resp, err)
	}

	// Corrupt stream, content of another blob, a bomb, a resume offset.
	other := data(2, 100000)
	od := cas.DigestOf(other)
	corrupt := enc.EncodeAll(other, nil)
	corrupt = append(corrupt[:len(corrupt)/2], bytes.Repeat([]byte{0x55}, 1000)...)
	_, err = e.write(bg, "uploads/z3/compressed-blobs/zstd/"+od.String(), corrupt, 10000)
	wantCode(t, err, codes.InvalidArgument)
	_, err = e.write(bg, "uploads/z4/compressed-blobs/zstd/"+od.String(), enc.EncodeAll(data(3, 100000), nil), 10000)
	wantCode(t, err, codes.InvalidArgument)
	_, err = e.write(bg, "uploads/z5/compressed-blobs/zstd/"+od.String(), enc.EncodeAll(make([]byte, 50<<20), nil), 10000)
	wantCode(t, err, codes.InvalidArgument)
	_, err = e.write(bg, "uploads/z6/compressed-blobs/zstd/"+od.String(), []byte("not zstd at all"), 10000)
	wantCode(t, err, codes.InvalidArgument)
	st, _ := e.bs.Write(bg)
	st.Send(&bytestream.WriteRequest{ResourceName: "uploads/z7/compressed-blobs/zstd/" + od.String(), WriteOffset: 10, Data: corrupt[:10]})
	_, err = st.CloseAndRecv()
	wantCode(t, err, codes.InvalidArgument, "write_offset")
	if e.has(t, od) {
		t.Fatal("bad compressed upload stored")
	}
	// An interrupted compressed upload is restarted from 0.
	if c, done := e.committed(t, "uploads/z8/compressed-blobs/zstd/"+od.String()); c != 0 || done {
		t.Fatalf("QueryWriteStatus(compressed) = %d, %v", c, done)
	}
	assertNoUploadsLeft(t, e)
}

func TestStoreErrorsMapToCodes(t *testing.T) {
	for _, tc := range []struct {
		err  error
		code codes.Code
	}{
		{fmt.Errorf("x: %w", cas.ErrNotFound), codes.NotFound},
		{fmt.Errorf("x: %w", cas.ErrDigestMismatch), codes.InvalidArgument},
		{fmt.Errorf("x: %w", cas.ErrInvalidDigest), codes.InvalidArgument},
		{fmt.Errorf("x: %w", cas.ErrInvalidResource), codes.InvalidArgument},
		{fmt.Errorf("x: %w", cas.ErrNoSpace), codes.ResourceExhausted},
		{context.Canceled, codes.Canceled},
		{context.DeadlineExceeded, codes.DeadlineExceeded},
		{status.Error(codes.Aborted, "as is"), codes.Aborted},
		{errors.New("other"), codes.Internal},
	} {
		if got := status.Code(cas.ToStatus(tc.err)); got != tc.code {
			t.Errorf("ToStatus(%v) = %v; want %v", tc.err, got, tc.code)
		}
	}
	if cas.ToStatus(nil) != nil {
		t.Error("ToStatus(nil) != nil")
	}
}
