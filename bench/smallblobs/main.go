// Command smallblobs uploads the small-blob workload of a cold Bazel 4
// build (internal/actiondtest: 20,000 distinct 200-byte blobs, each its
// own ByteStream Write, 32 at a time; then the same number through
// BatchUpdateBlobs) to a running server, and reports the wall time per
// blob. It is how uploads into `serve-vm` are measured, where the
// in-process Go benchmark (BenchmarkSmallBlobUpload in cas/) cannot reach:
//
//	go run ./cmd/actiond serve-vm --listen 127.0.0.1:8980 &
//	go run ./bench/smallblobs --addr 127.0.0.1:8980 --rounds 3
package main

import (
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/actiond/actiond/internal/actiondtest"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8980", "server address (host:port)")
	rounds := flag.Int("rounds", 3, "rounds of each method (fresh blobs every round)")
	n := flag.Int("blobs", actiondtest.SmallBlobs, "blobs per round")
	flag.Parse()
	if err := run(*addr, *rounds, *n); err != nil {
		fmt.Fprintln(os.Stderr, "smallblobs:", err)
		os.Exit(1)
	}
}

func run(addr string, rounds, n int) error {
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20), grpc.MaxCallSendMsgSize(64<<20)))
	if err != nil {
		return err
	}
	defer cc.Close()
	bs, cas := bytestream.NewByteStreamClient(cc), repb.NewContentAddressableStorageClient(cc)
	ctx := context.Background()
	for r := 1; r <= rounds; r++ {
		for _, method := range []string{"bytestream", "batch"} {
			blobs := make([][]byte, n)
			for i := range blobs {
				blobs[i] = make([]byte, actiondtest.SmallBlobSize)
				rand.Read(blobs[i])
			}
			start := time.Now()
			if method == "bytestream" {
				err = actiondtest.UploadEach(ctx, bs, blobs, actiondtest.SmallConcurrency)
			} else {
				err = actiondtest.UploadBatches(ctx, cas, blobs, actiondtest.SmallBatch, actiondtest.SmallBatchPar)
			}
			if err != nil {
				return fmt.Errorf("round %d, %s: %w", r, method, err)
			}
			took := time.Since(start)
			fmt.Printf("round %d %-10s %d blobs in %v: %.1f us/blob\n", r, method, n, took.Round(time.Millisecond), float64(took.Microseconds())/float64(n))
		}
	}
	return nil
}
