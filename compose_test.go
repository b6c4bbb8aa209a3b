package actiond_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/executor/executortest"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
)

// decorated is the least a decorator of a cas.Store can be: it embeds the
// store it wraps (a real one would override a method or two).
type decorated struct{ cas.Store }

// TestDecoratedStoreKeepsPinsAndHardlinks: a store passed to actiond.New
// behind a decorator keeps its capabilities. Pin and LocalPath used to be
// found by type assertion, which a decorator hides: the executor then
// copied inputs instead of hardlinking them, and stopped pinning them, so
// they could be evicted while the action ran.
func TestDecoratedStoreKeepsPinsAndHardlinks(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	disk, err := cas.NewDiskStore(filepath.Join(root, "cas"), cas.WithFsync(false))
	if err != nil {
		t.Fatal(err)
	}
	put := func(data []byte) cas.Digest {
		d := cas.DigestOf(data)
		if err := disk.Put(ctx, d, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		return d
	}
	putProto := func(m proto.Message) cas.Digest {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return put(b)
	}
	input := put([]byte("an input the running action needs"))
	inputRoot := putProto(&repb.Directory{Files: []*repb.FileNode{{Name: "in.txt", Digest: input.Proto()}}})
	command := putProto(&repb.Command{Arguments: []string{"/bin/true"}})
	action := putProto(&repb.Action{CommandDigest: command.Proto(), InputRootDigest: inputRoot.Proto()})

	var linked, pinned bool
	sb := &executortest.Sandbox{Func: func(ctx context.Context, spec *executor.RunSpec) (*executor.RunResult, error) {
		// Zero-copy staging: the staged input is the blob's own file.
		staged, err := os.Stat(filepath.Join(spec.ExecRoot, "in.txt"))
		if err != nil {
			return nil, err
		}
		blob, err := disk.LocalPath(ctx, input, false)
		if err != nil {
			return nil, err
		}
		fi, err := os.Stat(blob)
		if err != nil {
			return nil, err
		}
		linked = os.SameFile(staged, fi)
		// Pinning: shrinking the store to nothing keeps the inputs of the
		// running action.
		disk.Evict(1)
		missing, err := disk.FindMissing(ctx, []cas.Digest{input})
		pinned = err == nil && len(missing) == 0
		return &executor.RunResult{}, nil
	}}
	srv, err := actiond.New(actiond.Options{
		Root:          root,
		Store:         decorated{disk},
		Sandbox:       sb,
		InputRootKind: "hardlink",
		NoFsync:       true,
	})
	if err != nil {
		t.Fatalf("New with a decorated disk store and hardlinked inputs: %v", err)
	}
	defer srv.Close()
	if got := srv.InputRootName(); got != "hardlink" {
		t.Errorf("input root %q, want hardlink", got)
	}
	resp := srv.Executor.Execute(ctx, executor.Request{ActionDigest: action})
	if resp.Status.GetCode() != 0 {
		t.Fatalf("Execute: %v", resp.Status)
	}
	if sb.Runs() != 1 {
		t.Fatalf("%d runs, want 1", sb.Runs())
	}
	if !linked {
		t.Error("the input was copied, not hardlinked from the store behind the decorator")
	}
	if !pinned {
		t.Error("the running action's input was evicted: the decorator lost the store's pins")
	}
}

// TestExtraServicesAreRegistered: Options.ExtraServices add services next
// to actiond's own wherever Register puts them, and get the Server.
func TestExtraServicesAreRegistered(t *testing.T) {
	extra := &grpc.ServiceDesc{ServiceName: "test.Extra", HandlerType: (*any)(nil)}
	var got *actiond.Server
	srv, err := actiond.New(actiond.Options{
		Root: t.TempDir(),
		ExtraServices: []func(grpc.ServiceRegistrar, *actiond.Server){
			func(r grpc.ServiceRegistrar, s *actiond.Server) { got = s; r.RegisterService(extra, struct{}{}) },
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	g := srv.GRPCServer()
	info := g.GetServiceInfo()
	if _, ok := info["test.Extra"]; !ok {
		t.Errorf("services %v lack test.Extra", info)
	}
	if _, ok := info["build.bazel.remote.execution.v2.ContentAddressableStorage"]; !ok {
		t.Errorf("services %v lack the CAS", info)
	}
	if got != srv {
		t.Error("the hook did not get the Server")
	}
}
