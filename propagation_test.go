//go:build linux

package actiond_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/testutil"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
)

// TestNoMountsLeakUnderSharedRoot runs `actiond serve` where / is rshared,
// as on every systemd host, and runs actions with actiondfs input roots:
// the mounts under --root must not grow with the number of actions, and
// none may remain after a clean stop (nor stage directories).
func TestNoMountsLeakUnderSharedRoot(t *testing.T) {
	testutil.SkipIfShort(t, "builds and runs the actiond binary")
	if testutil.RunUnderSharedRoot(t) {
		return
	}
	testutil.Require(t, fuseWorks(), "needs /dev/fuse for actiondfs input roots")
	bin := buildActiond(t)
	root := t.TempDir()
	addr := freeAddr(t)
	cmd := exec.Command(bin, "serve", "--listen", addr, "--root", root, "--log-level", "info", "--input-root", "fuse")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := newClients(conn)
	waitHealthy(t, c, &stderr)
	exec := repb.NewExecutionClient(conn)

	run := func(i int) {
		t.Helper()
		d := uploadAction(t, c, []string{"/bin/sh", "-c", fmt.Sprintf("echo %d > out/o.txt", i)}, []string{"out/o.txt"})
		ctx, cancel := context.WithTimeout(bg, time.Minute)
		defer cancel()
		resp := executeOnce(ctx, t, exec, d)
		if resp.GetResult().GetExitCode() != 0 || len(resp.GetResult().GetOutputFiles()) != 1 {
			t.Fatalf("action %d: %v\n%s", i, resp, stderr.String())
		}
	}
	const warm, more = 2, 6
	for i := range warm {
		run(i)
	}
	time.Sleep(500 * time.Millisecond) // background stage cleanup and spare refill
	after := testutil.MountsUnder(t, root)
	for i := warm; i < warm+more; i++ {
		run(i)
	}
	time.Sleep(500 * time.Millisecond)
	if later := testutil.MountsUnder(t, root); len(later) > len(after) {
		t.Errorf("mounts under --root grew from %d after %d actions to %d after %d: %s", len(after), warm, len(later), warm+more, strings.Join(later, ", "))
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("serve after SIGTERM: %v\n%s", err, stderr.String())
	}
	if left := testutil.MountsUnder(t, root); len(left) != 0 {
		t.Errorf("%d mounts remain under --root after a clean stop: %s", len(left), strings.Join(left, ", "))
	}
	if strings.Contains(stderr.String(), "did not stop after unmount") {
		t.Errorf("an actiondfs server outlived its unmount:\n%s", stderr.String())
	}
	for _, dir := range []string{"cas/stage", "cas/fs/mnt"} {
		entries, _ := os.ReadDir(filepath.Join(root, dir))
		if len(entries) != 0 {
			t.Errorf("%s still holds %d entries after a clean stop", dir, len(entries))
		}
	}
}

func fuseWorks() bool {
	f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

// uploadAction stores a Command, an empty input root and an Action and
// returns the Action's digest.
func uploadAction(t *testing.T, c *clients, args, outputs []string) *repb.Digest {
	t.Helper()
	command := &repb.Command{Arguments: args, OutputFiles: outputs,
		EnvironmentVariables: []*repb.Command_EnvironmentVariable{{Name: "PATH", Value: "/usr/bin:/bin"}}}
	cmdBytes, _ := proto.Marshal(command)
	dirBytes, _ := proto.Marshal(&repb.Directory{})
	action := &repb.Action{CommandDigest: cas.DigestOf(cmdBytes).Proto(), InputRootDigest: cas.DigestOf(dirBytes).Proto()}
	actionBytes, _ := proto.Marshal(action)
	var reqs []*repb.BatchUpdateBlobsRequest_Request
	for _, b := range [][]byte{cmdBytes, dirBytes, actionBytes} {
		reqs = append(reqs, &repb.BatchUpdateBlobsRequest_Request{Digest: cas.DigestOf(b).Proto(), Data: b})
	}
	resp, err := c.cas.BatchUpdateBlobs(bg, &repb.BatchUpdateBlobsRequest{Requests: reqs})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range resp.Responses {
		if r.Status.GetCode() != 0 {
			t.Fatalf("upload %v: %v", r.Digest, r.Status)
		}
	}
	return cas.DigestOf(actionBytes).Proto()
}

// executeOnce runs one Execute to completion and returns its response.
func executeOnce(ctx context.Context, t *testing.T, c repb.ExecutionClient, d *repb.Digest) *repb.ExecuteResponse {
	t.Helper()
	stream, err := c.Execute(ctx, &repb.ExecuteRequest{ActionDigest: d, SkipCacheLookup: true})
	if err != nil {
		t.Fatal(err)
	}
	for {
		op, err := stream.Recv()
		if err != nil {
			t.Fatalf("Execute: %v", err)
		}
		if !op.Done {
			continue
		}
		resp := &repb.ExecuteResponse{}
		if err := op.GetResponse().UnmarshalTo(resp); err != nil {
			t.Fatalf("Execute: %v (%v)", err, op)
		}
		return resp
	}
}
