package cas_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/actiondtest"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// tcpEnvWith serves a fresh server made with opts on 127.0.0.1.
func tcpEnvWith(b *testing.B, opts actiond.Options) *env {
	b.Helper()
	srv, addr := actiondtest.TCP(b, opts)
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20), grpc.MaxCallSendMsgSize(64<<20)))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close() })
	return &env{srv: srv, cas: repb.NewContentAddressableStorageClient(conn), bs: bytestream.NewByteStreamClient(conn)}
}

// Small-blob uploads the way Bazel 4 makes them on a cold build: 20,000
// distinct 200-byte blobs, each one ByteStream Write, 32 at a time; and the
// same blobs through BatchUpdateBlobs (1,000 per request, 4 requests at a
// time). One op uploads all 20,000 (fresh blobs every op); reported per
// blob: wall time (us/blob) and the CPU of the whole process, client and
// server together (cpu-us/blob), for each durability.
const (
	smallBlobs       = 20000
	smallBlobSize    = 200
	smallConcurrency = 32
	smallBatch       = 1000
	smallBatchPar    = 4
)

func BenchmarkSmallBlobUpload(b *testing.B) {
	for _, dur := range []cas.Durability{cas.GroupCommit, cas.FsyncEach, cas.NoSync} {
		for _, method := range []string{"bytestream", "batch"} {
			b.Run(fmt.Sprintf("%s/durability=%s", method, dur), func(b *testing.B) {
				e := tcpEnvWith(b, actiond.Options{Durability: dur})
				var cpu cpuClock
				var seed atomic.Int64
				seed.Store(int64(dur) << 40)
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					blobs := make([][]byte, smallBlobs)
					for j := range blobs {
						blobs[j] = data(int(seed.Add(1)), smallBlobSize)
					}
					b.StartTimer()
					cpu.Start()
					if method == "bytestream" {
						uploadEach(b, e, blobs)
					} else {
						uploadBatches(b, e, blobs)
					}
					cpu.Stop()
				}
				b.StopTimer()
				n := float64(b.N * smallBlobs)
				b.ReportMetric(float64(b.Elapsed().Microseconds())/n, "us/blob")
				b.ReportMetric(float64(cpu.total.Microseconds())/n, "cpu-us/blob")
				b.ReportMetric(0, "ns/op")
				if st := e.srv.DiskStore.Stats(); st.SyncRounds > 0 {
					b.ReportMetric(float64(st.SyncWaits)/float64(st.SyncRounds), "waits/syncfs")
				}
			})
		}
	}
}

// uploadEach writes every blob with its own ByteStream Write, the way
// Bazel 4 uploads inputs, smallConcurrency at a time.
func uploadEach(b *testing.B, e *env, blobs [][]byte) {
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, smallConcurrency)
	for w := 0; w < smallConcurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= len(blobs) {
					return
				}
				if err := writeOnce(e, blobs[i]); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
}

// writeOnce uploads blob in one WriteRequest that finishes the write.
func writeOnce(e *env, blob []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	d := cas.DigestOf(blob)
	stream, err := e.bs.Write(ctx)
	if err != nil {
		return err
	}
	name := fmt.Sprintf("uploads/bench/blobs/%s/%d", d.Hash, d.Size)
	if err := stream.Send(&bytestream.WriteRequest{ResourceName: name, Data: blob, FinishWrite: true}); err != nil {
		return err
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return err
	}
	if resp.CommittedSize != d.Size {
		return fmt.Errorf("committed %d of %d bytes", resp.CommittedSize, d.Size)
	}
	return nil
}

// uploadBatches sends blobs in BatchUpdateBlobs requests of smallBatch,
// smallBatchPar at a time.
func uploadBatches(b *testing.B, e *env, blobs [][]byte) {
	var wg sync.WaitGroup
	errs := make(chan error, len(blobs)/smallBatch+1)
	sem := make(chan struct{}, smallBatchPar)
	for start := 0; start < len(blobs); start += smallBatch {
		req := &repb.BatchUpdateBlobsRequest{}
		for _, blob := range blobs[start:min(start+smallBatch, len(blobs))] {
			req.Requests = append(req.Requests, &repb.BatchUpdateBlobsRequest_Request{Digest: cas.DigestOf(blob).Proto(), Data: blob})
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			resp, err := e.cas.BatchUpdateBlobs(bg, req)
			if err != nil {
				errs <- err
				return
			}
			for _, r := range resp.Responses {
				if r.Status.GetCode() != 0 {
					errs <- fmt.Errorf("%s: %v", r.Digest.GetHash(), r.Status)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
}
