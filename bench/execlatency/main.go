// Command execlatency measures the per-action overhead of a trivial action,
// side by side in one run:
//
//   - actiond: the client-observed latency of REAPI Execute calls for a
//     trivial command (/bin/true, empty input root, skip_cache_lookup so
//     that every call executes), with a breakdown by the server's
//     ExecutedActionMetadata timestamps (queue, input staging, sandbox run,
//     output upload, and the rest: gRPC, Action/Command loads, ActionCache
//     write, server log);
//   - Bazel's linux-sandbox binary, invoked on the same command the way
//     Bazel 4.2.3 invokes it for a genrule with --nosandbox_debug (a fresh
//     sandbox directory per action, `-W EXECROOT -t 15 -w EXECROOT -w /tmp
//     -w /dev/shm -- CMD`, stdout and stderr redirected to files, the
//     directory removed afterwards), with and without -N (a network
//     namespace, which actiond always creates);
//   - a plain fork+exec of the command, as the floor.
//
// The subjects take turns (one sample of each per round), so a change in
// the machine's load affects all of them alike.
//
// Usage (as root; actiond must be able to execute):
//
//	go run ./bench/execlatency --actiond /path/to/actiond   # starts a private server
//	go run ./bench/execlatency --addr 127.0.0.1:8980        # uses a running one
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/actiond/actiond/bench/internal/benchutil"
	"github.com/actiond/actiond/internal/bazelws"
)

func main() {
	addr := flag.String("addr", "", "address (host:port) of a running actiond")
	actiond := flag.String("actiond", "", "start this actiond binary on a fresh root instead of using --addr")
	serverArgs := flag.String("server-args", "", "extra `actiond serve` flags with --actiond (space-separated)")
	instance := flag.String("instance", "", "REAPI instance name")
	n := flag.Int("n", 200, "measured runs per subject")
	warmup := flag.Int("warmup", 10, "unmeasured runs first, per subject")
	sandboxBin := flag.String("linux-sandbox", "", "Bazel's linux-sandbox binary (default: <bazel info install_base>/linux-sandbox); \"none\" skips it")
	command := flag.String("cmd", "/bin/true", "the trivial command: an absolute path, then arguments (space-separated)")
	inputs := flag.Int("inputs", 0, "input files (in/f0 .. in/fN-1, a few bytes each) in every action's input root")
	jsonOut := flag.String("json", "", "also write the results as JSON to this file")
	flag.Parse()
	if err := run(*addr, *actiond, *serverArgs, *instance, *n, *warmup, *sandboxBin, strings.Fields(*command), *inputs, *jsonOut); err != nil {
		fmt.Fprintln(os.Stderr, "execlatency:", err)
		os.Exit(1)
	}
}

// subject is one thing measured: sample runs it once.
type subject struct {
	name    string
	sample  func() (time.Duration, error)
	samples []time.Duration
}

func run(addr, actiond, serverArgs, instance string, n, warmup int, sandboxBin string, command []string, inputs int, jsonOut string) error {
	if n <= 0 || inputs < 0 {
		return errors.New("-n must be positive, -inputs not negative")
	}
	if len(command) == 0 || !filepath.IsAbs(command[0]) {
		return fmt.Errorf("-cmd %q: want an absolute path first", command)
	}
	res := benchutil.ExecResult{Load: benchutil.Load(), Inputs: inputs}
	// The inputs, for fork+exec and linux-sandbox (which gets symlinks to
	// them, as Bazel's sandbox does).
	inputDir, err := os.MkdirTemp("", "execlatency-inputs-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(inputDir)
	if err := os.Mkdir(filepath.Join(inputDir, "in"), 0o755); err != nil {
		return err
	}
	for i := range inputs {
		if err := os.WriteFile(filepath.Join(inputDir, "in", fmt.Sprintf("f%d", i)), inputContent(i), 0o644); err != nil {
			return err
		}
	}
	name := strings.Join(command, " ")
	if inputs > 0 {
		name += fmt.Sprintf(" (%d inputs)", inputs)
	}
	subjects := []*subject{{name: "fork+exec " + name, sample: timed(func() error {
		cmd := exec.Command(command[0], command[1:]...)
		cmd.Dir = inputDir
		return cmd.Run()
	})}}

	if sandboxBin != "none" {
		if sandboxBin == "" {
			var err error
			if sandboxBin, err = findLinuxSandbox(); err != nil {
				return err
			}
		}
		base, err := os.MkdirTemp("", "execlatency-sandbox-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(base)
		subjects = append(subjects,
			&subject{name: "linux-sandbox (as Bazel runs a genrule)", sample: timed(linuxSandbox(sandboxBin, base, inputDir, inputs, command, false))},
			&subject{name: "linux-sandbox -N (+ network namespace)", sample: timed(linuxSandbox(sandboxBin, base, inputDir, inputs, command, true))})
	}

	var ex *actiondExec
	var srv *benchutil.Server
	if actiond != "" {
		root, err := os.MkdirTemp("", "execlatency-actiond-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(root)
		srv, err = benchutil.StartServer(actiond, filepath.Join(root, "root"), strings.Fields(serverArgs)...)
		if err != nil {
			return err
		}
		defer srv.Stop()
		addr = srv.Addr
		res.InputRoot = srv.InputRoot()
	}
	if addr != "" {
		var err error
		if ex, err = newActiondExec(addr, instance, command, inputs); err != nil {
			return fmt.Errorf("actiond at %s: %w", addr, err)
		}
		defer ex.conn.Close()
		subjects = append(subjects, &subject{name: "actiond Execute (client-observed)", sample: ex.sample})
	}

	for _, s := range subjects {
		for range warmup {
			if _, err := s.sample(); err != nil {
				return fmt.Errorf("%s: %w", s.name, err)
			}
		}
	}
	if ex != nil {
		ex.phases = nil
	}
	// The server's CPU over the measured runs is its actions' alone (the
	// other subjects run in processes of their own): server, helpers and
	// commands, which it reaps.
	// The split (benchutil.ServerCPU) adds up to the whole.
	var own0, cmds0 time.Duration
	if srv != nil {
		var err error
		if own0, cmds0, err = srv.SplitCPU(); err != nil {
			return err
		}
	}
	for range n {
		for _, s := range subjects {
			d, err := s.sample()
			if err != nil {
				return fmt.Errorf("%s: %w", s.name, err)
			}
			s.samples = append(s.samples, d)
		}
	}
	if srv != nil {
		own1, cmds1, err := srv.SplitCPU()
		if err != nil {
			return err
		}
		res.ServerCPUPerAction = float64((own1 + cmds1 - own0 - cmds0).Microseconds()) / 1e3 / float64(n)
		res.ActiondCPUPerAction = float64((own1 - own0).Microseconds()) / 1e3 / float64(n)
	}
	fmt.Printf("trivial action latency, %d runs each, interleaved (load before: %s; actiond input root: %s; %d inputs)\n", n, res.Load, res.InputRoot, inputs)
	if srv != nil {
		fmt.Printf("actiond CPU per action (server, helpers and commands): %.2f ms, of which server and helpers: %.2f ms\n", res.ServerCPUPerAction, res.ActiondCPUPerAction)
	}
	for _, s := range subjects {
		st := benchutil.Summarise(s.name, s.samples)
		res.Subject = append(res.Subject, st)
		fmt.Println(st)
	}
	if ex != nil {
		res.Phases = ex.summarise()
		for _, st := range res.Phases {
			fmt.Println(st)
		}
	}
	return benchutil.WriteJSON(jsonOut, res)
}

func timed(f func() error) func() (time.Duration, error) {
	return func() (time.Duration, error) {
		start := time.Now()
		err := f()
		return time.Since(start), err
	}
}

// findLinuxSandbox asks Bazel for its install base (in a throwaway
// workspace: `bazel info` needs one) and returns the linux-sandbox in it.
func findLinuxSandbox() (string, error) {
	ws, err := os.MkdirTemp("", "execlatency-ws-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(ws)
	if err := os.WriteFile(filepath.Join(ws, "WORKSPACE"), nil, 0o644); err != nil {
		return "", err
	}
	our := filepath.Join(ws, "our")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	startup := []string{"--output_user_root=" + our, "--nohome_rc", "--max_idle_secs=10"}
	cmd := exec.CommandContext(ctx, "bazel", append(startup, "info", "install_base")...)
	cmd.Dir = ws
	out, err := cmd.Output()
	shutdown := exec.Command("bazel", append(startup, "shutdown")...)
	shutdown.Dir = ws
	shutdown.Run()
	bazelws.MakeWritable(our)
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		return "", fmt.Errorf("bazel info install_base: %v\n%s", err, stderr)
	}
	p := filepath.Join(strings.TrimSpace(string(out)), "linux-sandbox")
	if _, err := os.Stat(p); err != nil {
		return "", err
	}
	return p, nil
}

// linuxSandbox returns one run of the command through linux-sandbox as
// Bazel 4.2.3 does it for a genrule with --nosandbox_debug: a new sandbox
// directory with an execroot holding a symlink per input, `linux-sandbox -W
// EXECROOT -t 15 -w EXECROOT -w /tmp -w /dev/shm -- CMD` with stdout and
// stderr redirected to files, then the directory deleted.
func linuxSandbox(bin, base, inputDir string, inputs int, command []string, netns bool) func() error {
	i := 0
	return func() error {
		i++
		dir := filepath.Join(base, fmt.Sprint(netns, i))
		execroot := filepath.Join(dir, "execroot", "ws")
		if err := os.MkdirAll(filepath.Join(execroot, "in"), 0o755); err != nil {
			return err
		}
		for j := range inputs {
			name := fmt.Sprintf("f%d", j)
			if err := os.Symlink(filepath.Join(inputDir, "in", name), filepath.Join(execroot, "in", name)); err != nil {
				return err
			}
		}
		stdout, err := os.Create(filepath.Join(dir, "stdout"))
		if err != nil {
			return err
		}
		defer stdout.Close()
		stderr, err := os.Create(filepath.Join(dir, "stderr"))
		if err != nil {
			return err
		}
		defer stderr.Close()
		args := []string{"-W", execroot, "-t", "15", "-w", execroot, "-w", "/tmp", "-w", "/dev/shm"}
		if netns {
			args = append(args, "-N")
		}
		args = append(append(args, "--"), command...)
		cmd := exec.Command(bin, args...)
		cmd.Dir = execroot
		cmd.Stdout = stdout
		cmd.Stderr = stderr
		if err := cmd.Run(); err != nil {
			b, _ := os.ReadFile(stderr.Name())
			return fmt.Errorf("%v\n%s", err, b)
		}
		return os.RemoveAll(dir)
	}
}

func inputContent(i int) []byte { return fmt.Appendf(nil, "input %d\n", i) }

// actiondExec executes one uploaded trivial action again and again.
type actiondExec struct {
	conn    *grpc.ClientConn
	exe     repb.ExecutionClient
	req     *repb.ExecuteRequest
	command []string
	phases  []phases
}

// phases of one execution, from ExecutedActionMetadata.
type phases struct{ queue, input, run, output, rest time.Duration }

func newActiondExec(addr, instance string, command []string, inputs int) (*actiondExec, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	var blobs []*repb.BatchUpdateBlobsRequest_Request
	add := func(b []byte, d *repb.Digest) *repb.Digest {
		blobs = append(blobs, &repb.BatchUpdateBlobsRequest_Request{Digest: d, Data: b})
		return d
	}
	root := &repb.Directory{}
	if inputs > 0 {
		in := &repb.Directory{}
		for i := range inputs {
			in.Files = append(in.Files, &repb.FileNode{Name: fmt.Sprintf("f%d", i), Digest: add(blobOf(inputContent(i)))})
		}
		// Directory entries must be sorted by name.
		slices.SortFunc(in.Files, func(a, b *repb.FileNode) int { return strings.Compare(a.Name, b.Name) })
		root.Directories = []*repb.DirectoryNode{{Name: "in", Digest: add(marshal(in))}}
	}
	cmdpb := &repb.Command{
		Arguments:            command,
		EnvironmentVariables: []*repb.Command_EnvironmentVariable{{Name: "PATH", Value: "/bin:/usr/bin"}},
	}
	cmdDigest := add(marshal(cmdpb))
	rootDigest := add(marshal(root))
	actionDigest := add(marshal(&repb.Action{CommandDigest: cmdDigest, InputRootDigest: rootDigest}))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cas := repb.NewContentAddressableStorageClient(conn)
	for len(blobs) > 0 {
		batch := blobs[:min(len(blobs), 1000)]
		blobs = blobs[len(batch):]
		resp, err := cas.BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{InstanceName: instance, Requests: batch})
		if err != nil {
			conn.Close()
			return nil, fmt.Errorf("upload: %w", err)
		}
		for _, r := range resp.Responses {
			if codes.Code(r.GetStatus().GetCode()) != codes.OK {
				conn.Close()
				return nil, fmt.Errorf("upload %s: %s", r.Digest.GetHash(), r.GetStatus().GetMessage())
			}
		}
	}
	return &actiondExec{
		conn:    conn,
		exe:     repb.NewExecutionClient(conn),
		req:     &repb.ExecuteRequest{InstanceName: instance, ActionDigest: actionDigest, SkipCacheLookup: true},
		command: command,
	}, nil
}

// sample runs one Execute and records its phases.
func (a *actiondExec) sample() (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	r, err := execute(ctx, a.exe, a.req)
	total := time.Since(start)
	if err != nil {
		return 0, err
	}
	if r.CachedResult {
		return 0, errors.New("got a cached result despite skip_cache_lookup")
	}
	if code := r.GetResult().GetExitCode(); code != 0 {
		return 0, fmt.Errorf("%s exited with %d", a.command, code)
	}
	md := r.GetResult().GetExecutionMetadata()
	between := func(from, to *timestamppb.Timestamp) time.Duration {
		if from == nil || to == nil {
			return 0
		}
		return to.AsTime().Sub(from.AsTime())
	}
	p := phases{
		queue:  between(md.QueuedTimestamp, md.WorkerStartTimestamp),
		input:  between(md.InputFetchStartTimestamp, md.InputFetchCompletedTimestamp),
		run:    between(md.ExecutionStartTimestamp, md.ExecutionCompletedTimestamp),
		output: between(md.OutputUploadStartTimestamp, md.OutputUploadCompletedTimestamp),
	}
	p.rest = total - p.queue - p.input - p.run - p.output
	a.phases = append(a.phases, p)
	return total, nil
}

func (a *actiondExec) summarise() []benchutil.Stats {
	var res []benchutil.Stats
	for _, f := range []struct {
		name string
		get  func(phases) time.Duration
	}{
		{"  queued -> worker start", func(p phases) time.Duration { return p.queue }},
		{"  input root staging", func(p phases) time.Duration { return p.input }},
		{"  sandbox run (helper start .. exit)", func(p phases) time.Duration { return p.run }},
		{"  output upload (stdout, stderr)", func(p phases) time.Duration { return p.output }},
		{"  rest (gRPC, loads, AC write, server log)", func(p phases) time.Duration { return p.rest }},
	} {
		var s []time.Duration
		for _, p := range a.phases {
			s = append(s, f.get(p))
		}
		res = append(res, benchutil.Summarise(f.name, s))
	}
	return res
}

// execute calls Execute and follows the operation stream to its end.
func execute(ctx context.Context, exe repb.ExecutionClient, req *repb.ExecuteRequest) (*repb.ExecuteResponse, error) {
	stream, err := exe.Execute(ctx, req)
	if err != nil {
		return nil, err
	}
	for {
		op, err := stream.Recv()
		if err == io.EOF {
			return nil, errors.New("operation stream ended before the operation was done")
		}
		if err != nil {
			return nil, err
		}
		if !op.GetDone() {
			continue
		}
		if e := op.GetError(); e != nil {
			return nil, fmt.Errorf("operation failed: %s", e.GetMessage())
		}
		r := &repb.ExecuteResponse{}
		if err := op.GetResponse().UnmarshalTo(r); err != nil {
			return nil, err
		}
		if st := r.GetStatus(); st != nil && codes.Code(st.Code) != codes.OK {
			return nil, fmt.Errorf("execute: %s: %s", codes.Code(st.Code), st.Message)
		}
		return r, nil
	}
}

func marshal(m proto.Message) ([]byte, *repb.Digest) {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		panic(err)
	}
	return blobOf(b)
}

func blobOf(b []byte) ([]byte, *repb.Digest) {
	sum := sha256.Sum256(b)
	return b, &repb.Digest{Hash: hex.EncodeToString(sum[:]), SizeBytes: int64(len(b))}
}
