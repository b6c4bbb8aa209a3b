//go:build linux

package fs_test

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/actiond/actiond/actioncache"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/cas/castest"
	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/sandbox"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
)

// newExecutor returns a real executor (host runtime sandbox, default ids)
// staging inputs with e's actiondfs root.
func (e *env) newExecutor() *executor.Executor {
	e.t.Helper()
	cache, err := actioncache.Open(filepath.Join(e.dir, "ac.db"), e.store)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { cache.Close() })
	sb, err := sandbox.New(sandbox.Config{Runtimes: []sandbox.Runtime{sandbox.HostRuntime()}, StateDir: filepath.Join(e.dir, "sandbox")})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { sb.Close() })
	ex, err := executor.New(executor.Options{Store: e.store, Cache: cache, Sandbox: sb, InputRoot: e.root, StageDir: filepath.Join(e.dir, "cas", "stage")})
	if err != nil {
		e.t.Fatal(err)
	}
	if ex.InputRootName() != "fuse" {
		e.t.Fatalf("input root %q", ex.InputRootName())
	}
	return ex
}

// run executes script over tree with the given outputs and platform.
func (e *env) run(ex *executor.Executor, tree *executor.InputTree, script string, outputs []string, platform map[string]string) *repb.ExecuteResponse {
	e.t.Helper()
	cmd := &repb.Command{
		Arguments:            []string{"/bin/sh", "-c", script},
		EnvironmentVariables: []*repb.Command_EnvironmentVariable{{Name: "PATH", Value: "/usr/bin:/bin"}},
		OutputPaths:          outputs,
	}
	if len(platform) > 0 {
		cmd.Platform = &repb.Platform{}
		for _, k := range sortedKeys(platform) {
			cmd.Platform.Properties = append(cmd.Platform.Properties, &repb.Platform_Property{Name: k, Value: platform[k]})
		}
	}
	act := &repb.Action{CommandDigest: e.putProto(cmd).Proto(), InputRootDigest: tree.Root.Proto(), DoNotCache: true}
	resp := ex.Execute(context.Background(), executor.Request{ActionDigest: e.putProto(act)})
	if resp.Status.GetCode() != 0 {
		e.t.Fatalf("status %v", resp.Status)
	}
	ex.Wait() // the stage is removed after the response
	return resp
}

func (e *env) blob(d *repb.Digest) string {
	e.t.Helper()
	if d == nil {
		return ""
	}
	return castest.ReadString(e.t, e.store, d)
}

func outputFiles(e *env, res *repb.ActionResult) map[string]string {
	out := map[string]string{}
	for _, f := range res.OutputFiles {
		out[f.Path] = e.blob(f.Digest)
	}
	return out
}

var actionInputs = map[string]string{
	"src/a.txt":          "input a\n",
	"src/b.txt":          "input b\n",
	"src/gen/old.txt":    "old generated\n",
	"tools/upper.sh*":    "#!/bin/sh\ntr a-z A-Z < \"$1\"\n",
	"src/lib/header.h":   "#pragma once\n",
	"src/lib/current.h@": "header.h",
}

// TestExecutorFUSE runs real actions through the sandbox (as a uid of its own) on
// actiondfs: reading inputs, writing outputs into input directories and
// new ones, and nothing left behind.
func TestExecutorFUSE(t *testing.T) {
	e := newEnv(t)
	ex := e.newExecutor()
	tree := e.tree(actionInputs)
	resp := e.run(ex, tree, `set -e
		tools/upper.sh src/a.txt > src/gen/upper.txt
		cat src/lib/current.h src/b.txt > out.txt
		mkdir -p src/gen/tree/sub && echo leaf > src/gen/tree/sub/leaf && ln -s sub/leaf src/gen/tree/link
		test -x tools/upper.sh && ! test -x src/a.txt
		grep -q " - fuse.actiondfs " /proc/self/mountinfo
		id -u`,
		[]string{"src/gen/upper.txt", "out.txt", "src/gen/tree", "tools/upper.sh"}, nil)
	res := resp.Result
	if res.ExitCode != 0 {
		t.Fatalf("exit %d\nstdout: %s\nstderr: %s", res.ExitCode, e.blob(res.StdoutDigest), e.blob(res.StderrDigest))
	}
	// The only action running gets the first id of the sandbox's range.
	if got, want := e.blob(res.StdoutDigest), strconv.Itoa(sandbox.DefaultFirstID)+"\n"; got != want {
		t.Errorf("stdout %q: the command should run as %s", got, want)
	}
	files := outputFiles(e, res)
	if files["src/gen/upper.txt"] != "INPUT A\n" || files["out.txt"] != "#pragma once\ninput b\n" || files["tools/upper.sh"] != actionInputs["tools/upper.sh*"] {
		t.Errorf("outputs %q", files)
	}
	for _, f := range res.OutputFiles {
		if f.IsExecutable != (f.Path == "tools/upper.sh") {
			t.Errorf("output %s: executable %v", f.Path, f.IsExecutable)
		}
	}
	if len(res.OutputDirectories) != 1 {
		t.Fatalf("output directories %v", res.OutputDirectories)
	}
	treeMsg := &repb.Tree{}
	if err := unmarshal(e.blob(res.OutputDirectories[0].TreeDigest), treeMsg); err != nil {
		t.Fatal(err)
	}
	if len(treeMsg.Root.Symlinks) != 1 || treeMsg.Root.Symlinks[0].Target != "sub/leaf" || len(treeMsg.Children) != 1 ||
		e.blob(treeMsg.Children[0].Files[0].Digest) != "leaf\n" {
		t.Errorf("output tree %v", treeMsg)
	}
	if resp.Message != "" {
		t.Errorf("message %q", resp.Message)
	}
	assertNothingLeft(t, e)
}

// TestExecutorRefusesInputWrites: an action that writes an input without
// mutates_inputs fails, the input is unchanged, and stderr and the
// response message name the file and mutates_inputs.
func TestExecutorRefusesInputWrites(t *testing.T) {
	e := newEnv(t)
	ex := e.newExecutor()
	tree := e.tree(actionInputs)
	resp := e.run(ex, tree, `echo more >> src/a.txt`, []string{"out.txt"}, nil)
	res := resp.Result
	if res.ExitCode == 0 {
		t.Fatal("writing an input succeeded")
	}
	stderr := e.blob(res.StderrDigest)
	for _, want := range []string{"Read-only file system", "open for writing: src/a.txt", "mutates_inputs=1"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, stderr)
		}
	}
	for _, want := range []string{"src/a.txt", "mutates_inputs"} {
		if !strings.Contains(resp.Message, want) {
			t.Errorf("message lacks %q: %q", want, resp.Message)
		}
	}
	if data, err := cas.ReadAll(context.Background(), e.store, cas.DigestOf([]byte("input a\n"))); err != nil || string(data) != "input a\n" {
		t.Errorf("CAS blob: %q %v", data, err)
	}
	// Removing or replacing an input is refused the same way.
	resp = e.run(ex, tree, `rm -f src/b.txt; echo x > new.txt && mv -f new.txt src/a.txt`, []string{"new.txt"}, nil)
	if resp.Result.ExitCode == 0 || !strings.Contains(resp.Message, "remove: src/b.txt") || !strings.Contains(resp.Message, "replace: src/a.txt") {
		t.Errorf("exit %d, message %q", resp.Result.ExitCode, resp.Message)
	}
	assertNothingLeft(t, e)
}

// TestExecutorMutatesInputs: with mutates_inputs=1 the action may rewrite,
// remove and replace inputs, and declare an input as an output.
func TestExecutorMutatesInputs(t *testing.T) {
	e := newEnv(t)
	ex := e.newExecutor()
	tree := e.tree(actionInputs)
	resp := e.run(ex, tree, `set -e
		echo more >> src/a.txt
		rm src/b.txt
		sed -i s/old/new/ src/gen/old.txt
		mv src/lib/header.h src/lib/moved.h
		cat src/a.txt src/lib/moved.h > out.txt
		test ! -e src/b.txt
		grep -q " - overlay " /proc/self/mountinfo`,
		[]string{"src/a.txt", "out.txt", "src/gen/old.txt"}, map[string]string{"mutates_inputs": "1"})
	res := resp.Result
	if res.ExitCode != 0 {
		t.Fatalf("exit %d\nstderr: %s\nmessage: %s", res.ExitCode, e.blob(res.StderrDigest), resp.Message)
	}
	want := map[string]string{"src/a.txt": "input a\nmore\n", "out.txt": "input a\nmore\n#pragma once\n", "src/gen/old.txt": "new generated\n"}
	if got := outputFiles(e, res); len(got) != 3 || got["src/a.txt"] != want["src/a.txt"] || got["out.txt"] != want["out.txt"] || got["src/gen/old.txt"] != want["src/gen/old.txt"] {
		t.Errorf("outputs %q, want %q", got, want)
	}
	for _, in := range []string{"input a\n", "input b\n", "old generated\n"} {
		if data, err := cas.ReadAll(context.Background(), e.store, cas.DigestOf([]byte(in))); err != nil || string(data) != in {
			t.Errorf("CAS blob %q: %q %v", in, data, err)
		}
	}
	// The next strict action sees the original tree.
	resp = e.run(ex, tree, `cat src/a.txt src/b.txt > out.txt`, []string{"out.txt"}, nil)
	if got := outputFiles(e, resp.Result)["out.txt"]; got != "input a\ninput b\n" {
		t.Errorf("later action reads %q", got)
	}
	assertNothingLeft(t, e)
}

// assertNothingLeft checks that no staged file outlives actions, and no
// mount outlives the input root (spare mounts live until it closes).
func assertNothingLeft(t *testing.T, e *env) {
	t.Helper()
	for _, d := range []string{"fs/stage", "cas/stage"} {
		ents, _ := os.ReadDir(filepath.Join(e.dir, d))
		if len(ents) != 0 {
			t.Errorf("%s not empty after the actions: %v", d, ents)
		}
	}
	if err := e.root.Close(); err != nil {
		t.Errorf("close input root: %v", err)
	}
	data, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range strings.Split(string(data), "\n") {
		if strings.Contains(l, e.dir) {
			t.Errorf("mount left behind: %s", l)
		}
	}
	for _, d := range []string{"fs/stage", "fs/mnt", "cas/stage"} {
		ents, _ := os.ReadDir(filepath.Join(e.dir, d))
		if len(ents) != 0 {
			t.Errorf("%s not empty: %v", d, ents)
		}
	}
}
