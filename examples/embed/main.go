// Command embed runs one action with actiond embedded in the process: a
// disk CAS, a bbolt ActionCache and the Linux sandbox with the host
// runtime, put together by actiond.New, no gRPC anywhere. Run it as root:
//
//	go run ./examples/embed 'echo hello from the sandbox > out.txt; uname -a'
package main

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/sandbox"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"
)

func main() {
	script := "echo hello from the sandbox > out.txt && uname -sr"
	if len(os.Args) > 1 {
		script = os.Args[1]
	}
	if err := run(context.Background(), script); err != nil {
		fmt.Fprintln(os.Stderr, "embed:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, script string) error {
	root, err := os.MkdirTemp("", "actiond-embed-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(root)

	sb, err := sandbox.New(sandbox.Config{
		Runtimes: []sandbox.Runtime{sandbox.HostRuntime()},
		StateDir: filepath.Join(root, "sandbox"),
	})
	if err != nil {
		return fmt.Errorf("sandbox (needs root on Linux): %w", err)
	}
	defer sb.Close()
	// A disk CAS and a bbolt ActionCache under root; no gRPC server is
	// started, actions run on srv.Executor.
	srv, err := actiond.New(actiond.Options{Root: root, Sandbox: sb, InputRootKind: "hardlink", Logger: slog.Default()})
	if err != nil {
		return err
	}
	defer srv.Close() // waits for the stages of finished actions to be removed
	store, ex := srv.Store, srv.Executor

	// What a REAPI client would upload: Command, input root, Action.
	put := func(m proto.Message) (cas.Digest, error) {
		b, err := proto.Marshal(m)
		if err != nil {
			return cas.Digest{}, err
		}
		d := cas.DigestOf(b)
		return d, store.Put(ctx, d, bytes.NewReader(b))
	}
	cmd, err := put(&repb.Command{
		Arguments:            []string{"/bin/sh", "-c", script},
		EnvironmentVariables: []*repb.Command_EnvironmentVariable{{Name: "PATH", Value: "/usr/bin:/bin"}},
		OutputPaths:          []string{"out.txt"},
	})
	if err != nil {
		return err
	}
	inputs, err := put(&repb.Directory{})
	if err != nil {
		return err
	}
	action, err := put(&repb.Action{CommandDigest: cmd.Proto(), InputRootDigest: inputs.Proto()})
	if err != nil {
		return err
	}

	resp := ex.Execute(ctx, executor.Request{
		ActionDigest: action,
		Progress:     func(s executor.Stage) { slog.Info("stage", "stage", stageNames[s]) },
	})
	if err := statusErr(resp); err != nil {
		return fmt.Errorf("execute: %w", err)
	}
	res := resp.Result
	fmt.Printf("exit code: %d\n", res.ExitCode)
	show := func(what string, pd *repb.Digest) error {
		if pd == nil {
			return nil
		}
		d, err := cas.FromProto(pd)
		if err != nil {
			return err
		}
		b, err := cas.ReadAll(ctx, store, d)
		if err != nil {
			return err
		}
		fmt.Printf("%s: %q\n", what, b)
		return nil
	}
	if err := show("stdout", res.StdoutDigest); err != nil {
		return err
	}
	if err := show("stderr", res.StderrDigest); err != nil {
		return err
	}
	for _, f := range res.OutputFiles {
		if err := show(f.Path, f.Digest); err != nil {
			return err
		}
	}
	return nil
}

var stageNames = map[executor.Stage]string{
	executor.StageCacheCheck:       "cache check",
	executor.StageFetchingInputs:   "fetching inputs",
	executor.StageRunning:          "running",
	executor.StageUploadingOutputs: "uploading outputs",
}

// statusErr turns the response status into an error (nil for OK).
func statusErr(resp *repb.ExecuteResponse) error {
	if resp.Status.GetCode() == 0 {
		return nil
	}
	return fmt.Errorf("%d: %s", resp.Status.GetCode(), resp.Status.GetMessage())
}
