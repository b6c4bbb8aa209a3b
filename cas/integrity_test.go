package cas_test

// Blobs that no longer match their digest (issue 15, issue 11 defect 9):
// the real server in-process, the stored file changed behind its back the
// three ways a disk, a person or a power loss change one.

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/testutil"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	"google.golang.org/grpc/codes"
)

// corruptions are the ways a stored blob goes bad.
var corruptions = testutil.Corruptions

// corruptBlob changes the stored file of d under root the way kind says.
func corruptBlob(t testing.TB, root string, d cas.Digest, kind string) {
	t.Helper()
	testutil.CorruptBlob(t, root, d.Hash, kind)
}

func quarantined(t testing.TB, root string, d cas.Digest) bool {
	t.Helper()
	_, err := os.Stat(filepath.Join(root, "cas", cas.QuarantineDir, d.Hash))
	return err == nil
}

// checkHealed asserts d is reported missing, takes a re-upload (the way a
// client answers MISSING) and then serves the right bytes again.
func (e *env) checkHealed(t testing.TB, root string, d cas.Digest, good []byte) {
	t.Helper()
	if !quarantined(t, root, d) {
		t.Errorf("corrupt blob %s was not moved to %s", d, cas.QuarantineDir)
	}
	if e.has(t, d) {
		t.Fatalf("FindMissingBlobs reports corrupt blob %s present", d)
	}
	if _, err := e.write(bg, uploadName(d), good, 1<<20); err != nil {
		t.Fatalf("re-upload: %v", err)
	}
	got, err := e.read(bg, "blobs/"+d.String(), 0, 0)
	if err != nil || !bytes.Equal(got, good) {
		t.Fatalf("read after re-upload: %d bytes, %v; want the %d good bytes", len(got), err, len(good))
	}
	if !e.has(t, d) {
		t.Fatalf("blob %s missing after re-upload", d)
	}
}

func TestCorruptBlobByteStreamRead(t *testing.T) {
	for _, kind := range corruptions {
		for _, size := range []int{1000, 3<<20 + 17, 9<<20 + 1} {
			t.Run(kind+"/"+sizeName(size), func(t *testing.T) {
				root := t.TempDir()
				e := newEnv(t, actiond.Options{Root: root, NoFsync: true})
				good := data(size, size)
				d := cas.DigestOf(good)
				if _, err := e.write(bg, uploadName(d), good, 1<<20); err != nil {
					t.Fatal(err)
				}
				corruptBlob(t, root, d, kind)
				got, err := e.read(bg, "blobs/"+d.String(), 0, 0)
				wantCode(t, err, codes.DataLoss, d.Hash)
				if len(got) >= size {
					t.Fatalf("a DATA_LOSS read still delivered %d bytes, the whole blob", len(got))
				}
				if n := e.srv.DiskStore.Stats().Quarantined; n != 1 {
					t.Errorf("Stats().Quarantined = %d, want 1", n)
				}
				e.checkHealed(t, root, d, good)
			})
		}
	}
}

func sizeName(n int) string {
	switch {
	case n > 4<<20:
		return "pipelined"
	case n > 1<<20:
		return "multi-chunk"
	}
	return "small"
}

func TestCorruptBlobPartialAndCompressedReads(t *testing.T) {
	root := t.TempDir()
	e := newEnv(t, actiond.Options{Root: root, NoFsync: true})
	good := data(7, 6<<20+5)
	d := cas.DigestOf(good)
	for _, tc := range []struct {
		name          string
		off, limit    int64
		compressedRes bool
	}{{"offset", 12345, 0, false}, {"limit", 0, 100, false}, {"offset+limit", 1 << 20, 4096, false}, {"zstd", 0, 0, true}, {"zstd-offset", 777, 0, true}} {
		t.Run(tc.name, func(t *testing.T) {
			if !e.has(t, d) {
				if _, err := e.write(bg, uploadName(d), good, 1<<20); err != nil {
					t.Fatal(err)
				}
			}
			corruptBlob(t, root, d, "flip")
			name := "blobs/" + d.String()
			if tc.compressedRes {
				name = "compressed-blobs/zstd/" + d.String()
			}
			got, err := e.read(bg, name, tc.off, tc.limit)
			wantCode(t, err, codes.DataLoss)
			if tc.compressedRes {
				dec, _ := zstd.NewReader(nil)
				plain, _ := dec.DecodeAll(got, nil)
				if int64(len(plain)) >= d.Size-tc.off {
					t.Fatalf("a DATA_LOSS compressed read still decoded to %d bytes", len(plain))
				}
			}
			if e.has(t, d) {
				t.Fatalf("FindMissingBlobs reports corrupt blob present")
			}
			os.RemoveAll(filepath.Join(root, "cas", cas.QuarantineDir))
		})
	}
}

func TestCorruptBlobBatchRead(t *testing.T) {
	for _, kind := range corruptions {
		t.Run(kind, func(t *testing.T) {
			root := t.TempDir()
			e := newEnv(t, actiond.Options{Root: root, NoFsync: true})
			good, other := data(1, 5000), data(2, 300)
			ds := e.upload(t, good, other)
			corruptBlob(t, root, ds[0], kind)
			resp, err := e.cas.BatchReadBlobs(bg, &repb.BatchReadBlobsRequest{Digests: []*repb.Digest{ds[0].Proto(), ds[1].Proto()}})
			if err != nil {
				t.Fatal(err)
			}
			if c := codes.Code(resp.Responses[0].Status.GetCode()); c != codes.DataLoss || len(resp.Responses[0].Data) != 0 {
				t.Fatalf("corrupt entry: code %v with %d bytes; want DATA_LOSS and no data", c, len(resp.Responses[0].Data))
			}
			if r := resp.Responses[1]; r.Status.GetCode() != 0 || !bytes.Equal(r.Data, other) {
				t.Fatalf("good entry: %v", r.Status)
			}
			e.checkHealed(t, root, ds[0], good)
		})
	}
}

// An ActionResult whose output went bad stops being served once the bad
// blob is found, so a client runs the action again instead of downloading
// a DATA_LOSS forever.
func TestCorruptBlobActionResult(t *testing.T) {
	root := t.TempDir()
	e := newEnv(t, actiond.Options{Root: root, NoFsync: true})
	out := data(3, 4000)
	ds := e.upload(t, out)
	action := cas.DigestOf([]byte("action"))
	res := &repb.ActionResult{OutputFiles: []*repb.OutputFile{{Path: "out", Digest: ds[0].Proto()}}}
	if _, err := e.ac.UpdateActionResult(bg, &repb.UpdateActionResultRequest{ActionDigest: action.Proto(), ActionResult: res}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.ac.GetActionResult(bg, &repb.GetActionResultRequest{ActionDigest: action.Proto()}); err != nil {
		t.Fatal(err)
	}
	corruptBlob(t, root, ds[0], "same-size")
	_, err := e.read(bg, "blobs/"+ds[0].String(), 0, 0)
	wantCode(t, err, codes.DataLoss)
	_, err = e.ac.GetActionResult(bg, &repb.GetActionResultRequest{ActionDigest: action.Proto()})
	wantCode(t, err, codes.NotFound)
	e.checkHealed(t, root, ds[0], out)
	if _, err := e.ac.GetActionResult(bg, &repb.GetActionResultRequest{ActionDigest: action.Proto()}); err != nil {
		t.Fatalf("after the heal: %v", err)
	}

	// After a restart nothing is trusted: the lookup itself hashes the
	// output once, finds it bad and answers NOT_FOUND, so the client runs
	// the action instead of downloading a blob that fails with DATA_LOSS.
	e.stop()
	corruptBlob(t, root, ds[0], "flip")
	os.RemoveAll(filepath.Join(root, "cas", cas.QuarantineDir))
	e = newEnv(t, actiond.Options{Root: root, NoFsync: true})
	_, err = e.ac.GetActionResult(bg, &repb.GetActionResultRequest{ActionDigest: action.Proto()})
	wantCode(t, err, codes.NotFound)
	e.checkHealed(t, root, ds[0], out)
	if _, err := e.ac.GetActionResult(bg, &repb.GetActionResultRequest{ActionDigest: action.Proto()}); err != nil {
		t.Fatalf("after the second heal: %v", err)
	}
}

// Issue 11 defect 9: a blob truncated on disk (--no-fsync and a power loss)
// was still indexed by hash, so every re-upload was dropped as "already
// present" and clients looped on MISSING.
func TestTruncatedBlobReuploadHeals(t *testing.T) {
	for _, restart := range []bool{false, true} {
		name := "running"
		if restart {
			name = "after-restart"
		}
		t.Run(name, func(t *testing.T) {
			root := t.TempDir()
			e := newEnv(t, actiond.Options{Root: root, NoFsync: true})
			good := data(5, 2<<20+3)
			small := data(6, 700)
			d, ds := cas.DigestOf(good), cas.DigestOf(small)
			if _, err := e.write(bg, uploadName(d), good, 1<<20); err != nil {
				t.Fatal(err)
			}
			e.upload(t, small)
			corruptBlob(t, root, d, "truncate")
			corruptBlob(t, root, ds, "truncate")
			if restart {
				e.stop()
				e = newEnv(t, actiond.Options{Root: root, NoFsync: true})
			}
			// What a client does on MISSING: upload, then use the blob.
			if _, err := e.write(bg, uploadName(d), good, 1<<20); err != nil {
				t.Fatal(err)
			}
			e.upload(t, small)
			for _, c := range []struct {
				d    cas.Digest
				want []byte
			}{{d, good}, {ds, small}} {
				got, err := e.read(bg, "blobs/"+c.d.String(), 0, 0)
				if err != nil || !bytes.Equal(got, c.want) {
					t.Fatalf("read %s after re-upload: %d bytes, %v; want %d good bytes", c.d, len(got), err, len(c.want))
				}
				if !e.has(t, c.d) {
					t.Fatalf("%s missing after re-upload", c.d)
				}
			}
		})
	}
}
