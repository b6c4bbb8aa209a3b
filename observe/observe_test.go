package observe_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/testutil"
	"github.com/actiond/actiond/observe"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// env is a real server on loopback TCP, wired to an Observer the way
// `actiond serve --http` wires it, with the Observer's handler on httptest.
type env struct {
	srv  *actiond.Server
	obs  *observe.Observer
	conn *grpc.ClientConn
	web  *httptest.Server
}

func start(t *testing.T, opts actiond.Options) *env {
	t.Helper()
	obs := observe.New(observe.Options{})
	if opts.Root == "" {
		opts.Root = t.TempDir()
	}
	opts.Logger = quiet()
	opts.NoFsync = true
	opts.Observer = obs
	opts.GRPCOptions = obs.ServerOptions()
	srv, err := actiond.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	obs.Attach(srv)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	web := httptest.NewServer(obs.Handler())
	t.Cleanup(func() {
		web.Close()
		conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Stop(ctx)
		srv.Close()
	})
	return &env{srv: srv, obs: obs, conn: conn, web: web}
}

// scrape fetches /metrics from the web server at base.
func scrape(t *testing.T, base string) map[string]float64 {
	t.Helper()
	return testutil.ScrapeMetrics(t, base+"/metrics")
}

func grpcCount(m map[string]float64, method, code string) float64 {
	return m[`actiond_grpc_requests_total{code="`+code+`",method="`+method+`"}`]
}

func TestMetricsMoveWithGRPCCalls(t *testing.T) {
	e := start(t, actiond.Options{MaxSize: 1 << 30})
	ctx := context.Background()
	before := scrape(t, e.web.URL)

	casc := repb.NewContentAddressableStorageClient(e.conn)
	blobs := [][]byte{[]byte("hello metrics"), []byte(strings.Repeat("x", 4096))}
	var ds []*repb.Digest
	var total int64
	req := &repb.BatchUpdateBlobsRequest{}
	for _, b := range blobs {
		d := cas.DigestOf(b).Proto()
		ds = append(ds, d)
		total += int64(len(b))
		req.Requests = append(req.Requests, &repb.BatchUpdateBlobsRequest_Request{Digest: d, Data: b})
	}
	if _, err := casc.BatchUpdateBlobs(ctx, req); err != nil {
		t.Fatal(err)
	}
	if _, err := casc.FindMissingBlobs(ctx, &repb.FindMissingBlobsRequest{BlobDigests: ds}); err != nil {
		t.Fatal(err)
	}
	if _, err := casc.BatchReadBlobs(ctx, &repb.BatchReadBlobsRequest{Digests: ds[:1]}); err != nil {
		t.Fatal(err)
	}
	acc := repb.NewActionCacheClient(e.conn)
	_, err := acc.GetActionResult(ctx, &repb.GetActionResultRequest{ActionDigest: cas.DigestOf([]byte("no such action")).Proto()})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("GetActionResult of an unknown action: %v, want NotFound", err)
	}

	after := scrape(t, e.web.URL)
	const casSvc = "/build.bazel.remote.execution.v2.ContentAddressableStorage/"
	for _, c := range []struct {
		method, code string
		want         float64
	}{
		{casSvc + "BatchUpdateBlobs", "OK", 1},
		{casSvc + "FindMissingBlobs", "OK", 1},
		{casSvc + "BatchReadBlobs", "OK", 1},
		{"/build.bazel.remote.execution.v2.ActionCache/GetActionResult", "NotFound", 1},
	} {
		if got := grpcCount(after, c.method, c.code) - grpcCount(before, c.method, c.code); got != c.want {
			t.Errorf("%s %s calls moved by %v, want %v", c.method, c.code, got, c.want)
		}
		if after[`actiond_grpc_request_duration_seconds_count{method="`+c.method+`"}`] < c.want {
			t.Errorf("no latency observed for %s", c.method)
		}
	}
	checks := []struct {
		name string
		want float64
	}{
		{"actiond_cas_blobs", 2},
		{"actiond_cas_stored_bytes", float64(total)},
		{"actiond_cas_max_bytes", 1 << 30},
		{"actiond_cas_received_bytes_total", float64(total)},
		{"actiond_cas_sent_bytes_total", float64(len(blobs[0]))},
		{"actiond_ac_misses_total", 1},
		{"actiond_ac_hits_total", 0},
		{"actiond_ac_hit_ratio", 0},
		{"actiond_cas_evictions_total", 0},
		{"actiond_cas_packs", 1}, // both blobs are small: one batch, one pack
		{"actiond_cas_pack_dead_bytes", 0},
	}
	for _, c := range checks {
		if got, ok := after[c.name]; !ok || got != c.want {
			t.Errorf("%s = %v (present %v), want %v", c.name, got, ok, c.want)
		}
	}
	found := false
	for k := range after {
		if strings.HasPrefix(k, "actiond_build_info{") {
			found = true
		}
	}
	if !found {
		t.Error("actiond_build_info missing")
	}

	// An ActionCache hit moves the ratio.
	res := &repb.ActionResult{StdoutDigest: ds[0]}
	ad := cas.DigestOf([]byte("an action")).Proto()
	if _, err := acc.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{ActionDigest: ad, ActionResult: res}); err != nil {
		t.Fatal(err)
	}
	if _, err := acc.GetActionResult(ctx, &repb.GetActionResultRequest{ActionDigest: ad}); err != nil {
		t.Fatal(err)
	}
	after = scrape(t, e.web.URL)
	if after["actiond_ac_hits_total"] != 1 || after["actiond_ac_hit_ratio"] != 0.5 || after["actiond_ac_entries"] != 1 {
		t.Errorf("after one hit and one miss: hits %v, ratio %v, entries %v; want 1, 0.5, 1",
			after["actiond_ac_hits_total"], after["actiond_ac_hit_ratio"], after["actiond_ac_entries"])
	}
}

func TestVMStateGauge(t *testing.T) {
	obs := observe.New(observe.Options{})
	web := httptest.NewServer(obs.Handler())
	defer web.Close()
	obs.SetVMState("starting")
	obs.SetVMState("running")
	m := scrape(t, web.URL)
	if m[`actiond_vm_state{state="running"}`] != 1 || m[`actiond_vm_state{state="starting"}`] != 0 {
		t.Errorf("vm state gauges: running %v, starting %v; want 1, 0", m[`actiond_vm_state{state="running"}`], m[`actiond_vm_state{state="starting"}`])
	}
	resp, err := http.Get(web.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || !strings.Contains(string(body), `id="vm-state">running<`) {
		t.Errorf("status page without a server: %s\n%s", resp.Status, body)
	}
	if r, err := http.Get(web.URL + "/nope"); err != nil || r.StatusCode != 404 {
		t.Errorf("GET /nope: %v %v, want 404", r.Status, err)
	}
}

func TestLockKeepsSecondServerOut(t *testing.T) {
	root := t.TempDir()
	start(t, actiond.Options{Root: root})
	_, err := actiond.New(actiond.Options{Root: root, Logger: quiet()})
	if err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second server on the same root: %v, want root in use", err)
	}
}

// The background scrubber finds a blob whose file went bad, quarantines it
// (FindMissingBlobs then reports it missing) and /metrics counts it.
func TestScrubberQuarantineCounted(t *testing.T) {
	root := t.TempDir()
	e := start(t, actiond.Options{Root: root, ScrubRate: 1 << 30, ScrubPause: 10 * time.Millisecond})
	ctx := context.Background()
	casc := repb.NewContentAddressableStorageClient(e.conn)
	good, bad := []byte("a blob that stays good"), []byte(strings.Repeat("rot", 3000))
	req := &repb.BatchUpdateBlobsRequest{}
	for _, b := range [][]byte{good, bad} {
		req.Requests = append(req.Requests, &repb.BatchUpdateBlobsRequest_Request{Digest: cas.DigestOf(b).Proto(), Data: b})
	}
	if _, err := casc.BatchUpdateBlobs(ctx, req); err != nil {
		t.Fatal(err)
	}
	d := cas.DigestOf(bad)
	testutil.CorruptBlob(t, root, d.Hash, "same-size")
	var m map[string]float64
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		m = scrape(t, e.web.URL)
		if m["actiond_cas_quarantined_total"] >= 1 && m["actiond_cas_scrub_passes_total"] >= 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no quarantine counted within 30s: quarantined %v, passes %v", m["actiond_cas_quarantined_total"], m["actiond_cas_scrub_passes_total"])
		}
	}
	if m["actiond_cas_quarantined_total"] != 1 || m["actiond_cas_scrubbed_bytes_total"] < float64(len(good)) {
		t.Errorf("quarantined %v (want 1), scrubbed bytes %v", m["actiond_cas_quarantined_total"], m["actiond_cas_scrubbed_bytes_total"])
	}
	resp, err := casc.FindMissingBlobs(ctx, &repb.FindMissingBlobsRequest{BlobDigests: []*repb.Digest{cas.DigestOf(good).Proto(), d.Proto()}})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.MissingBlobDigests) != 1 || resp.MissingBlobDigests[0].Hash != d.Hash {
		t.Fatalf("missing = %v, want just the corrupted blob", resp.MissingBlobDigests)
	}
	if _, err := os.Stat(filepath.Join(root, "cas", cas.QuarantineDir, d.Hash)); err != nil {
		t.Errorf("not in quarantine: %v", err)
	}
}
