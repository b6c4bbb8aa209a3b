package cas_test

import (
	"fmt"
	"testing"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/cas/castest"
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

// BenchmarkSmallBlobUpload uploads actiondtest's small-blob workload
// (20,000 distinct 200-byte blobs: each its own ByteStream Write, 32 at a
// time, the way Bazel 4 uploads a cold build's inputs; or BatchUpdateBlobs
// of 1,000, 4 at a time). One op uploads all of them (fresh blobs every
// op); reported per blob: wall time (us/blob) and the CPU of the whole
// process, client and server together (cpu-us/blob), for each durability.
//
// The first subject serves castest.MemStore instead of a disk store: the
// cost of gRPC, the services and the client alone, in the same run.
func BenchmarkSmallBlobUpload(b *testing.B) {
	type subject struct {
		name string
		opts func() actiond.Options
	}
	subjects := []subject{{"store=memory", func() actiond.Options { return actiond.Options{Store: castest.NewMemStore()} }}}
	for _, dur := range []cas.Durability{cas.WriteBack, cas.GroupCommit, cas.FsyncEach, cas.NoSync} {
		subjects = append(subjects, subject{"durability=" + dur.String(), func() actiond.Options { return actiond.Options{Durability: dur} }})
	}
	// The same without packs: a file per blob, as before packs.
	for _, dur := range []cas.Durability{cas.WriteBack, cas.GroupCommit} {
		subjects = append(subjects, subject{"durability=" + dur.String() + ",packs=off", func() actiond.Options {
			s, err := cas.NewDiskStore(b.TempDir(), cas.WithDurability(dur), cas.WithSmallBlobPacks(false))
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { s.Close() }) // before its directory goes
			return actiond.Options{Store: s}
		}})
	}
	for i, sub := range subjects {
		for _, method := range []string{"bytestream", "batch"} {
			b.Run(fmt.Sprintf("%s/%s", method, sub.name), func(b *testing.B) {
				e := tcpEnvWith(b, sub.opts())
				var cpu cpuClock
				seed := i << 40
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					blobs := make([][]byte, actiondtest.SmallBlobs)
					for j := range blobs {
						seed++
						blobs[j] = data(seed, actiondtest.SmallBlobSize)
					}
					b.StartTimer()
					cpu.Start()
					var err error
					if method == "bytestream" {
						err = actiondtest.UploadEach(bg, e.bs, blobs, actiondtest.SmallConcurrency)
					} else {
						err = actiondtest.UploadBatches(bg, e.cas, blobs, actiondtest.SmallBatch, actiondtest.SmallBatchPar)
					}
					cpu.Stop()
					if err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				n := float64(b.N * actiondtest.SmallBlobs)
				b.ReportMetric(float64(b.Elapsed().Microseconds())/n, "us/blob")
				b.ReportMetric(float64(cpu.total.Microseconds())/n, "cpu-us/blob")
				b.ReportMetric(0, "ns/op")
				if e.srv.DiskStore == nil {
					return
				}
				if st := e.srv.DiskStore.Stats(); st.SyncRounds > 0 {
					b.ReportMetric(float64(st.SyncWaits)/float64(st.SyncRounds), "waits/syncfs")
				}
			})
		}
	}
}
