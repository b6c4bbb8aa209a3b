package observe_test

import (
	"context"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	"github.com/actiond/actiond"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/testutil"
	"github.com/actiond/actiond/sandbox"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"
)

// upload stores messages through the CAS service and returns the digest of
// the last.
func upload(t *testing.T, c repb.ContentAddressableStorageClient, ms ...proto.Message) *repb.Digest {
	t.Helper()
	req := &repb.BatchUpdateBlobsRequest{}
	var last *repb.Digest
	for _, m := range ms {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		last = cas.DigestOf(b).Proto()
		req.Requests = append(req.Requests, &repb.BatchUpdateBlobsRequest_Request{Digest: last, Data: b})
	}
	if _, err := c.BatchUpdateBlobs(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	return last
}

func execute(t *testing.T, c repb.ExecutionClient, d *repb.Digest, done chan<- *repb.ExecuteResponse) {
	stream, err := c.Execute(context.Background(), &repb.ExecuteRequest{ActionDigest: d})
	if err != nil {
		t.Error(err)
		done <- nil
		return
	}
	var last *longrunningpb.Operation
	for {
		op, err := stream.Recv()
		if err != nil {
			break
		}
		last = op
	}
	resp := &repb.ExecuteResponse{}
	if last == nil || last.GetResponse() == nil || last.GetResponse().UnmarshalTo(resp) != nil {
		t.Errorf("no ExecuteResponse: %v", last)
		done <- nil
		return
	}
	done <- resp
}

func getPage(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// TestStatusPageInBrowser runs a real `sleep` action through the Execution
// service and checks, in headless Chromium, that the status page shows it
// running, then finished, without console errors; and that the action
// metrics moved.
func TestStatusPageInBrowser(t *testing.T) {
	testutil.RequireRoot(t)
	bin := chromiumPath()
	testutil.Require(t, bin != "", "needs chromium (apt-get install chromium)")

	root := t.TempDir()
	sb, err := sandbox.New(sandbox.Config{Runtimes: []sandbox.Runtime{sandbox.HostRuntime()}, StateDir: filepath.Join(root, "sandbox"), Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sb.Close() })
	e := start(t, actiond.Options{Root: root, Sandbox: sb, InputRootKind: "hardlink", Concurrency: 1})

	casc := repb.NewContentAddressableStorageClient(e.conn)
	// The browser first: it can take seconds to start on a loaded machine,
	// longer than the first action runs.
	b := startBrowser(t, bin)
	// Concurrency 1: one sleep runs while the other waits in the queue.
	done := make(chan *repb.ExecuteResponse, 2)
	for _, secs := range []string{"6", "2"} {
		cmd := &repb.Command{Arguments: []string{"/bin/sleep", secs}}
		actD := upload(t, casc, &repb.Action{CommandDigest: upload(t, casc, cmd), InputRootDigest: upload(t, casc, &repb.Directory{}), DoNotCache: true})
		go execute(t, repb.NewExecutionClient(e.conn), actD, done)
	}

	// Wait until one action runs and the other waits (server side), then look.
	deadline := time.Now().Add(10 * time.Second)
	for p := getPage(t, e.web.URL+"/"); !strings.Contains(p, "/bin/sleep 6") || !strings.Contains(p, "/bin/sleep 2") || !strings.Contains(p, `id="queued"`); p = getPage(t, e.web.URL+"/") {
		if time.Now().After(deadline) {
			t.Fatalf("status page never showed the running action:\n%s", getPage(t, e.web.URL+"/"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if m := scrape(t, e.web.URL); m["actiond_actions_running"] != 1 || m["actiond_actions_queued"] != 1 {
		t.Errorf("while one action runs and one waits: running %v, queued %v; want 1, 1", m["actiond_actions_running"], m["actiond_actions_queued"])
	}

	b.navigate(e.web.URL + "/")
	if title := b.eval("document.title"); !strings.HasPrefix(title, "actiond") {
		t.Errorf("title %q", title)
	}
	running := b.eval(`document.querySelector("#running").innerText`)
	queued := b.eval(`document.querySelector("#queued").innerText`)
	if !strings.Contains(running, "/bin/sleep") || !strings.Contains(running, "host") || !strings.Contains(running, "running") {
		t.Errorf("running table does not show a sleep action running in the host runtime:\n%s", running)
	}
	if !strings.Contains(queued, "/bin/sleep") || strings.Contains(queued, "running") {
		t.Errorf("queued table does not show the waiting sleep action:\n%s", queued)
	}
	if n := b.eval(`document.querySelectorAll("#running tr.action").length + "/" + document.querySelectorAll("#queued tr.action").length`); n != "1/1" {
		t.Errorf("running/queued rows = %s, want 1/1", n)
	}
	if got := b.eval(`document.querySelector("#input-root").innerText`); got != "hardlink" {
		t.Errorf("input root shown as %q, want hardlink", got)
	}
	if got := b.eval(`document.querySelector("#cas-size") !== null && document.querySelector("#hit-ratio") !== null`); got != "true" {
		t.Error("cache size or hit ratio missing from the page")
	}

	for range 2 {
		select {
		case resp := <-done:
			if resp == nil || resp.GetStatus().GetCode() != 0 || resp.GetResult().GetExitCode() != 0 {
				t.Fatalf("sleep action failed: %v", resp)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("actions did not finish")
		}
	}

	b.navigate(e.web.URL + "/")
	finished := b.eval(`document.querySelector("#finished").innerText`)
	if !strings.Contains(finished, "/bin/sleep 6") || !strings.Contains(finished, "/bin/sleep 2") || !strings.Contains(finished, "ok") {
		t.Errorf("finished table does not show the sleep action:\n%s", finished)
	}
	if n := b.eval(`document.querySelectorAll("#running tr.action").length`); n != "0" {
		t.Errorf("%s actions still shown running after the only one finished", n)
	}
	if errs := b.consoleErrors(); len(errs) > 0 {
		t.Errorf("console errors on the status page:\n%s", strings.Join(errs, "\n"))
	}

	// The checker itself sees errors: a page that logs one.
	b.navigate("data:text/html,<script>console.error('probe')</script>")
	if errs := b.consoleErrors(); len(errs) == 0 {
		t.Error("console error probe was not seen; the console check above proves nothing")
	}

	m := scrape(t, e.web.URL)
	for name, want := range map[string]float64{
		`actiond_actions_total{result="ok"}`:                                                                 2,
		"actiond_action_duration_seconds_count":                                                              2,
		"actiond_action_sandbox_setup_seconds_count":                                                         2,
		`actiond_action_phase_seconds_count{phase="execution"}`:                                              2,
		`actiond_input_root_strategy{strategy="hardlink"}`:                                                   1,
		"actiond_actions_running":                                                                            0,
		`actiond_grpc_requests_total{code="OK",method="/build.bazel.remote.execution.v2.Execution/Execute"}`: 2,
	} {
		if m[name] != want {
			t.Errorf("%s = %v, want %v", name, m[name], want)
		}
	}
	if s := m["actiond_action_duration_seconds_sum"]; s < 8 {
		t.Errorf("action duration sum %vs, want >= 8s for sleep 6 and sleep 2", s)
	}
	if s := m[`actiond_action_phase_seconds_sum{phase="queued"}`]; s < 1 {
		t.Errorf("queued time sum %vs, want >= 1s: one sleep waited for the other", s)
	}
}
