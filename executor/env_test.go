// The test environment of the executor's tests: a real executor and
// Execution service in process, on the real sandbox (root only) or on
// executortest's fake one.

package executor_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	"github.com/actiond/actiond/actioncache"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/cas/castest"
	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/executor/executortest"
	"github.com/actiond/actiond/internal/testutil"
	"github.com/actiond/actiond/sandbox"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
)

// env is a real executor (disk CAS, bbolt AC, and the real sandbox or
// executortest's) behind in-process gRPC Execution and CAS services.
type env struct {
	t     *testing.T
	store *cas.DiskStore
	cache *actioncache.BoltCache
	svc   *executor.Service
	exec  repb.ExecutionClient
	cas   repb.ContentAddressableStorageClient
	ex    *executor.Executor
	stage string // the executor's StageDir
}

// envOptions adjust newEnvOn's set-up; the zero value is the defaults.
type envOptions struct {
	service executor.ServiceOptions
	// storeOpts are the disk store's options after cas.WithFsync(false).
	storeOpts []cas.Option
	// wrapStore, if set, puts a store in front of the disk store for the
	// executor (the CAS service and env.store stay on the disk store).
	wrapStore func(*cas.DiskStore) cas.Store
	// executor, if set, adjusts the executor's options.
	executor func(*executor.Options)
}

// newEnvOn builds an env around sb; everything is closed when t ends.
func newEnvOn(t *testing.T, sb executor.Sandbox, o envOptions) *env {
	t.Helper()
	root := t.TempDir()
	disk, cache := openStores(t, root, o.storeOpts...)
	var store cas.Store = disk
	if o.wrapStore != nil {
		store = o.wrapStore(disk)
	}
	stage := filepath.Join(root, "cas", "stage")
	opts := executor.Options{Store: store, Cache: cache, Sandbox: sb, StageDir: stage}
	if o.executor != nil {
		o.executor(&opts)
	}
	ex, err := executor.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	svc := executor.NewService(ex, o.service)
	t.Cleanup(func() { svc.Stop(); ex.Wait() })
	conn := executortest.Dial(t, func(r grpc.ServiceRegistrar) {
		repb.RegisterExecutionServer(r, svc)
		repb.RegisterContentAddressableStorageServer(r, cas.NewService(disk, cas.ServiceOptions{}))
	})
	return &env{t: t, store: disk, cache: cache, svc: svc, exec: repb.NewExecutionClient(conn),
		cas: repb.NewContentAddressableStorageClient(conn), ex: ex, stage: stage}
}

// newEnv is an env on the real sandbox with the host runtime; it needs
// root.
func newEnv(t *testing.T, sopts executor.ServiceOptions) *env {
	t.Helper()
	return newEnvOn(t, hostSandbox(t), envOptions{service: sopts})
}

// newFakeEnv is an env on executortest's Sandbox, which runs no command,
// so it needs no root. wrap and opts are envOptions.wrapStore and
// envOptions.executor.
func newFakeEnv(t *testing.T, sopts executor.ServiceOptions, sb *executortest.Sandbox, wrap func(*cas.DiskStore) cas.Store, opts func(*executor.Options)) *env {
	t.Helper()
	return newEnvOn(t, sb, envOptions{service: sopts, wrapStore: wrap, executor: opts})
}

// onBothSandboxes runs test on a fresh env over fake, then (as root) on
// one over the real sandbox: what the executor and service do around a
// run is checked everywhere, and with real commands where it can be.
func onBothSandboxes(t *testing.T, o envOptions, fake *executortest.Sandbox, test func(t *testing.T, e *env)) {
	t.Run("fake", func(t *testing.T) { test(t, newEnvOn(t, fake, o)) })
	t.Run("sandbox", func(t *testing.T) { test(t, newEnvOn(t, hostSandbox(t), o)) })
}

// hostSandbox is the real sandbox with the host runtime, closed when t
// ends; it needs root.
func hostSandbox(t testing.TB) *sandbox.Sandbox {
	t.Helper()
	testutil.RequireRoot(t)
	sb, err := sandbox.New(sandbox.Config{Runtimes: []sandbox.Runtime{sandbox.HostRuntime()}, StateDir: filepath.Join(t.TempDir(), "sandbox")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sb.Close() })
	return sb
}

// openStores opens a disk CAS (without fsync, then opts) under root/cas
// and a bbolt ActionCache at root/ac.db; the cache is closed when t ends.
func openStores(t testing.TB, root string, opts ...cas.Option) (*cas.DiskStore, *actioncache.BoltCache) {
	t.Helper()
	store, err := cas.NewDiskStore(filepath.Join(root, "cas"), append([]cas.Option{cas.WithFsync(false)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	cache, err := actioncache.Open(filepath.Join(root, "ac.db"), store)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cache.Close() })
	return store, cache
}

// sleepThen is a fake run of `sleep d; then`: it waits d and calls then
// (if set), or returns the error of a cancelled sandbox when ctx ends
// first.
func sleepThen(d time.Duration, then func(*executor.RunSpec) error) func(context.Context, *executor.RunSpec) (*executor.RunResult, error) {
	return func(ctx context.Context, spec *executor.RunSpec) (*executor.RunResult, error) {
		select {
		case <-time.After(d):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if then != nil {
			if err := then(spec); err != nil {
				return nil, err
			}
		}
		return &executor.RunResult{}, nil
	}
}

func (e *env) put(data []byte) cas.Digest {
	e.t.Helper()
	return castest.Put(e.t, e.store, data)
}

func (e *env) putProto(m proto.Message) cas.Digest {
	e.t.Helper()
	return castest.PutProto(e.t, e.store, m)
}

func (e *env) read(d *repb.Digest) string {
	e.t.Helper()
	return castest.ReadString(e.t, e.store, d)
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
	timeout    time.Duration // Action.timeout; zero: none
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
	if a.timeout != 0 {
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

// wantInvalidArgument executes the action a describes and fails t unless
// it is refused with INVALID_ARGUMENT.
func (e *env) wantInvalidArgument(t *testing.T, a actionSpec) {
	t.Helper()
	resp, _, err := e.execute(context.Background(), e.action(a), false)
	if err != nil {
		t.Fatal(err)
	}
	if st := status.FromProto(resp.Status); st.Code() != codes.InvalidArgument {
		t.Fatalf("status %v, want INVALID_ARGUMENT", st)
	}
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
