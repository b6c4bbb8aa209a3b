package cas_test

// Benchmarks of the CAS through gRPC on a loopback TCP connection, the way
// Bazel talks to actiond. Each throughput benchmark also hashes the same
// data with SHA-256 in the same run and reports that rate (sha256-MB/s)
// and the ratio of the two: the server must hash everything it stores, so
// SHA-256 on one core is the physical limit. Run with `make bench`:
//
//	go test -run '^$' -bench . -benchtime 3x ./cas/

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/genproto/googleapis/bytestream"
)

// tcpEnv serves a fresh server on 127.0.0.1.
func tcpEnv(b *testing.B, fsync bool) *env {
	return tcpEnvWith(b, actiond.Options{NoFsync: !fsync})
}

// cpuClock measures the CPU time of the whole test process (client and
// server together) while the benchmark timer runs: unlike wall time it
// does not depend on what else the machine is doing.
type cpuClock struct {
	start time.Duration
	total time.Duration
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func (c *cpuClock) Start() { c.start = processCPU() }
func (c *cpuClock) Stop()  { c.total += processCPU() - c.start }

// shaClock measures raw SHA-256 over the same data as the benchmark,
// interleaved with its iterations so that both see the same machine load
// (the timer is stopped while it runs).
type shaClock struct {
	bytes int64
	took  time.Duration
}

func (c *shaClock) hash(bufs ...[]byte) {
	start := time.Now()
	for _, b := range bufs {
		sha256.Sum256(b)
		c.bytes += int64(len(b))
	}
	c.took += time.Since(start)
}

// report adds the raw SHA-256 rate and the ratio of the benchmark's rate
// to it; bytesPerOp must match what c hashed per op.
func (c *shaClock) report(b *testing.B, bytesPerOp int64, cpu *cpuClock) {
	raw := float64(c.bytes) / 1e6 / c.took.Seconds()
	got := float64(bytesPerOp) * float64(b.N) / 1e6 / b.Elapsed().Seconds()
	b.ReportMetric(raw, "sha256-MB/s")
	b.ReportMetric(got/raw, "ratio")
	// CPU per byte of this process against SHA-256's own cost per byte:
	// how many cores' worth of work each byte takes, in units of hashing it.
	cpuPerByte := float64(cpu.total.Nanoseconds()) / float64(bytesPerOp*int64(b.N))
	b.ReportMetric(cpuPerByte*raw/1e3, "cpu/sha256")
}

// clocks time a benchmark three ways at once: b's timer, the process CPU
// (cpuClock) and raw SHA-256 over the same data (shaClock), which runs
// while the other two are stopped.
type clocks struct {
	b   *testing.B
	cpu cpuClock
	sha shaClock
}

// startClocks resets b's timer and starts both timers.
func startClocks(b *testing.B) *clocks {
	c := &clocks{b: b}
	b.ResetTimer()
	c.cpu.Start()
	return c
}

// untimed runs f with both timers stopped.
func (c *clocks) untimed(f func()) {
	c.cpu.Stop()
	c.b.StopTimer()
	f()
	c.b.StartTimer()
	c.cpu.Start()
}

// stop stops both timers for good; report adds the SHA-256 comparison.
func (c *clocks) stop() {
	c.cpu.Stop()
	c.b.StopTimer()
}

func (c *clocks) report(bytesPerOp int64) { c.sha.report(c.b, bytesPerOp, &c.cpu) }

// readCount reads the blob d whole through ByteStream and returns how many
// bytes came, keeping none of them (a 1 GiB blob is read without holding it).
func (e *env) readCount(b *testing.B, d cas.Digest) int64 {
	st, err := e.bs.Read(bg, &bytestream.ReadRequest{ResourceName: "blobs/" + d.String()})
	if err != nil {
		b.Fatal(err)
	}
	var n int64
	for {
		r, err := st.Recv()
		if err == io.EOF {
			return n
		}
		if err != nil {
			b.Fatal(err)
		}
		n += int64(len(r.Data))
	}
}

var sizes = []struct {
	name string
	n    int
}{{"1MiB", 1 << 20}, {"100MiB", 100 << 20}}

// BenchmarkByteStreamWrite uploads distinct blobs in 1 MiB chunks, and
// 100 MiB ones also in Bazel's 16 KiB chunks.
func BenchmarkByteStreamWrite(b *testing.B) {
	type variant struct {
		name  string
		n     int
		chunk int
		fsync bool
	}
	var variants []variant
	for _, sz := range sizes {
		for _, fsync := range []bool{true, false} {
			variants = append(variants, variant{fmt.Sprintf("%s/fsync=%v", sz.name, fsync), sz.n, 1 << 20, fsync})
		}
	}
	variants = append(variants, variant{"100MiB/chunk=16KiB/fsync=false", 100 << 20, 16 << 10, false})
	for _, v := range variants {
		sz, fsync := v, v.fsync
		b.Run(v.name, func(b *testing.B) {
			e := tcpEnv(b, fsync)
			base := data(1, sz.n)
			// Warm the connection (flow-control windows grow with use).
			warm := data(9, sz.n)
			if _, err := e.write(bg, "uploads/warm/blobs/"+cas.DigestOf(warm).String(), warm, 1<<20); err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(sz.n))
			c := startClocks(b)
			for i := 0; i < b.N; i++ {
				blob := base
				var name string
				c.untimed(func() {
					blob[0], blob[1], blob[2], blob[3] = byte(i), byte(i>>8), byte(i>>16), byte(i>>24) // a new blob each time
					name = fmt.Sprintf("uploads/%d/blobs/%s", i, cas.DigestOf(blob))
				})
				if _, err := e.write(bg, name, blob, sz.chunk); err != nil {
					b.Fatal(err)
				}
				c.untimed(func() { c.sha.hash(blob) })
			}
			c.stop()
			c.report(int64(sz.n))
		})
	}
}

// BenchmarkByteStreamRead downloads one blob repeatedly.
func BenchmarkByteStreamRead(b *testing.B) {
	for _, sz := range sizes {
		b.Run(sz.name, func(b *testing.B) {
			e := tcpEnv(b, false)
			blob := data(2, sz.n)
			d := cas.DigestOf(blob)
			if _, err := e.write(bg, "uploads/r/blobs/"+d.String(), blob, 1<<20); err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(sz.n))
			e.readCount(b, d) // warm up
			c := startClocks(b)
			for i := 0; i < b.N; i++ {
				if n := e.readCount(b, d); n != int64(sz.n) {
					b.Fatalf("read %d bytes", n)
				}
				c.untimed(func() { c.sha.hash(blob) })
			}
			c.stop()
			c.report(int64(sz.n))
		})
	}
}

// BenchmarkBatchUpdate10k uploads 10,000 distinct small blobs (100-900
// bytes) per op, in batches under the 4 MiB limit.
func BenchmarkBatchUpdate10k(b *testing.B) {
	for _, fsync := range []bool{true, false} {
		b.Run(fmt.Sprintf("fsync=%v", fsync), func(b *testing.B) {
			e := tcpEnv(b, fsync)
			const count = 10000
			var total int64
			mk := func(round int) []*repb.BatchUpdateBlobsRequest {
				var reqs []*repb.BatchUpdateBlobsRequest
				req := &repb.BatchUpdateBlobsRequest{}
				var size int
				for j := 0; j < count; j++ {
					blob := data(round*count+j, 100+j%800)
					if size+len(blob)+100 > cas.DefaultMaxBatchSize {
						reqs = append(reqs, req)
						req, size = &repb.BatchUpdateBlobsRequest{}, 0
					}
					req.Requests = append(req.Requests, &repb.BatchUpdateBlobsRequest_Request{Digest: cas.DigestOf(blob).Proto(), Data: blob})
					size += len(blob)
				}
				return append(reqs, req)
			}
			for _, req := range mk(-1) {
				for _, r := range req.Requests {
					total += int64(len(r.Data))
				}
			}
			b.SetBytes(total)
			c := startClocks(b)
			for i := 0; i < b.N; i++ {
				var reqs []*repb.BatchUpdateBlobsRequest
				c.untimed(func() { reqs = mk(i) })
				for _, req := range reqs {
					resp, err := e.cas.BatchUpdateBlobs(bg, req)
					if err != nil {
						b.Fatal(err)
					}
					for _, r := range resp.Responses {
						if r.Status.GetCode() != 0 {
							b.Fatal(r.Status)
						}
					}
				}
				c.untimed(func() {
					for _, req := range reqs {
						for _, r := range req.Requests {
							c.sha.hash(r.Data)
						}
					}
				})
			}
			c.stop()
			b.ReportMetric(float64(count)*float64(b.N)/b.Elapsed().Seconds(), "blobs/s")
			c.report(total)
		})
	}
}

// BenchmarkFindMissingBlobs10k looks up 10,000 digests, half of them
// present: through gRPC, and (direct) calling the service method without
// the transport, which separates actiond's own cost from protobuf and
// HTTP/2.
func BenchmarkFindMissingBlobs10k(b *testing.B) {
	e := tcpEnv(b, false)
	req := &repb.FindMissingBlobsRequest{}
	upload := &repb.BatchUpdateBlobsRequest{}
	for j := 0; j < 10000; j++ {
		blob := data(j, 64)
		d := cas.DigestOf(blob)
		req.BlobDigests = append(req.BlobDigests, d.Proto())
		if j%2 == 0 {
			upload.Requests = append(upload.Requests, &repb.BatchUpdateBlobsRequest_Request{Digest: d.Proto(), Data: blob})
		}
	}
	if _, err := e.cas.BatchUpdateBlobs(bg, upload); err != nil {
		b.Fatal(err)
	}
	svc := cas.NewService(e.srv.Store, cas.ServiceOptions{Logger: quietLogger()})
	for _, direct := range []bool{false, true} {
		name := "grpc"
		if direct {
			name = "direct"
		}
		b.Run(name, func(b *testing.B) {
			c := startClocks(b)
			for i := 0; i < b.N; i++ {
				var resp *repb.FindMissingBlobsResponse
				var err error
				if direct {
					resp, err = svc.FindMissingBlobs(bg, req)
				} else {
					resp, err = e.cas.FindMissingBlobs(bg, req)
				}
				if err != nil {
					b.Fatal(err)
				}
				if len(resp.MissingBlobDigests) != 5000 {
					b.Fatalf("%d missing", len(resp.MissingBlobDigests))
				}
			}
			c.stop()
			b.ReportMetric(float64(b.Elapsed().Microseconds())/1000/float64(b.N), "ms/op")
			b.ReportMetric(float64(c.cpu.total.Microseconds())/1000/float64(b.N), "cpu-ms/op")
		})
	}
}

// BenchmarkDiskFsync writes and fsyncs files of the benchmark sizes
// directly: the disk's own limit for durable writes, for comparison.
func BenchmarkDiskFsync(b *testing.B) {
	for _, sz := range sizes {
		b.Run(sz.name, func(b *testing.B) {
			dir := b.TempDir()
			blob := data(3, sz.n)
			b.SetBytes(int64(sz.n))
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				p := filepath.Join(dir, fmt.Sprint(i))
				f, err := os.Create(p)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := f.Write(blob); err != nil {
					b.Fatal(err)
				}
				if err := f.Sync(); err != nil {
					b.Fatal(err)
				}
				f.Close()
			}
		})
	}
}

// BenchmarkVerifiedRead1GiB downloads a 1 GiB blob through ByteStream over
// loopback TCP, rotating between bare reads (what the server did before
// reads were verified: SetVerifyReads off), verified reads hashing on the
// sending goroutine (inline) and verified reads with the hasher on its own
// goroutine (pipelined, what the server does for large blobs), so all see
// the same machine load. Reports each rate, the ratios to bare (goal:
// within 10%) and the process CPU (client and server) per read relative to
// bare: what hashing adds when no core is spare to overlap it. One op is
// one read of each kind.
func BenchmarkVerifiedRead1GiB(b *testing.B) {
	const n = 1 << 30
	e := tcpEnv(b, false)
	blob := data(3, n)
	d := cas.DigestOf(blob)
	if err := e.srv.Store.Put(bg, d, bytes.NewReader(blob)); err != nil {
		b.Fatal(err)
	}
	blob = nil
	e.readCount(b, d) // warm the page cache and the connection
	modes := []struct {
		name           string
		verify, inline bool
	}{{"bare", false, false}, {"inline", true, true}, {"pipelined", true, false}}
	took, cpu := make([]time.Duration, len(modes)), make([]time.Duration, len(modes))
	b.SetBytes(int64(len(modes)) * n)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for j := range modes {
			k := (i + j) % len(modes) // rotate which goes first
			cas.SetVerifyReads(e.srv.DiskStore, modes[k].verify)
			cas.SetInlineHash(e.srv.DiskStore, modes[k].inline)
			start, c0 := time.Now(), processCPU()
			if got := e.readCount(b, d); got != n {
				b.Fatalf("read %d bytes", got)
			}
			took[k] += time.Since(start)
			cpu[k] += processCPU() - c0
		}
	}
	b.StopTimer()
	cas.SetVerifyReads(e.srv.DiskStore, true)
	cas.SetInlineHash(e.srv.DiskStore, false)
	rate := func(k int) float64 { return float64(n) * float64(b.N) / 1e6 / took[k].Seconds() }
	b.ReportMetric(rate(0), "bare-MB/s")
	for k := 1; k < len(modes); k++ {
		b.ReportMetric(rate(k), modes[k].name+"-MB/s")
		b.ReportMetric(rate(k)/rate(0), modes[k].name+"/bare")
		b.ReportMetric(cpu[k].Seconds()/cpu[0].Seconds(), "cpu-"+modes[k].name+"/bare")
	}
}
