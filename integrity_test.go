package actiond_test

// An input blob whose file went bad never backs an action (issue 15): the
// action fails with FAILED_PRECONDITION MISSING for that digest, the blob
// is quarantined, and after the re-upload Bazel would do, the action runs
// on the right bytes. The real server in-process, the real sandbox, each
// input root strategy.

import (
	"os"
	"path/filepath"
	"testing"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	"github.com/actiond/actiond"
	"github.com/actiond/actiond/cas"
	actiondfs "github.com/actiond/actiond/fs"
	"github.com/actiond/actiond/internal/actiondtest"
	"github.com/actiond/actiond/internal/testutil"
	"github.com/actiond/actiond/sandbox"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

func corruptStored(t *testing.T, root string, d cas.Digest, kind string) {
	t.Helper()
	testutil.CorruptBlob(t, root, d.Hash, kind)
}

// putBlobs uploads blobs with BatchUpdateBlobs.
func putBlobs(t *testing.T, c *clients, blobs ...[]byte) {
	t.Helper()
	actiondtest.Upload(t, c.cas, blobs...)
}

func marshal(t *testing.T, m proto.Message) []byte {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func execute(t *testing.T, c *clients, action cas.Digest) *repb.ExecuteResponse {
	t.Helper()
	st, err := repb.NewExecutionClient(c.conn).Execute(bg, &repb.ExecuteRequest{ActionDigest: action.Proto(), SkipCacheLookup: true})
	if err != nil {
		t.Fatal(err)
	}
	var op *longrunningpb.Operation
	for op == nil || !op.Done {
		if op, err = st.Recv(); err != nil {
			t.Fatal(err)
		}
	}
	resp := &repb.ExecuteResponse{}
	if err := op.GetResponse().UnmarshalTo(resp); err != nil {
		t.Fatal(err)
	}
	return resp
}

func wantMissing(t *testing.T, resp *repb.ExecuteResponse, d cas.Digest) {
	t.Helper()
	st := status.FromProto(resp.Status)
	if st.Code() != codes.FailedPrecondition {
		t.Fatalf("status %v, want FAILED_PRECONDITION (exit code %d)", st, resp.GetResult().GetExitCode())
	}
	for _, det := range st.Details() {
		if pf, ok := det.(*errdetails.PreconditionFailure); ok {
			for _, v := range pf.Violations {
				if v.Type == "MISSING" && v.Subject == "blobs/"+d.String() {
					return
				}
			}
		}
	}
	t.Fatalf("no MISSING violation for %s in %v", d, st.Details())
}

func TestCorruptInputNeverBacksAnAction(t *testing.T) {
	testutil.RequireRoot(t)
	kinds := map[string][]string{"hardlink": {"flip", "truncate", "same-size"}, "copy": {"same-size"}, "fuse": {"flip", "same-size"}}
	for _, strategy := range []string{"hardlink", "copy", "fuse"} {
		for _, kind := range kinds[strategy] {
			t.Run(strategy+"/"+kind, func(t *testing.T) {
				if strategy == "fuse" {
					err := actiondfs.Available()
					testutil.Require(t, err == nil, "actiondfs needs FUSE: "+errString(err))
				}
				sb := hostSandbox(t)
				root := t.TempDir()
				opts := actiond.Options{Root: root, NoFsync: true, Sandbox: sb, InputRootKind: strategy, ScrubRate: -1, Logger: quiet()}
				stop, c := restartable(t, opts)

				in := blobData(1, 10000)
				ind := cas.DigestOf(in)
				ad := putHashAction(t, c, in)
				want := ind.Hash + "  in\n"
				checkOut := func(resp *repb.ExecuteResponse) {
					t.Helper()
					if resp.Status.GetCode() != 0 || resp.Result.GetExitCode() != 0 || len(resp.Result.GetOutputFiles()) != 1 {
						t.Fatalf("execute: %v, result %v", resp.Status, resp.Result)
					}
					od, _ := cas.FromProto(resp.Result.OutputFiles[0].Digest)
					got, err := readBlob(bg, c, od)
					if err != nil || string(got) != want {
						t.Fatalf("output %q, %v; want %q", got, err, want)
					}
				}
				checkOut(execute(t, c, ad)) // actiondfs now holds the blob open

				// The file goes bad behind the server's back and the server
				// restarts (a power loss, a disk that rots while stopped):
				// nothing is verified any more.
				corruptStored(t, root, ind, kind)
				stop()
				_, c = restartable(t, opts)

				wantMissing(t, execute(t, c, ad), ind)
				resp, err := c.cas.FindMissingBlobs(bg, &repb.FindMissingBlobsRequest{BlobDigests: []*repb.Digest{ind.Proto()}})
				if err != nil || len(resp.MissingBlobDigests) != 1 {
					t.Fatalf("FindMissingBlobs after the failed action: %v, %v; want the input missing", resp, err)
				}
				// A truncated file is simply missing after a restart (the
				// index has its size on disk); the others are quarantined.
				if _, err := os.Stat(filepath.Join(root, "cas", cas.QuarantineDir, ind.Hash)); err != nil && kind != "truncate" {
					t.Errorf("input not quarantined: %v", err)
				}
				putBlobs(t, c, in)
				checkOut(execute(t, c, ad))
			})
		}
	}
}

// With actiondfs, a blob found bad while the server runs (here by a read)
// must not stay readable through the file actiondfs keeps open for it.
func TestActiondfsDropsQuarantinedBlob(t *testing.T) {
	testutil.RequireRoot(t)
	err := actiondfs.Available()
	testutil.Require(t, err == nil, "actiondfs needs FUSE: "+errString(err))
	sb := hostSandbox(t)
	root := t.TempDir()
	_, c := restartable(t, actiond.Options{Logger: quiet(), Root: root, NoFsync: true, Sandbox: sb, InputRootKind: "fuse", ScrubRate: -1})
	in := blobData(2, 5000)
	ind := cas.DigestOf(in)
	ad := putHashAction(t, c, in)
	want := ind.Hash + "  in\n"
	run := func() string {
		t.Helper()
		resp := execute(t, c, ad)
		if resp.Status.GetCode() != 0 || len(resp.Result.GetOutputFiles()) != 1 {
			t.Fatalf("execute: %v", resp.Status)
		}
		od, _ := cas.FromProto(resp.Result.OutputFiles[0].Digest)
		got, err := readBlob(bg, c, od)
		if err != nil {
			t.Fatal(err)
		}
		return string(got)
	}
	if got := run(); got != want {
		t.Fatalf("first run: %q", got)
	}
	corruptStored(t, root, ind, "flip") // rewrites the very file actiondfs has open
	if _, err := readBlob(bg, c, ind); status.Code(err) != codes.DataLoss {
		t.Fatalf("read of the corrupt input: %v, want DATA_LOSS", err)
	}
	putBlobs(t, c, in)
	if got := run(); got != want {
		t.Fatalf("after quarantine and re-upload the action saw %q, want %q", got, want)
	}
}

// putHashAction uploads in, as the action's one input file "in", and an
// action whose command writes `sha256sum in` to the output file "out"; it
// returns the action's digest.
func putHashAction(t *testing.T, c *clients, in []byte) cas.Digest {
	t.Helper()
	dir := marshal(t, &repb.Directory{Files: []*repb.FileNode{{Name: "in", Digest: cas.DigestOf(in).Proto()}}})
	cmd := marshal(t, &repb.Command{Arguments: []string{"/bin/sh", "-c", "sha256sum in > out"}, OutputFiles: []string{"out"},
		EnvironmentVariables: []*repb.Command_EnvironmentVariable{{Name: "PATH", Value: "/usr/bin:/bin"}}})
	act := marshal(t, &repb.Action{CommandDigest: cas.DigestOf(cmd).Proto(), InputRootDigest: cas.DigestOf(dir).Proto()})
	putBlobs(t, c, in, dir, cmd, act)
	return cas.DigestOf(act)
}

// hostSandbox is a sandbox with only the host runtime, closed at Cleanup
// (after any server started later in the test has stopped).
func hostSandbox(t *testing.T) *sandbox.Sandbox {
	t.Helper()
	sb, err := sandbox.New(sandbox.Config{Runtimes: []sandbox.Runtime{sandbox.HostRuntime()}, StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sb.Close() })
	return sb
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// A corrupt Command or Directory blob is read (and verified) by the
// executor itself: the action fails with MISSING for it, at once, without a
// restart, and runs after the re-upload.
func TestCorruptActionProtosAreMissing(t *testing.T) {
	testutil.RequireRoot(t)
	sb := hostSandbox(t)
	root := t.TempDir()
	_, c := restartable(t, actiond.Options{Root: root, NoFsync: true, Sandbox: sb, InputRootKind: "hardlink", ScrubRate: -1, Logger: quiet()})
	in := []byte("input\n")
	sub := marshal(t, &repb.Directory{Files: []*repb.FileNode{{Name: "in", Digest: cas.DigestOf(in).Proto()}}})
	dir := marshal(t, &repb.Directory{Directories: []*repb.DirectoryNode{{Name: "sub", Digest: cas.DigestOf(sub).Proto()}}})
	cmd := marshal(t, &repb.Command{Arguments: []string{"/bin/cat", "sub/in"}})
	act := marshal(t, &repb.Action{CommandDigest: cas.DigestOf(cmd).Proto(), InputRootDigest: cas.DigestOf(dir).Proto()})
	putBlobs(t, c, in, sub, dir, cmd, act)
	ad := cas.DigestOf(act)
	for _, bad := range [][]byte{sub, cmd} { // sub first: once a tree is loaded its directories are remembered, parsed from verified bytes
		d := cas.DigestOf(bad)
		corruptStored(t, root, d, "flip")
		wantMissing(t, execute(t, c, ad), d)
		putBlobs(t, c, bad)
		if resp := execute(t, c, ad); resp.Status.GetCode() != 0 || resp.Result.GetExitCode() != 0 {
			t.Fatalf("after re-uploading %s: %v, exit %d", d, resp.Status, resp.Result.GetExitCode())
		}
	}
}
