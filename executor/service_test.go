package executor_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	"github.com/actiond/actiond/actioncache"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/internal/testutil"
	"github.com/actiond/actiond/sandbox"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
)

// env is a real executor (host runtime sandbox, disk CAS, bbolt AC) behind
// an in-process gRPC Execution service.
type env struct {
	t     *testing.T
	store *cas.DiskStore
	cache *actioncache.BoltCache
	svc   *executor.Service
	exec  repb.ExecutionClient
	ex    *executor.Executor
	stage string // the executor's StageDir
}

func newEnv(t *testing.T, sopts executor.ServiceOptions) *env {
	t.Helper()
	testutil.RequireRoot(t)
	root := t.TempDir()
	store, err := cas.NewDiskStore(filepath.Join(root, "cas"), cas.WithFsync(false))
	if err != nil {
		t.Fatal(err)
	}
	cache, err := actioncache.Open(filepath.Join(root, "ac.db"), store)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cache.Close() })
	sb, err := sandbox.New(sandbox.Config{Runtimes: []sandbox.Runtime{sandbox.HostRuntime()}, StateDir: filepath.Join(root, "sandbox")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sb.Close() })
	stage := filepath.Join(root, "cas", "stage")
	ex, err := executor.New(executor.Options{Store: store, Cache: cache, Sandbox: sb, StageDir: stage})
	if err != nil {
		t.Fatal(err)
	}
	svc := executor.NewService(ex, sopts)
	lis := bufconn.Listen(1 << 20)
	g := grpc.NewServer()
	repb.RegisterExecutionServer(g, svc)
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &env{t: t, store: store, cache: cache, svc: svc, exec: repb.NewExecutionClient(conn), ex: ex, stage: stage}
}

func (e *env) put(data []byte) cas.Digest {
	e.t.Helper()
	d := cas.DigestOf(data)
	if err := e.store.Put(context.Background(), d, bytes.NewReader(data)); err != nil {
		e.t.Fatal(err)
	}
	return d
}

func (e *env) putProto(m proto.Message) cas.Digest {
	e.t.Helper()
	data, err := proto.Marshal(m)
	if err != nil {
		e.t.Fatal(err)
	}
	return e.put(data)
}

func (e *env) read(d *repb.Digest) string {
	e.t.Helper()
	dd, err := cas.FromProto(d)
	if err != nil {
		e.t.Fatal(err)
	}
	b, err := cas.ReadAll(context.Background(), e.store, dd)
	if err != nil {
		e.t.Fatal(err)
	}
	return string(b)
}

// action stores a shell command with the given inputs and returns its digest.
type actionSpec struct {
	script     string
	inputs     *repb.Directory
	outFiles   []string
	outDirs    []string
	outPaths   []string
	wd         string
	platform   map[string]string
	timeout    time.Duration
	doNotCache bool
}

func (e *env) action(a actionSpec) cas.Digest {
	e.t.Helper()
	if a.inputs == nil {
		a.inputs = &repb.Directory{}
	}
	cmd := &repb.Command{
		Arguments:            []string{"/bin/sh", "-c", a.script},
		EnvironmentVariables: []*repb.Command_EnvironmentVariable{{Name: "PATH", Value: "/usr/bin:/bin"}},
		OutputFiles:          a.outFiles,
		OutputDirectories:    a.outDirs,
		OutputPaths:          a.outPaths,
		WorkingDirectory:     a.wd,
	}
	if len(a.platform) > 0 {
		cmd.Platform = &repb.Platform{}
		for k, v := range a.platform {
			cmd.Platform.Properties = append(cmd.Platform.Properties, &repb.Platform_Property{Name: k, Value: v})
		}
	}
	act := &repb.Action{CommandDigest: e.putProto(cmd).Proto(), InputRootDigest: e.putProto(a.inputs).Proto(), DoNotCache: a.doNotCache}
	if a.timeout > 0 {
		act.Timeout = durationpb.New(a.timeout)
	}
	return e.putProto(act)
}

func (e *env) execute(ctx context.Context, d cas.Digest, skipCache bool) (*repb.ExecuteResponse, string, error) {
	e.t.Helper()
	stream, err := e.exec.Execute(ctx, &repb.ExecuteRequest{ActionDigest: d.Proto(), SkipCacheLookup: skipCache})
	if err != nil {
		return nil, "", err
	}
	return drain(stream)
}

func drain(stream interface {
	Recv() (*longrunningpb.Operation, error)
}) (*repb.ExecuteResponse, string, error) {
	var name string
	for {
		op, err := stream.Recv()
		if err != nil {
			return nil, name, err
		}
		name = op.Name
		if op.Done {
			resp := &repb.ExecuteResponse{}
			if err := op.GetResponse().UnmarshalTo(resp); err != nil {
				return nil, name, err
			}
			return resp, name, nil
		}
	}
}

func mustOK(t *testing.T, resp *repb.ExecuteResponse, err error) *repb.ActionResult {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
	if resp.Status.GetCode() != 0 {
		t.Fatalf("status %v", resp.Status)
	}
	return resp.Result
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
	if resp.ServerLogs["sandbox"] == nil {
		t.Fatal("no sandbox server log")
	}
	// Second run: from the action cache.
	resp, _, err = e.execute(context.Background(), d, false)
	mustOK(t, resp, err)
	if !resp.CachedResult {
		t.Fatal("second execution not served from the cache")
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

func TestMissingInputsNameEveryBlob(t *testing.T) {
	e := newEnv(t, executor.ServiceOptions{})
	absent := cas.DigestOf([]byte("never uploaded"))
	d := e.action(actionSpec{script: "cat f", inputs: &repb.Directory{Files: []*repb.FileNode{{Name: "f", Digest: absent.Proto()}}}})
	resp, _, err := e.execute(context.Background(), d, false)
	if err != nil {
		t.Fatal(err)
	}
	st := status.FromProto(resp.Status)
	if st.Code() != codes.FailedPrecondition {
		t.Fatalf("status %v, want FAILED_PRECONDITION", st)
	}
	var found bool
	for _, det := range st.Details() {
		if pf, ok := det.(*errdetails.PreconditionFailure); ok {
			for _, v := range pf.Violations {
				if v.Type == "MISSING" && v.Subject == "blobs/"+absent.String() {
					found = true
				}
			}
		}
	}
	if !found {
		t.Fatalf("no MISSING violation for %s in %v", absent, st.Details())
	}
	// A missing Action blob is reported the same way.
	resp, _, err = e.execute(context.Background(), cas.DigestOf([]byte("no action")), false)
	if err != nil || status.FromProto(resp.Status).Code() != codes.FailedPrecondition {
		t.Fatalf("missing action: %v %v", resp.GetStatus(), err)
	}
}

func TestBadRequestsAreInvalidArgument(t *testing.T) {
	e := newEnv(t, executor.ServiceOptions{})
	f := e.put([]byte("x"))
	cases := map[string]actionSpec{
		"unknown runtime":          {script: "true", platform: map[string]string{"libc": "glibc1.0"}},
		"output escapes":           {script: "true", outFiles: []string{"../escape"}},
		"absolute output":          {script: "true", outFiles: []string{"/etc/passwd"}},
		"working dir escapes":      {script: "true", wd: "../.."},
		"working dir via symlink":  {script: "true", wd: "l/x", inputs: &repb.Directory{Symlinks: []*repb.SymlinkNode{{Name: "l", Target: "../../.."}}}},
		"output via input symlink": {script: "true", outFiles: []string{"l/out"}, inputs: &repb.Directory{Symlinks: []*repb.SymlinkNode{{Name: "l", Target: ".."}}}},
		"output symlink escapes":   {script: "ln -s ../../../etc/passwd o", outFiles: []string{"o"}},
		"absolute output symlink":  {script: "ln -s /etc/passwd o", outFiles: []string{"o"}},
		"dotdot input":             {script: "true", inputs: &repb.Directory{Files: []*repb.FileNode{{Name: "..", Digest: f.Proto()}}}},
		"bad memory":               {script: "true", platform: map[string]string{"memory": "lots"}},
	}
	for name, a := range cases {
		t.Run(name, func(t *testing.T) {
			resp, _, err := e.execute(context.Background(), e.action(a), false)
			if err != nil {
				t.Fatal(err)
			}
			if st := status.FromProto(resp.Status); st.Code() != codes.InvalidArgument {
				t.Fatalf("status %v, want INVALID_ARGUMENT", st)
			}
		})
	}
	resp, _, err := e.execute(context.Background(), e.action(cases["unknown runtime"]), false)
	if err != nil || !strings.Contains(resp.Status.GetMessage(), `"host"`) {
		t.Fatalf("unknown runtime message should list the available runtimes: %v", resp.GetStatus())
	}
	// An "Action" the server would have to load gigabytes of.
	huge := cas.Digest{Hash: strings.Repeat("ab", 32), Size: 8 << 30}
	resp, _, err = e.execute(context.Background(), huge, false)
	if err != nil || status.FromProto(resp.Status).Code() != codes.InvalidArgument {
		t.Fatalf("8 GiB action digest: %v %v, want INVALID_ARGUMENT", resp.GetStatus(), err)
	}
	_, err = e.exec.Execute(context.Background(), &repb.ExecuteRequest{ActionDigest: &repb.Digest{Hash: "nothex", SizeBytes: 1}})
	if err == nil {
		_, _, err = drainErr(e, &repb.ExecuteRequest{ActionDigest: &repb.Digest{Hash: "nothex", SizeBytes: 1}})
	}
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("malformed action digest: %v", err)
	}
}

func drainErr(e *env, req *repb.ExecuteRequest) (*repb.ExecuteResponse, string, error) {
	stream, err := e.exec.Execute(context.Background(), req)
	if err != nil {
		return nil, "", err
	}
	return drain(stream)
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
	e := newEnv(t, executor.ServiceOptions{Concurrency: 2})
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
	e := newEnv(t, executor.ServiceOptions{})
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
	e := newEnv(t, executor.ServiceOptions{CancelGrace: 100 * time.Millisecond})
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
