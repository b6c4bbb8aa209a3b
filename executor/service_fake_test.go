package executor_test

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/executor/executortest"
	actiondfs "github.com/actiond/actiond/fs"
	"github.com/actiond/actiond/internal/testutil"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// firstOp starts an Execute of d and returns its stream and the name of
// its operation.
func (e *env) firstOp(ctx context.Context, d cas.Digest) (repb.Execution_ExecuteClient, string) {
	e.t.Helper()
	stream, err := e.exec.Execute(ctx, &repb.ExecuteRequest{ActionDigest: d.Proto()})
	if err != nil {
		e.t.Fatal(err)
	}
	op, err := stream.Recv()
	if err != nil {
		e.t.Fatal(err)
	}
	return stream, op.Name
}

// TestDoNotCacheActionsAreNotMerged: REAPI says the in-flight executions
// of a do_not_cache Action "may not be merged" (its result may differ run
// to run); identical cacheable ones still are.
func TestDoNotCacheActionsAreNotMerged(t *testing.T) {
	release := make(chan struct{})
	sb := &executortest.Sandbox{Func: executortest.Block(release)}
	e := newFakeEnv(t, executor.ServiceOptions{Concurrency: 4}, sb, nil, nil)
	ctx := context.Background()

	nc := e.action(actionSpec{script: "date", doNotCache: true})
	started := sb.NextRun()
	s1, name1 := e.firstOp(ctx, nc)
	<-started
	started = sb.NextRun()
	s2, name2 := e.firstOp(ctx, nc)
	if name1 == name2 {
		t.Fatalf("two executions of a do_not_cache action were merged into %s", name1)
	}
	<-started // the second one runs too

	c := e.action(actionSpec{script: "true"})
	started = sb.NextRun()
	s3, name3 := e.firstOp(ctx, c)
	<-started
	s4, name4 := e.firstOp(ctx, c)
	if name3 != name4 {
		t.Errorf("identical cacheable actions in flight were not merged: %s and %s", name3, name4)
	}
	close(release)
	for _, s := range []repb.Execution_ExecuteClient{s1, s2, s3, s4} {
		resp, _, err := drain(s)
		mustOK(t, resp, err)
	}
	if n := sb.Runs(); n != 3 {
		t.Errorf("%d runs, want 3 (two do_not_cache, one merged)", n)
	}
}

// TestIdleCancelNeverCancelsANewWatcher: when an operation's last client
// leaves, a timer cancels it after CancelGrace. An Execute of the same
// action arriving as the timer fires must either keep the operation alive
// or get a new one; it used to join the operation being cancelled and get
// CANCELLED for an action it never gave up on.
func TestIdleCancelNeverCancelsANewWatcher(t *testing.T) {
	release := make(chan struct{})
	sb := &executortest.Sandbox{Func: executortest.Block(release)}
	// The shortest grace, so the timer races the second client.
	e := newFakeEnv(t, executor.ServiceOptions{Concurrency: 64, CancelGrace: 1}, sb, nil, nil)
	const rounds = 200
	type pending struct {
		stream repb.Execution_ExecuteClient
		round  int
	}
	var second []pending
	for i := range rounds {
		d := e.action(actionSpec{script: fmt.Sprintf("echo %d", i)})
		ctx, cancel := context.WithCancel(context.Background())
		e.firstOp(ctx, d)
		cancel()                                   // the first client goes away...
		s, _ := e.firstOp(context.Background(), d) // ...as another asks for the same action
		second = append(second, pending{s, i})
	}
	close(release)
	cancelled := 0
	for _, p := range second {
		resp, _, err := drain(p.stream)
		if err != nil {
			t.Fatalf("round %d: %v", p.round, err)
		}
		if st := status.FromProto(resp.Status); st.Code() == codes.Canceled {
			cancelled++
		} else if st.Code() != codes.OK {
			t.Errorf("round %d: %v", p.round, st)
		}
	}
	if cancelled > 0 {
		t.Fatalf("%d of %d clients that never went away got CANCELLED: they joined an operation an idle timer was cancelling", cancelled, rounds)
	}
}

// lyingStore is a disk store whose first FindMissing answers "nothing
// missing": as if a blob were evicted right after the client's (or the
// executor's) check and before the executor pinned the inputs.
type lyingStore struct {
	*cas.DiskStore
	lied atomic.Bool
}

func (s *lyingStore) FindMissing(ctx context.Context, ds []cas.Digest) ([]cas.Digest, error) {
	if s.lied.CompareAndSwap(false, true) {
		return nil, nil
	}
	return s.DiskStore.FindMissing(ctx, ds)
}

// TestInputEvictedBeforePinIsMissing: a blob gone between the check and
// the pin must be reported as FAILED_PRECONDITION with a MISSING violation
// (what makes Bazel upload it again), not NOT_FOUND or INTERNAL.
func TestInputEvictedBeforePinIsMissing(t *testing.T) {
	for _, kind := range []string{"hardlink", "copy", "fuse"} {
		t.Run(kind, func(t *testing.T) {
			if kind == "fuse" {
				testutil.RequireRoot(t)
				err := actiondfs.Available()
				testutil.Require(t, err == nil, fmt.Sprintf("actiondfs: %v", err))
			}
			var ls *lyingStore
			wrap := func(d *cas.DiskStore) cas.Store { ls = &lyingStore{DiskStore: d}; return ls }
			opts := func(o *executor.Options) {
				switch kind {
				case "copy":
					o.InputRoot = executor.CopyInputRoot{Store: o.Store}
				case "fuse":
					r, err := actiondfs.NewInputRoot(ls, filepath.Join(t.TempDir(), "fs"))
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(func() { r.Close() })
					o.InputRoot = r
				}
			}
			e := newFakeEnv(t, executor.ServiceOptions{}, &executortest.Sandbox{}, wrap, opts)
			present := e.put([]byte("still here\n"))
			gone := cas.DigestOf([]byte("evicted after the check\n"))
			d := e.action(actionSpec{script: "cat a b", inputs: &repb.Directory{Files: []*repb.FileNode{
				{Name: "a", Digest: present.Proto()}, {Name: "b", Digest: gone.Proto()},
			}}})
			if subjects := e.executeMissing(t, d); len(subjects) != 1 || subjects[0] != "blobs/"+gone.String() {
				t.Fatalf("MISSING violations %v, want exactly blobs/%s", subjects, gone)
			}
		})
	}
}

// TestMissingInputsNameEveryBlob: inputs (and an Action) not in the CAS
// are FAILED_PRECONDITION with a MISSING violation for each.
func TestMissingInputsNameEveryBlob(t *testing.T) {
	e := newFakeEnv(t, executor.ServiceOptions{}, &executortest.Sandbox{}, nil, nil)
	absent := cas.DigestOf([]byte("never uploaded"))
	d := e.action(actionSpec{script: "cat f", inputs: &repb.Directory{Files: []*repb.FileNode{{Name: "f", Digest: absent.Proto()}}}})
	if subjects := e.executeMissing(t, d); !slices.Contains(subjects, "blobs/"+absent.String()) {
		t.Fatalf("no MISSING violation for %s in %v", absent, subjects)
	}
	// A missing Action blob is reported the same way.
	resp, _, err := e.execute(context.Background(), cas.DigestOf([]byte("no action")), false)
	if err != nil || status.FromProto(resp.Status).Code() != codes.FailedPrecondition {
		t.Fatalf("missing action: %v %v", resp.GetStatus(), err)
	}
}

// TestBadRequestsAreInvalidArgument: requests refused before any command
// runs (the output symlinks a command makes are
// TestEscapingOutputSymlinksAreInvalidArgument's).
func TestBadRequestsAreInvalidArgument(t *testing.T) {
	e := newFakeEnv(t, executor.ServiceOptions{}, &executortest.Sandbox{}, nil, nil)
	f := e.put([]byte("x"))
	cases := map[string]actionSpec{
		"unknown runtime":          {script: "true", platform: map[string]string{"libc": "glibc1.0"}},
		"output escapes":           {script: "true", outFiles: []string{"../escape"}},
		"absolute output":          {script: "true", outFiles: []string{"/etc/passwd"}},
		"working dir escapes":      {script: "true", wd: "../.."},
		"working dir via symlink":  {script: "true", wd: "l/x", inputs: &repb.Directory{Symlinks: []*repb.SymlinkNode{{Name: "l", Target: "../../.."}}}},
		"output via input symlink": {script: "true", outFiles: []string{"l/out"}, inputs: &repb.Directory{Symlinks: []*repb.SymlinkNode{{Name: "l", Target: ".."}}}},
		"dotdot input":             {script: "true", inputs: &repb.Directory{Files: []*repb.FileNode{{Name: "..", Digest: f.Proto()}}}},
		"bad memory":               {script: "true", platform: map[string]string{"memory": "lots"}},
	}
	for name, a := range cases {
		t.Run(name, func(t *testing.T) {
			e.wantInvalidArgument(t, a)
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

// TestBadRequestsAreRefusedBeforeStaging: every check on the request itself
// (timeout, platform properties, outputs, working directory) comes before
// the input root is staged, so a bad request costs no staging.
func TestBadRequestsAreRefusedBeforeStaging(t *testing.T) {
	ir := &executortest.InputRoot{}
	sb := &executortest.Sandbox{}
	e := newFakeEnv(t, executor.ServiceOptions{}, sb, nil, func(o *executor.Options) { o.InputRoot = ir })
	inputs := &repb.Directory{Files: []*repb.FileNode{{Name: "in.txt", Digest: e.put([]byte("input\n")).Proto()}}}
	cases := map[string]actionSpec{
		"negative timeout":    {script: "true", timeout: -time.Second},
		"unknown runtime":     {script: "true", platform: map[string]string{"libc": "glibc1.0"}},
		"bad memory":          {script: "true", platform: map[string]string{"memory": "lots"}},
		"output escapes":      {script: "true", outFiles: []string{"../escape"}},
		"working dir escapes": {script: "true", wd: "../.."},
	}
	for name, a := range cases {
		t.Run(name, func(t *testing.T) {
			a.inputs = inputs
			before := ir.Stages()
			e.wantInvalidArgument(t, a)
			if n := ir.Stages() - before; n != 0 {
				t.Fatalf("the input root was staged %d times for a request refused before staging", n)
			}
		})
	}
	if n := sb.Runs(); n != 0 {
		t.Errorf("%d commands ran for bad requests", n)
	}
	// The same inputs in a good request are staged, once.
	resp, _, err := e.execute(context.Background(), e.action(actionSpec{script: "true", inputs: inputs, timeout: time.Second}), false)
	mustOK(t, resp, err)
	if n := ir.Stages(); n != 1 {
		t.Fatalf("%d stagings in all after one good request, want 1", n)
	}
}

// executeMissing executes the action d, which must end in
// FAILED_PRECONDITION, and lists the subjects of its MISSING precondition
// violations, in order.
func (e *env) executeMissing(t *testing.T, d cas.Digest) []string {
	t.Helper()
	resp, _, err := e.execute(context.Background(), d, false)
	if err != nil {
		t.Fatal(err)
	}
	st := status.FromProto(resp.Status)
	if st.Code() != codes.FailedPrecondition {
		t.Fatalf("status %v, want FAILED_PRECONDITION", st)
	}
	var subjects []string
	for _, det := range st.Details() {
		if pf, ok := det.(*errdetails.PreconditionFailure); ok {
			for _, v := range pf.Violations {
				if v.Type == "MISSING" {
					subjects = append(subjects, v.Subject)
				}
			}
		}
	}
	return subjects
}

// TestQueueRunsAtMostConcurrencyAtOnce: with one slot, a second distinct
// action waits, reported QUEUED (Load counts it), until the first ends;
// then it runs, and both complete.
func TestQueueRunsAtMostConcurrencyAtOnce(t *testing.T) {
	release := make(chan struct{})
	sb := &executortest.Sandbox{Func: executortest.Block(release)}
	e := newFakeEnv(t, executor.ServiceOptions{Concurrency: 1}, sb, nil, nil)
	ctx := context.Background()

	started := sb.NextRun()
	s1, _ := e.firstOp(ctx, e.action(actionSpec{script: "first"}))
	<-started
	s2, err := e.exec.Execute(ctx, &repb.ExecuteRequest{ActionDigest: e.action(actionSpec{script: "second"}).Proto()})
	if err != nil {
		t.Fatal(err)
	}
	op, err := s2.Recv()
	if err != nil {
		t.Fatal(err)
	}
	md := &repb.ExecuteOperationMetadata{}
	if err := op.GetMetadata().UnmarshalTo(md); err != nil {
		t.Fatal(err)
	}
	if op.Done || md.Stage != repb.ExecutionStage_QUEUED {
		t.Errorf("the waiting action reports stage %v (done %v), want QUEUED", md.Stage, op.Done)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if q, r := e.svc.Load(); q == 1 && r == 1 {
			break
		}
		if time.Now().After(deadline) {
			q, r := e.svc.Load()
			t.Fatalf("with one slot and two actions: %d queued, %d running; want 1 and 1", q, r)
		}
		time.Sleep(time.Millisecond)
	}
	if n := sb.Runs(); n != 1 {
		t.Fatalf("%d runs while one slot is taken, want 1", n)
	}
	close(release)
	for _, s := range []repb.Execution_ExecuteClient{s1, s2} {
		resp, _, err := drain(s)
		mustOK(t, resp, err)
	}
	if n := sb.Runs(); n != 2 {
		t.Errorf("%d runs, want 2", n)
	}
	if q, r := e.svc.Load(); q != 0 || r != 0 {
		t.Errorf("after both: %d queued, %d running", q, r)
	}
}
