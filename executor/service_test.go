package executor_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/actiond/actiond/actioncache"
	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/executor/executortest"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// A failing action's response has a server log that says why.
func TestServerLogOfAFailure(t *testing.T) {
	e := newEnv(t, executor.ServiceOptions{})
	d := e.action(actionSpec{script: `echo oops >&2; exit 3`})
	resp, _, err := e.execute(context.Background(), d, false)
	if err != nil {
		t.Fatal(err)
	}
	if resp.Result.GetExitCode() != 3 {
		t.Fatalf("exit code %d, want 3", resp.Result.GetExitCode())
	}
	l := resp.ServerLogs["sandbox"]
	if l == nil {
		t.Fatal("a failed action has no server log")
	}
	if got := e.read(l.Digest); !strings.Contains(got, "exit code: 3") || !strings.Contains(got, d.Hash) {
		t.Errorf("server log %q: want the action and its exit code", got)
	}
}

func TestExecuteOutputsAndCache(t *testing.T) {
	e := newEnv(t, executor.ServiceOptions{})
	in := e.put([]byte("hello input\n"))
	d := e.action(actionSpec{
		script:   `cat in.txt > out/file.txt && mkdir -p tree/sub && echo a > tree/sub/a && ln -s sub/a tree/link && printf x > tree/x && chmod +x tree/x && echo to-stdout && echo to-stderr >&2`,
		inputs:   &repb.Directory{Files: []*repb.FileNode{{Name: "in.txt", Digest: in.Proto()}}},
		outFiles: []string{"out/file.txt"},
		outDirs:  []string{"tree"},
	})
	resp, _, err := e.execute(context.Background(), d, false)
	res := mustOK(t, resp, err)
	if resp.CachedResult {
		t.Fatal("first execution reported as cached")
	}
	if res.ExitCode != 0 || len(res.OutputFiles) != 1 || len(res.OutputDirectories) != 1 {
		t.Fatalf("result %v", res)
	}
	if got := e.read(res.OutputFiles[0].Digest); got != "hello input\n" {
		t.Fatalf("out/file.txt = %q", got)
	}
	if got := e.read(res.StdoutDigest); got != "to-stdout\n" {
		t.Fatalf("stdout = %q", got)
	}
	if got := e.read(res.StderrDigest); got != "to-stderr\n" {
		t.Fatalf("stderr = %q", got)
	}
	tree := &repb.Tree{}
	if err := proto.Unmarshal([]byte(e.read(res.OutputDirectories[0].TreeDigest)), tree); err != nil {
		t.Fatal(err)
	}
	if len(tree.Root.Files) != 1 || !tree.Root.Files[0].IsExecutable || tree.Root.Files[0].Name != "x" ||
		len(tree.Root.Symlinks) != 1 || tree.Root.Symlinks[0].Target != "sub/a" || len(tree.Children) != 1 {
		t.Fatalf("tree %v", tree)
	}
	md := res.ExecutionMetadata
	if md == nil || md.ExecutionStartTimestamp == nil || md.OutputUploadCompletedTimestamp == nil || md.InputFetchStartTimestamp == nil ||
		md.ExecutionCompletedTimestamp.AsTime().Before(md.ExecutionStartTimestamp.AsTime()) {
		t.Fatalf("metadata %v", md)
	}
	if resp.ServerLogs != nil {
		t.Errorf("a plain success came with server logs %v: a blob write per action that says nothing new", resp.ServerLogs)
	}
	// Small streams come inlined in the response (Bazel reads them there
	// instead of downloading them), but are not stored in the cache entry.
	if string(res.StdoutRaw) != "to-stdout\n" || string(res.StderrRaw) != "to-stderr\n" {
		t.Errorf("inlined stdout %q, stderr %q", res.StdoutRaw, res.StderrRaw)
	}
	if stored, err := e.cache.Get(context.Background(), d); err != nil || len(stored.StdoutRaw)+len(stored.StderrRaw) != 0 {
		t.Errorf("cache entry %v (%v): want the streams by digest only", stored, err)
	}
	// Second run: from the action cache.
	resp, _, err = e.execute(context.Background(), d, false)
	res = mustOK(t, resp, err)
	if !resp.CachedResult {
		t.Fatal("second execution not served from the cache")
	}
	if string(res.StdoutRaw) != "to-stdout\n" || string(res.StderrRaw) != "to-stderr\n" {
		t.Errorf("cached result: inlined stdout %q, stderr %q", res.StdoutRaw, res.StderrRaw)
	}
	// skip_cache_lookup runs again.
	resp, _, err = e.execute(context.Background(), d, true)
	mustOK(t, resp, err)
	if resp.CachedResult {
		t.Fatal("skip_cache_lookup returned a cached result")
	}
}

// The stage (input root, outputs not taken, stdout/stderr files) is removed
// after the response, in the background; Wait waits for that.
func TestStageIsRemovedAfterTheResponse(t *testing.T) {
	e := newEnv(t, executor.ServiceOptions{Concurrency: 4})
	in := e.put([]byte("input\n"))
	var wg sync.WaitGroup
	for i := range 8 {
		d := e.action(actionSpec{
			script:     fmt.Sprintf("mkdir -p scratch/deep && echo %d > scratch/deep/f && cat in.txt > out.txt", i),
			inputs:     &repb.Directory{Files: []*repb.FileNode{{Name: "in.txt", Digest: in.Proto()}}},
			outFiles:   []string{"out.txt"},
			doNotCache: true,
		})
		wg.Go(func() {
			resp, _, err := e.execute(context.Background(), d, false)
			if err != nil || resp.Status.GetCode() != 0 || len(resp.Result.GetOutputFiles()) != 1 {
				t.Errorf("action %d: %v %v", i, err, resp)
			}
		})
	}
	wg.Wait()
	e.ex.Wait()
	ents, err := os.ReadDir(e.stage)
	if err != nil {
		t.Fatal(err)
	}
	for _, ent := range ents {
		t.Errorf("left in the stage directory after Wait: %s", ent.Name())
	}
}

func TestFailuresAndDoNotCacheAreNotCached(t *testing.T) {
	e := newEnv(t, executor.ServiceOptions{})
	fail := e.action(actionSpec{script: "exit 3"})
	resp, _, err := e.execute(context.Background(), fail, false)
	if res := mustOK(t, resp, err); res.ExitCode != 3 {
		t.Fatalf("exit code %d, want 3", res.ExitCode)
	}
	if _, err := e.cache.Get(context.Background(), fail); !errors.Is(err, actioncache.ErrNotFound) {
		t.Fatalf("failed action was cached: %v", err)
	}
	nc := e.action(actionSpec{script: "true", doNotCache: true})
	resp, _, err = e.execute(context.Background(), nc, false)
	mustOK(t, resp, err)
	if _, err := e.cache.Get(context.Background(), nc); !errors.Is(err, actioncache.ErrNotFound) {
		t.Fatalf("do_not_cache action was cached: %v", err)
	}
	sig := e.action(actionSpec{script: "kill -TERM $$"})
	resp, _, err = e.execute(context.Background(), sig, false)
	if res := mustOK(t, resp, err); res.ExitCode != 128+15 {
		t.Fatalf("exit code %d, want 143", res.ExitCode)
	}
}

// TestEscapingOutputSymlinksAreInvalidArgument: an output the command made
// a symlink out of the execroot is refused.
func TestEscapingOutputSymlinksAreInvalidArgument(t *testing.T) {
	e := newEnv(t, executor.ServiceOptions{})
	cases := map[string]actionSpec{
		"output symlink escapes":  {script: "ln -s ../../../etc/passwd o", outFiles: []string{"o"}},
		"absolute output symlink": {script: "ln -s /etc/passwd o", outFiles: []string{"o"}},
	}
	for name, a := range cases {
		t.Run(name, func(t *testing.T) {
			e.wantInvalidArgument(t, a)
		})
	}
}

func TestInputsAreReadOnlyUnlessMutatesInputs(t *testing.T) {
	e := newEnv(t, executor.ServiceOptions{})
	in := e.put([]byte("original\n"))
	inputs := &repb.Directory{Files: []*repb.FileNode{{Name: "in.txt", Digest: in.Proto()}}}
	d := e.action(actionSpec{script: `echo changed > in.txt; rm -f in.txt; mv in.txt moved; cat in.txt > out.txt`, inputs: inputs, outFiles: []string{"out.txt"}})
	resp, _, err := e.execute(context.Background(), d, false)
	res := mustOK(t, resp, err)
	if got := e.read(res.OutputFiles[0].Digest); got != "original\n" {
		t.Fatalf("input seen as %q after the action tried to change it", got)
	}
	if got := e.read(in.Proto()); got != "original\n" {
		t.Fatalf("CAS blob changed to %q", got)
	}
	d = e.action(actionSpec{script: `echo changed > in.txt && cat in.txt > out.txt`, inputs: inputs, outFiles: []string{"out.txt"}, platform: map[string]string{"mutates_inputs": "1"}})
	resp, _, err = e.execute(context.Background(), d, false)
	res = mustOK(t, resp, err)
	if res.ExitCode != 0 || e.read(res.OutputFiles[0].Digest) != "changed\n" {
		t.Fatalf("mutates_inputs action: exit %d", res.ExitCode)
	}
	if got := e.read(in.Proto()); got != "original\n" {
		t.Fatalf("mutates_inputs changed the CAS blob to %q", got)
	}
}

func TestTimeoutKeepsPartialOutput(t *testing.T) {
	e := newEnv(t, executor.ServiceOptions{})
	d := e.action(actionSpec{script: "echo before; sleep 60; echo after", timeout: time.Second})
	resp, _, err := e.execute(context.Background(), d, false)
	if err != nil {
		t.Fatal(err)
	}
	if st := status.FromProto(resp.Status); st.Code() != codes.DeadlineExceeded {
		t.Fatalf("status %v, want DEADLINE_EXCEEDED", st)
	}
	if resp.Result == nil || e.read(resp.Result.StdoutDigest) != "before\n" {
		t.Fatalf("partial stdout missing: %v", resp.Result)
	}
}

func TestIdenticalActionsInFlightAreDeduplicated(t *testing.T) {
	fake := &executortest.Sandbox{Func: sleepThen(time.Second, func(spec *executor.RunSpec) error {
		return os.WriteFile(filepath.Join(spec.ExecRoot, spec.WorkingDirectory, "t"), fmt.Appendf(nil, "%d\n", time.Now().UnixNano()), 0o644)
	})}
	onBothSandboxes(t, envOptions{service: executor.ServiceOptions{Concurrency: 2}}, fake, testIdenticalActionsInFlightAreDeduplicated)
}

func testIdenticalActionsInFlightAreDeduplicated(t *testing.T, e *env) {
	d := e.action(actionSpec{script: "sleep 1; date +%s%N > t", outFiles: []string{"t"}})
	var wg sync.WaitGroup
	names := make([]string, 3)
	results := make([]*repb.ActionResult, 3)
	for i := range names {
		wg.Go(func() {
			resp, name, err := e.execute(context.Background(), d, false)
			if err == nil && resp.Status.GetCode() == 0 {
				results[i] = resp.Result
			}
			names[i] = name
		})
		time.Sleep(50 * time.Millisecond)
	}
	wg.Wait()
	for i := range names {
		if results[i] == nil {
			t.Fatalf("execution %d failed", i)
		}
		if names[i] != names[0] || !proto.Equal(results[i].OutputFiles[0].Digest, results[0].OutputFiles[0].Digest) {
			t.Fatalf("executions were not deduplicated: %v", names)
		}
	}
}

func TestWaitExecution(t *testing.T) {
	fake := &executortest.Sandbox{Func: sleepThen(time.Second, nil), Stdout: "done\n"}
	onBothSandboxes(t, envOptions{service: executor.ServiceOptions{}}, fake, testWaitExecution)
}

func testWaitExecution(t *testing.T, e *env) {
	d := e.action(actionSpec{script: "sleep 1; echo done"})
	stream, err := e.exec.Execute(context.Background(), &repb.ExecuteRequest{ActionDigest: d.Proto()})
	if err != nil {
		t.Fatal(err)
	}
	first, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	ws, err := e.exec.WaitExecution(context.Background(), &repb.WaitExecutionRequest{Name: first.Name})
	if err != nil {
		t.Fatal(err)
	}
	resp, name, err := drain(ws)
	mustOK(t, resp, err)
	if name != first.Name || e.read(resp.Result.StdoutDigest) != "done\n" {
		t.Fatalf("WaitExecution: name %q, result %v", name, resp.Result)
	}
	ws, err = e.exec.WaitExecution(context.Background(), &repb.WaitExecutionRequest{Name: "operations/unknown"})
	if err == nil {
		_, err = ws.Recv()
	}
	if status.Code(err) != codes.NotFound {
		t.Fatalf("unknown operation: %v, want NOT_FOUND", err)
	}
}

func TestCancelledClientKillsAction(t *testing.T) {
	fake := &executortest.Sandbox{Func: sleepThen(30*time.Second, nil)}
	onBothSandboxes(t, envOptions{service: executor.ServiceOptions{CancelGrace: 100 * time.Millisecond}}, fake, testCancelledClientKillsAction)
}

func testCancelledClientKillsAction(t *testing.T, e *env) {
	d := e.action(actionSpec{script: "sleep 30"})
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := e.exec.Execute(ctx, &repb.ExecuteRequest{ActionDigest: d.Proto()})
	if err != nil {
		t.Fatal(err)
	}
	first, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	// Wait until it runs, then go away.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, running := e.svc.Load(); running == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	start := time.Now()
	for {
		if q, r := e.svc.Load(); q == 0 && r == 0 {
			break
		}
		if time.Since(start) > 15*time.Second {
			t.Fatal("action still running 15 s after its only client went away")
		}
		time.Sleep(20 * time.Millisecond)
	}
	ws, err := e.exec.WaitExecution(context.Background(), &repb.WaitExecutionRequest{Name: first.Name})
	if err != nil {
		t.Fatal(err)
	}
	resp, _, err := drain(ws)
	if err != nil {
		t.Fatal(err)
	}
	if st := status.FromProto(resp.Status); st.Code() != codes.Canceled {
		t.Fatalf("status %v, want CANCELLED", st)
	}
}
