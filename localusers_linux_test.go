//go:build linux

package actiond_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/cas/castest"
	"github.com/actiond/actiond/internal/mountinfo"
	"github.com/actiond/actiond/internal/testutil"
	"github.com/actiond/actiond/sandbox"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
)

// attackerUID is the other local user of these tests: not root, not
// nobody (65534, which actions used to run as) and outside the default
// range of action uids.
const attackerUID = 54321

// execEnv is a real server (sandbox, host runtime) in this process, as
// root, with its --root in a directory every user can traverse, as
// /var/lib is.
type execEnv struct {
	t    *testing.T
	root string
	srv  *actiond.Server
	exec repb.ExecutionClient
}

func newExecEnv(t *testing.T, inputRoot string, concurrency int) *execEnv {
	t.Helper()
	testutil.RequireRoot(t)
	base, err := os.MkdirTemp("", "actiond-localusers-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(base, "root")
	sb, err := sandbox.New(sandbox.Config{Runtimes: []sandbox.Runtime{sandbox.HostRuntime()}, StateDir: filepath.Join(root, "sandbox"), Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sb.Close() }) // after the server's cleanup
	// Warnings reach the test log (shown when the test fails).
	log := slog.New(slog.NewTextHandler(testLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	srv, c := inProcess(t, actiond.Options{Root: root, Sandbox: sb, InputRootKind: inputRoot, Concurrency: concurrency, Logger: log})
	return &execEnv{t: t, root: root, srv: srv, exec: repb.NewExecutionClient(c.conn)}
}

func (e *execEnv) put(data []byte) *repb.Digest {
	e.t.Helper()
	return castest.Put(e.t, e.srv.Store, data).Proto()
}

func (e *execEnv) putProto(m proto.Message) *repb.Digest {
	return castest.PutProto(e.t, e.srv.Store, m).Proto()
}

func (e *execEnv) blob(d *repb.Digest) string {
	e.t.Helper()
	if d == nil {
		return ""
	}
	return castest.ReadString(e.t, e.srv.Store, d)
}

// shAction stores an action running script with a root directory holding
// files (name → content) and the given output directories.
func (e *execEnv) shAction(script string, files map[string]string, outDirs ...string) *repb.Digest {
	return e.shActionFiles(script, files, nil, nil, outDirs...)
}

// shActionFiles is shAction with output files and platform properties.
func (e *execEnv) shActionFiles(script string, files map[string]string, outFiles []string, props map[string]string, outDirs ...string) *repb.Digest {
	e.t.Helper()
	dir := &repb.Directory{}
	for _, name := range sortedNames(files) {
		dir.Files = append(dir.Files, &repb.FileNode{Name: name, Digest: e.put([]byte(files[name]))})
	}
	cmd := &repb.Command{
		Arguments:            []string{"/bin/sh", "-c", script},
		EnvironmentVariables: []*repb.Command_EnvironmentVariable{{Name: "PATH", Value: "/usr/bin:/bin"}},
		OutputFiles:          outFiles,
		OutputDirectories:    outDirs,
	}
	if len(props) > 0 {
		cmd.Platform = &repb.Platform{}
		for _, k := range sortedNames(props) {
			cmd.Platform.Properties = append(cmd.Platform.Properties, &repb.Platform_Property{Name: k, Value: props[k]})
		}
	}
	return e.putProto(&repb.Action{
		CommandDigest:   e.putProto(cmd),
		InputRootDigest: e.putProto(dir),
		Timeout:         durationpb.New(2 * time.Minute),
		DoNotCache:      true,
	})
}

func sortedNames(m map[string]string) []string {
	var names []string
	for k := range m {
		names = append(names, k)
	}
	for i := range names {
		for j := i + 1; j < len(names); j++ {
			if names[j] < names[i] {
				names[i], names[j] = names[j], names[i]
			}
		}
	}
	return names
}

// execute runs the action through the Execution service.
func (e *execEnv) execute(ctx context.Context, action *repb.Digest) (*repb.ExecuteResponse, error) {
	stream, err := e.exec.Execute(ctx, &repb.ExecuteRequest{ActionDigest: action, SkipCacheLookup: true})
	if err != nil {
		return nil, err
	}
	for {
		op, err := stream.Recv()
		if err == io.EOF {
			return nil, errors.New("stream ended without a result")
		}
		if err != nil {
			return nil, err
		}
		if !op.Done {
			continue
		}
		resp := &repb.ExecuteResponse{}
		if err := op.GetResponse().UnmarshalTo(resp); err != nil {
			return nil, err
		}
		if resp.Status.GetCode() != 0 {
			return resp, fmt.Errorf("status %v", resp.Status)
		}
		return resp, nil
	}
}

type execResult struct {
	resp *repb.ExecuteResponse
	err  error
}

func (e *execEnv) start(action *repb.Digest) <-chan execResult {
	ch := make(chan execResult, 1)
	go func() {
		resp, err := e.execute(bg, action)
		ch <- execResult{resp, err}
	}()
	return ch
}

// waitFor returns the host directory, under the root, holding a file
// called name that a running action created, or fails once res ends.
func (e *execEnv) waitFor(name string, res <-chan execResult) string {
	e.t.Helper()
	for {
		// Not an overlay's upper directory: what the action sees is the
		// overlay mounted over it.
		for _, dir := range strings.Fields(e.find("-type", "f", "-name", name, "-printf", "%h\n")) {
			if !strings.HasPrefix(dir, filepath.Join(e.root, "cas", "fs", "stage")+"/") {
				return dir
			}
		}
		select {
		case r := <-res:
			e.t.Fatalf("the action ended before it created %s: %v %s", name, r.err, e.stderr(r.resp))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// find runs find(1) over the root, as root, and returns what it printed.
// It runs in a child process: this process serves the actiondfs mounts,
// and opening their files here while a new one is being set up could
// leave it waiting for itself (see the fs package documentation).
func (e *execEnv) find(args ...string) string {
	out, _ := exec.Command("find", append([]string{e.root}, args...)...).Output() // files come and go
	return string(out)
}

// touch creates path (in an action's tree) from a child process; see find.
func touch(t *testing.T, path string) {
	t.Helper()
	if out, err := exec.Command("touch", path).CombinedOutput(); err != nil {
		t.Fatalf("touch %s: %v %s", path, err, out)
	}
}

func (e *execEnv) stderr(resp *repb.ExecuteResponse) string {
	if resp == nil || resp.Result == nil {
		return ""
	}
	return e.blob(resp.Result.StderrDigest)
}

func (e *execEnv) outputTree(res *repb.ActionResult, path string) []string {
	e.t.Helper()
	for _, d := range res.OutputDirectories {
		if d.Path != path {
			continue
		}
		tree := &repb.Tree{}
		dd, _ := cas.FromProto(d.TreeDigest)
		b, err := cas.ReadAll(bg, e.srv.Store, dd)
		if err != nil {
			e.t.Fatal(err)
		}
		if err := proto.Unmarshal(b, tree); err != nil {
			e.t.Fatal(err)
		}
		var names []string
		for _, f := range tree.Root.Files {
			names = append(names, f.Name)
		}
		for _, d := range tree.Root.Directories {
			names = append(names, d.Name+"/")
		}
		return names
	}
	e.t.Fatalf("no output directory %q", path)
	return nil
}

// asOtherUser runs script with sh as attackerUID (no groups), with stdin.
func asOtherUser(t *testing.T, script, stdin string) string {
	t.Helper()
	setpriv, err := exec.LookPath("setpriv")
	testutil.Require(t, err == nil, "setpriv (util-linux) is not installed")
	cmd := exec.Command(setpriv, "--reuid="+strconv.Itoa(attackerUID), "--regid="+strconv.Itoa(attackerUID), "--clear-groups",
		"/bin/sh", "-c", script)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=/nonexistent", "LC_ALL=C"}
	cmd.Dir = "/"
	cmd.Stdin = strings.NewReader(stdin)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("the script as uid %d failed: %v\n%s", attackerUID, err, stderr.String())
	}
	return string(out)
}

// attackScript reads "D path" and "F path" lines and reports every read,
// listing, creation and write that succeeded. In every directory it also
// looks up probeName, which the next action has as an input: a negative
// entry cached by that lookup would hide it.
const attackScript = `
while read -r kind p; do
  case $kind in
  F)
    if cat "$p" >/dev/null 2>&1; then echo "READ $p"; fi
    if ( : >>"$p" ) 2>/dev/null; then echo "OPENED FOR WRITING $p"; fi
    ;;
  D)
    if ls -a "$p" >/dev/null 2>&1; then echo "LISTED $p"; fi
    if ( : >"$p/.attacker" ) 2>/dev/null; then echo "CREATED $p/.attacker"; fi
    if mkdir "$p/.attacker-dir" 2>/dev/null; then echo "CREATED $p/.attacker-dir"; fi
    stat "$p/$PROBE" >/dev/null 2>&1
    ls "$p/$PROBE" >/dev/null 2>&1
    ;;
  esac
done
exit 0
`

// TestOtherUserCannotReachActions is the "unprivileged second user"
// acceptance test of issue 11: while an action runs, another local user
// tries to read, list and write everything under --root (the action's
// tree and outputs, spare actiondfs mounts, the CAS, the sandbox's state)
// and to poison spare mounts with negative lookups of a name the next
// action has as an input. None of it may succeed or matter.
func TestOtherUserCannotReachActions(t *testing.T) {
	for _, tc := range []struct {
		kind    string
		mutates bool // the running action has mutates_inputs (an overlay, or a copy)
	}{{"fuse", false}, {"fuse", true}, {"hardlink", false}, {"hardlink", true}} {
		kind := tc.kind
		name := kind
		var props map[string]string
		if tc.mutates {
			name += "/mutates_inputs"
			props = map[string]string{"mutates_inputs": "1"}
		}
		t.Run(name, func(t *testing.T) {
			testutil.RequireRoot(t)
			if kind == "fuse" {
				_, err := os.Stat("/dev/fuse")
				testutil.Require(t, err == nil, "needs /dev/fuse")
			}
			e := newExecEnv(t, kind, 2)
			const probe = "data.txt"
			inputs := map[string]string{probe: "the real input\n"}
			// The executor makes out/ (the parent of a declared output
			// file) and the execroot (the parent of tree/) writable for
			// the action.
			first := e.start(e.shActionFiles(`mkdir tree && cat data.txt > tree/copy && : > out/started &&
while [ ! -e out/release ]; do sleep 0.02; done; echo done > out/result`, inputs, []string{"out/result"}, props, "tree"))
			outDir := e.waitFor("started", first)
			if kind == "fuse" {
				// Both spares ready (made again after a strict action took
				// one), so that the next action gets one that was probed.
				deadline := time.Now().Add(time.Minute)
				for spareMounts(t, e.root) < 3 {
					select {
					case r := <-first:
						t.Fatalf("the first action ended before it was released: %v %+v %s", r.err, r.resp.GetResult(), e.stderr(r.resp))
					default:
					}
					if time.Now().After(deadline) {
						t.Fatalf("%d actiondfs mounts under --root a minute after the first action started; want it and 2 spares", spareMounts(t, e.root))
					}
					time.Sleep(10 * time.Millisecond)
				}
			}

			paths := e.find("(", "-type", "d", "-printf", "D %p\n", ")", "-o", "(", "-type", "f", "-printf", "F %p\n", ")")
			n := strings.Count(paths, "\n")
			if !strings.Contains(paths, "D "+outDir+"\n") {
				t.Fatalf("the walk did not reach the running action's output directory %s", outDir)
			}
			got := asOtherUser(t, "PROBE="+probe+"\n"+attackScript, paths)
			if got != "" {
				t.Errorf("as uid %d, under --root (%d paths tried):\n%s", attackerUID, n, got)
			}

			touch(t, filepath.Join(outDir, "release"))
			r := <-first
			if r.err != nil || r.resp.Result.ExitCode != 0 {
				t.Fatalf("first action: %v %s", r.err, e.stderr(r.resp))
			}
			if got, want := strings.Join(e.outputTree(r.resp.Result, "tree"), " "), "copy"; got != want {
				t.Errorf("output directory of the running action: %s; want %s", got, want)
			}
			if fs := r.resp.Result.OutputFiles; len(fs) != 1 || e.blob(fs[0].Digest) != "done\n" {
				t.Errorf("output files of the running action: %v", fs)
			}

			// The next actions get the probed spare mounts (or, for
			// hardlinks, a new stage) and must see their input.
			for i := range 2 {
				r := <-e.start(e.shAction(fmt.Sprintf("cat %s; echo %d", probe, i), inputs))
				if r.err != nil || r.resp.Result.ExitCode != 0 {
					t.Fatalf("action %d after the probes: %v %s", i, r.err, e.stderr(r.resp))
				}
				if got, want := e.blob(r.resp.Result.StdoutDigest), inputs[probe]+strconv.Itoa(i)+"\n"; got != want {
					t.Errorf("action %d after the probes printed %q; want %q", i, got, want)
				}
			}
		})
	}
}

// spareMounts counts the actiondfs (FUSE) mounts under root: spares under
// cas/fs/mnt, and a running action's wherever it is (a spare it took, or a
// mount made on demand in its stage when no spare was ready yet).
func spareMounts(t *testing.T, root string) int {
	t.Helper()
	return testutil.CountMounts(t, func(e mountinfo.Entry) bool {
		return strings.HasPrefix(e.Point, root+"/") && strings.HasPrefix(e.FSType, "fuse")
	})
}

// TestConcurrentActionsHaveTheirOwnUsers runs two actions at once: they
// run as different users, and one of them using up a per-user kernel
// limit (inotify instances, fs.inotify.max_user_instances) leaves the
// other unaffected. tail -f takes one inotify instance and says so on
// stderr when it cannot.
func TestConcurrentActionsHaveTheirOwnUsers(t *testing.T) {
	testutil.RequireRoot(t)
	b, err := os.ReadFile("/proc/sys/fs/inotify/max_user_instances")
	if err != nil {
		t.Fatal(err)
	}
	limit, err := strconv.Atoi(strings.TrimSpace(string(b)))
	testutil.Require(t, err == nil && limit <= 4096, "fs.inotify.max_user_instances is too high to use up harmlessly: "+string(b))
	e := newExecEnv(t, "auto", 2)

	hog := e.start(e.shAction(`mkdir -p out && id -u > out/uid && : > /tmp/f
n=$(($(cat /proc/sys/fs/inotify/max_user_instances) + 4))
i=0; while [ $i -lt $n ]; do tail -f /tmp/f >/dev/null 2>>/tmp/err & i=$((i+1)); done
i=0; until grep -q inotify /tmp/err; do
  i=$((i+1)); [ $i -lt 3000 ] || { echo "could not use up inotify instances" >&2; exit 3; }; sleep 0.01
done
: > out/exhausted
while [ ! -e out/release ]; do sleep 0.02; done`, nil, "out"))
	hogOut := e.waitFor("exhausted", hog)

	r := <-e.start(e.shAction(`mkdir -p out && id -u > out/uid && : > /tmp/f
tail -f /tmp/f >/dev/null 2>/tmp/err & p=$!
i=0; while :; do
  if grep -q inotify /tmp/err; then cat /tmp/err >&2; exit 1; fi
  if ls -l /proc/$p/fd 2>/dev/null | grep -q 'anon_inode:inotify'; then exit 0; fi
  i=$((i+1)); [ $i -lt 3000 ] || { echo "tail neither watched nor failed" >&2; exit 2; }; sleep 0.01
done`, nil, "out"))
	touch(t, filepath.Join(hogOut, "release"))
	h := <-hog
	if h.err != nil || h.resp.Result.ExitCode != 0 {
		t.Fatalf("the action using up inotify: %v %s", h.err, e.stderr(h.resp))
	}
	if r.err != nil || r.resp.Result.ExitCode != 0 {
		t.Errorf("the concurrent action could not get an inotify instance: %v exit %d: %s", r.err, r.resp.GetResult().GetExitCode(), e.stderr(r.resp))
	}
	uidOf := func(res *repb.ActionResult) string {
		for _, d := range res.GetOutputDirectories() {
			tree := &repb.Tree{}
			dd, _ := cas.FromProto(d.TreeDigest)
			b, _ := cas.ReadAll(bg, e.srv.Store, dd)
			proto.Unmarshal(b, tree)
			for _, f := range tree.GetRoot().GetFiles() {
				if f.Name == "uid" {
					return strings.TrimSpace(e.blob(f.Digest))
				}
			}
		}
		return ""
	}
	hu, ru := uidOf(h.resp.GetResult()), uidOf(r.resp.GetResult())
	if hu == "" || hu == ru {
		t.Errorf("concurrent actions ran as uids %q and %q; want different ones", hu, ru)
	}
	for _, u := range []string{hu, ru} {
		if u == "0" || u == "65534" {
			t.Errorf("an action ran as uid %s", u)
		}
	}
}

// TestPrivateRoot: a new root is made for its owner alone, and an existing
// one loses group and other permissions.
func TestPrivateRoot(t *testing.T) {
	base := t.TempDir()
	fresh := filepath.Join(base, "a", "root")
	old := filepath.Join(base, "old")
	if err := os.Mkdir(old, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(old, 0o775); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{fresh, old} {
		if err := actiond.PrivateRoot(dir, quiet()); err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(dir)
		if err != nil || fi.Mode().Perm() != 0o700 {
			t.Errorf("%s: %v %v; want mode 0700", dir, fi.Mode(), err)
		}
	}
}

// testLogWriter writes log lines to the test log.
type testLogWriter struct{ t *testing.T }

func (w testLogWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
