package executor_test

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/executor/executortest"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// hostileOptions are the env options of the hostile-request tests: two
// execution slots and executor and store options of the test's choosing.
// env's CAS service lets other clients' calls be made while a hostile
// request runs.
func hostileOptions(tweak func(*executor.Options), storeOpts ...cas.Option) envOptions {
	return envOptions{service: executor.ServiceOptions{Concurrency: 2}, executor: tweak, storeOpts: storeOpts}
}

// newHostileEnv is an env with hostileOptions on the real sandbox; it
// needs root.
func newHostileEnv(t *testing.T, tweak func(*executor.Options), storeOpts ...cas.Option) *env {
	t.Helper()
	return newEnvOn(t, hostSandbox(t), hostileOptions(tweak, storeOpts...))
}

// dagBomb stores levels+1 Directory messages, each naming the one below
// twice ("a" and "b"), over a bottom directory holding file: 2^levels
// copies of file once expanded.
func (e *env) dagBomb(file cas.Digest, levels int) *repb.Directory {
	dir := &repb.Directory{Files: []*repb.FileNode{{Name: "f", Digest: file.Proto()}}}
	for range levels {
		d := e.putProto(dir).Proto()
		dir = &repb.Directory{Directories: []*repb.DirectoryNode{{Name: "a", Digest: d}, {Name: "b", Digest: d}}}
	}
	return dir
}

// othersStayServed executes the hostile action d, with a deadline of
// within, which must fail with code and an error mentioning mention; while
// it runs, it does what other clients do: a trivial action and
// FindMissingBlobs of a stored blob. Both must complete (not within any
// time: that would be a timing assertion), and the blob must still be
// stored afterwards.
func (e *env) othersStayServed(t *testing.T, d cas.Digest, within time.Duration, code codes.Code, mention string) {
	t.Helper()
	kept := e.put([]byte("stored before the hostile request\n"))
	trivial := e.action(actionSpec{script: "echo ok", timeout: time.Minute})
	var wg sync.WaitGroup
	wg.Go(func() {
		ctx, cancel := context.WithTimeout(context.Background(), within)
		defer cancel()
		resp, _, err := e.execute(ctx, d, true)
		wantStatus(t, resp, err, code, mention)
	})
	wg.Go(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		resp, _, err := e.execute(ctx, trivial, true)
		if err != nil || resp.Status.GetCode() != 0 || resp.Result.GetExitCode() != 0 {
			t.Errorf("a trivial action alongside the hostile request: %v, %v", err, resp.GetStatus())
		}
	})
	wg.Go(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		r, err := e.cas.FindMissingBlobs(ctx, &repb.FindMissingBlobsRequest{BlobDigests: []*repb.Digest{kept.Proto()}})
		if err != nil || len(r.MissingBlobDigests) != 0 {
			t.Errorf("FindMissingBlobs alongside the hostile request: %v, missing %v", err, r.GetMissingBlobDigests())
		}
	})
	wg.Wait()
	if m, err := e.store.FindMissing(context.Background(), []cas.Digest{kept}); err != nil || len(m) != 0 {
		t.Errorf("a stored blob was lost: %v %v", m, err)
	}
}

func wantStatus(t *testing.T, resp *repb.ExecuteResponse, err error, code codes.Code, substr string) {
	t.Helper()
	if err != nil {
		t.Errorf("Execute: %v, want an ExecuteResponse with %s", err, code)
		return
	}
	st := status.FromProto(resp.Status)
	if st.Code() != code || !strings.Contains(st.Message(), substr) {
		t.Errorf("status %v, want %s naming %q", st, code, substr)
	}
}

// TestDAGBombInputRootIsRefused: 23 small Directory messages describe 2^22
// files. Hardlink staging would create every one of them; the expanded
// tree is over the default entry limit and is refused at once.
func TestDAGBombInputRootIsRefused(t *testing.T) {
	onBothSandboxes(t, hostileOptions(nil), &executortest.Sandbox{}, testDAGBombInputRootIsRefused)
}

func testDAGBombInputRootIsRefused(t *testing.T, e *env) {
	bomb := e.action(actionSpec{script: "find . | wc -l", inputs: e.dagBomb(e.put([]byte("x")), 22), timeout: 10 * time.Second})
	e.othersStayServed(t, bomb, time.Minute, codes.InvalidArgument, "--max-input-entries")
}

// TestMutatesInputsBytesBombIsRefused: one 1 MiB file named 2^7 times
// through 8 messages; with mutates_inputs (a private copy) that is 128 MiB
// written, over the configured byte limit.
func TestMutatesInputsBytesBombIsRefused(t *testing.T) {
	opts := hostileOptions(func(o *executor.Options) { o.MaxInputBytes = 64 << 20 })
	onBothSandboxes(t, opts, &executortest.Sandbox{}, testMutatesInputsBytesBombIsRefused)
}

func testMutatesInputsBytesBombIsRefused(t *testing.T, e *env) {
	big := e.put(make([]byte, 1<<20))
	bomb := e.action(actionSpec{script: "true", inputs: e.dagBomb(big, 7), platform: map[string]string{"mutates_inputs": "1"}, timeout: 10 * time.Second})
	e.othersStayServed(t, bomb, time.Minute, codes.InvalidArgument, "--max-input-bytes")
}

// TestTimeoutCountsFromStaging: with the tree limits off, staging 2^22
// hardlinks takes minutes; the action's 2 s timeout ends it with
// DEADLINE_EXCEEDED (the client's own deadline is far longer).
func TestTimeoutCountsFromStaging(t *testing.T) {
	e := newHostileEnv(t, func(o *executor.Options) { o.MaxInputEntries, o.MaxInputBytes = -1, -1 })
	bomb := e.action(actionSpec{script: "true", inputs: e.dagBomb(e.put([]byte("x")), 22), timeout: 2 * time.Second})
	e.othersStayServed(t, bomb, 90*time.Second, codes.DeadlineExceeded, "staging its inputs")
}

// TestDefaultActionTimeout: an action without a timeout gets the
// executor's default.
func TestDefaultActionTimeout(t *testing.T) {
	e := newHostileEnv(t, func(o *executor.Options) { o.DefaultTimeout = time.Second })
	d := e.action(actionSpec{script: "sleep 60"})
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	resp, _, err := e.execute(ctx, d, true)
	wantStatus(t, resp, err, codes.DeadlineExceeded, "timed out after 1s")
}

// TestSparseOutputIsRefusedBySize: `truncate -s 1G` makes a 1 GiB output
// that takes no disk; over the store's limit, it is refused by its size
// (RESOURCE_EXHAUSTED naming --max-size) and evicts nothing.
func TestSparseOutputIsRefusedBySize(t *testing.T) {
	e := newHostileEnv(t, nil, cas.WithMaxSize(64<<20))
	d := e.action(actionSpec{script: "truncate -s 1G out", outFiles: []string{"out"}, timeout: time.Minute})
	e.othersStayServed(t, d, time.Minute, codes.ResourceExhausted, "--max-size")
}
