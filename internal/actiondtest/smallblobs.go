package actiondtest

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/genproto/googleapis/bytestream"
)

// Small-blob uploads the way Bazel 4 makes them on a cold build, for the
// benchmarks of the CAS on the host and through the VM (one workload, so
// their numbers compare): every blob its own ByteStream Write, many at a
// time; or BatchUpdateBlobs requests.
const (
	SmallBlobs       = 20000
	SmallBlobSize    = 200
	SmallConcurrency = 32 // ByteStream Writes in flight
	SmallBatch       = 1000
	SmallBatchPar    = 4 // BatchUpdateBlobs requests in flight
)

// UploadEach writes every blob with its own ByteStream Write that sends
// it in one message, concurrency at a time, and checks each answer.
func UploadEach(ctx context.Context, bs bytestream.ByteStreamClient, blobs [][]byte, concurrency int) error {
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, concurrency)
	for w := 0; w < concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= len(blobs) {
					return
				}
				if err := writeOnce(ctx, bs, blobs[i]); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}

// writeOnce uploads blob in one WriteRequest that finishes the write.
func writeOnce(ctx context.Context, bs bytestream.ByteStreamClient, blob []byte) error {
	d := cas.DigestOf(blob)
	resp, err := WriteBlob(ctx, bs, fmt.Sprintf("uploads/bench/blobs/%s/%d", d.Hash, d.Size), blob, len(blob), 0)
	if err != nil {
		return err
	}
	if resp.CommittedSize != d.Size {
		return fmt.Errorf("blob %s: committed %d bytes", d, resp.CommittedSize)
	}
	return nil
}

// UploadBatches sends blobs in BatchUpdateBlobs requests of per blobs,
// par at a time, and checks every blob's status.
func UploadBatches(ctx context.Context, c repb.ContentAddressableStorageClient, blobs [][]byte, per, par int) error {
	var wg sync.WaitGroup
	errs := make(chan error, len(blobs)/per+1)
	sem := make(chan struct{}, par)
	for start := 0; start < len(blobs); start += per {
		req := &repb.BatchUpdateBlobsRequest{}
		for _, blob := range blobs[start:min(start+per, len(blobs))] {
			req.Requests = append(req.Requests, &repb.BatchUpdateBlobsRequest_Request{Digest: cas.DigestOf(blob).Proto(), Data: blob})
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			resp, err := c.BatchUpdateBlobs(ctx, req)
			if err != nil {
				errs <- err
				return
			}
			for _, r := range resp.Responses {
				if r.Status.GetCode() != 0 {
					errs <- fmt.Errorf("blob %s: %v", r.Digest.GetHash(), r.Status)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}
