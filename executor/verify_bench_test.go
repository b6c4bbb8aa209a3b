package executor_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/internal/testutil"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"
)

// unverifiedStore is the DiskStore without its cas.Verifier side: an
// executor over it stages inputs the way it did before inputs were
// verified.
type unverifiedStore struct{ s *cas.DiskStore }

func (u unverifiedStore) FindMissing(ctx context.Context, ds []cas.Digest) ([]cas.Digest, error) {
	return u.s.FindMissing(ctx, ds)
}
func (u unverifiedStore) Get(ctx context.Context, d cas.Digest, off int64) (io.ReadCloser, error) {
	return u.s.Get(ctx, d, off)
}
func (u unverifiedStore) Put(ctx context.Context, d cas.Digest, r io.Reader) error {
	return u.s.Put(ctx, d, r)
}
func (u unverifiedStore) PutFile(ctx context.Context, p string) (cas.Digest, error) {
	return u.s.PutFile(ctx, p)
}
func (u unverifiedStore) BlobPath(d cas.Digest, exec bool) (string, error) {
	return u.s.BlobPath(d, exec)
}
func (u unverifiedStore) Pin(ds []cas.Digest) func() { return u.s.Pin(ds) }
func (u unverifiedStore) LocalPath(ctx context.Context, d cas.Digest, exec bool) (string, error) {
	return u.s.LocalPath(ctx, d, exec)
}
func (u unverifiedStore) VerifyBlobs(context.Context, []cas.Digest) ([]cas.Digest, error) {
	return nil, nil // no verification: what this store is for
}

// BenchmarkExecuteInputVerification runs a trivial action (/bin/true with
// n input files, skip_cache_lookup) through two executors over the same
// store, sandbox and hardlink input root, alternating: one verifies inputs
// (what actiond does), one does not (before). The inputs were written
// through the store, so they carry the verified mark: this is the steady
// state cost, a map lookup per input. Reports the median latency of each
// and their ratio (goal: within 3%).
func BenchmarkExecuteInputVerification(b *testing.B) {
	testutil.RequireRoot(b)
	for _, n := range []int{0, 100, 2000} {
		b.Run(fmt.Sprintf("inputs=%d", n), func(b *testing.B) {
			sb := hostSandbox(b)
			root := b.TempDir()
			store, cache := openStores(b, root)
			var exs []*executor.Executor
			for i, st := range []cas.Store{unverifiedStore{store}, store} {
				ex, err := executor.New(executor.Options{Store: st, Cache: cache, Sandbox: sb, InputRoot: executor.LinkInputRoot{Store: store},
					StageDir: filepath.Join(root, "cas", fmt.Sprintf("stage%d", i))})
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(ex.Wait)
				exs = append(exs, ex)
			}
			put := func(m []byte) cas.Digest {
				d := cas.DigestOf(m)
				if err := store.Put(context.Background(), d, bytes.NewReader(m)); err != nil {
					b.Fatal(err)
				}
				return d
			}
			dir := &repb.Directory{}
			for i := range n {
				dir.Files = append(dir.Files, &repb.FileNode{Name: fmt.Sprintf("f%05d", i), Digest: put(fmt.Appendf(nil, "input %d\n", i)).Proto()})
			}
			mustMarshal := func(m proto.Message) []byte { data, _ := proto.Marshal(m); return data }
			cmd := put(mustMarshal(&repb.Command{Arguments: []string{"/bin/true"}}))
			act := put(mustMarshal(&repb.Action{CommandDigest: cmd.Proto(), InputRootDigest: put(mustMarshal(dir)).Proto()}))
			run := func(ex *executor.Executor) time.Duration {
				start := time.Now()
				resp := ex.Execute(context.Background(), executor.Request{ActionDigest: act, SkipCacheLookup: true})
				if resp.Status.GetCode() != 0 || resp.Result.GetExitCode() != 0 {
					b.Fatalf("execute: %v", resp.Status)
				}
				return time.Since(start)
			}
			for range 5 { // warm up both
				run(exs[0])
				run(exs[1])
			}
			var lat [2][]time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				for j := range 2 {
					k := (i + j) % 2
					lat[k] = append(lat[k], run(exs[k]))
				}
			}
			b.StopTimer()
			med := func(ds []time.Duration) float64 {
				slices.Sort(ds)
				return float64(ds[len(ds)/2].Microseconds()) / 1e3
			}
			off, on := med(lat[0]), med(lat[1])
			b.ReportMetric(off, "unverified-ms-p50")
			b.ReportMetric(on, "verified-ms-p50")
			b.ReportMetric(on/off, "verified/unverified")
		})
	}
}
