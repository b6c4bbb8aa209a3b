package e2e

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/actiond/actiond/internal/testutil"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// scrapeMetrics fetches http://addr/metrics as samples keyed by printed
// name and labels.
func scrapeMetrics(t *testing.T, addr string) map[string]float64 {
	t.Helper()
	return testutil.ScrapeMetrics(t, "http://"+addr+"/metrics")
}

// sumMetric adds every sample of name whose labels contain all of parts.
func sumMetric(m map[string]float64, name string, parts ...string) float64 {
	var s float64
next:
	for k, v := range m {
		if k != name && !strings.HasPrefix(k, name+"{") {
			continue
		}
		for _, p := range parts {
			if !strings.Contains(k, p) {
				continue next
			}
		}
		s += v
	}
	return s
}

func runActiond(t *testing.T, args ...string) (string, int) {
	t.Helper()
	out, err := exec.Command(actiondBinary(t), args...).CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out), ee.ExitCode()
	} else if err != nil {
		t.Fatalf("actiond %v: %v", args, err)
	}
	return string(out), 0
}

func findMissing(t *testing.T, addr string, d *repb.Digest) bool {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := repb.NewContentAddressableStorageClient(conn).FindMissingBlobs(ctx, &repb.FindMissingBlobsRequest{BlobDigests: []*repb.Digest{d}})
	if err != nil {
		t.Fatal(err)
	}
	return len(resp.MissingBlobDigests) > 0
}

// TestMetricsAndCASVerify: `actiond serve --http` during real Bazel builds
// (the counters move as the builds say they should), then `actiond cas
// verify` on a blob corrupted on disk: it is quarantined, the restarted
// server reports it missing, and the next build uploads it again.
func TestMetricsAndCASVerify(t *testing.T) {
	RequireBazel(t)
	root := filepath.Join(t.TempDir(), "root")
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	web := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	ws := CopyWorkspace(t, WorkspaceDir(t))
	our := t.TempDir()
	var seed *repb.Digest

	t.Run("metrics", func(t *testing.T) {
		addr := StartServer(t, "--root", root, "--http", web, "--no-exec")
		remote := []string{"build", "--remote_cache=grpc://" + addr, "--spawn_strategy=local", "//:agg"}
		before := scrapeMetrics(t, web)
		MustBazel(t, ws, our, remote...)
		cold := OutputsHash(t, ws)
		m := scrapeMetrics(t, web)
		const cas = "/build.bazel.remote.execution.v2.ContentAddressableStorage/"
		const ac = "/build.bazel.remote.execution.v2.ActionCache/"
		for _, c := range []struct{ what, method string }{
			{"FindMissingBlobs", cas + "FindMissingBlobs"},
			{"GetActionResult", ac + "GetActionResult"},
			{"UpdateActionResult", ac + "UpdateActionResult"},
		} {
			if got := sumMetric(m, "actiond_grpc_requests_total", `method="`+c.method+`"`) - sumMetric(before, "actiond_grpc_requests_total", `method="`+c.method+`"`); got < 1 {
				t.Errorf("cold build: %s calls moved by %v, want >= 1", c.what, got)
			}
		}
		if m["actiond_cas_received_bytes_total"] <= 0 || m["actiond_cas_blobs"] <= 0 {
			t.Errorf("cold build: received %v bytes, %v blobs stored; want > 0", m["actiond_cas_received_bytes_total"], m["actiond_cas_blobs"])
		}
		if m["actiond_ac_hits_total"] != 0 || m["actiond_ac_misses_total"] < 1 {
			t.Errorf("cold build: AC hits %v misses %v; want 0 and >= 1", m["actiond_ac_hits_total"], m["actiond_ac_misses_total"])
		}

		MustBazel(t, ws, our, "clean", "--expunge")
		out := MustBazel(t, ws, our, remote...)
		hits := ParseProcesses(out)["remote cache hit"]
		m2 := scrapeMetrics(t, web)
		if got := m2["actiond_ac_hits_total"]; got < float64(hits) || hits == 0 {
			t.Errorf("warm build: %d remote cache hits in Bazel, %v AC hits in metrics", hits, got)
		}
		if m2["actiond_ac_hit_ratio"] <= 0 || m2["actiond_cas_sent_bytes_total"] <= m["actiond_cas_sent_bytes_total"] {
			t.Errorf("warm build: hit ratio %v, sent bytes %v -> %v; want > 0 and growing", m2["actiond_ac_hit_ratio"], m["actiond_cas_sent_bytes_total"], m2["actiond_cas_sent_bytes_total"])
		}
		resp, err := http.Get("http://" + web + "/")
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("status page: %v %v", resp, err)
		}
		resp.Body.Close()

		// Maintenance refuses a root in use.
		if out, code := runActiond(t, "cas", "verify", "--root", root); code == 0 || !strings.Contains(out, "in use") {
			t.Errorf("cas verify on a served root: exit %d, want non-zero and \"in use\":\n%s", code, out)
		}

		hash := cold["seed.txt"]
		info, err := os.Stat(filepath.Join(ws, "bazel-bin", "seed.txt"))
		if hash == "" || err != nil {
			t.Fatalf("seed.txt: hash %q, %v", hash, err)
		}
		seed = &repb.Digest{Hash: hash, SizeBytes: info.Size()}
	})
	if seed == nil {
		t.FailNow()
	}

	// Server stopped: corrupt seed.txt's blob the way a bad disk would.
	testutil.CorruptBlob(t, root, seed.Hash, "same-size")
	out, code := runActiond(t, "cas", "verify", "--root", root)
	if code == 0 || !strings.Contains(out, "corrupt "+seed.Hash) {
		t.Fatalf("cas verify: exit %d, want non-zero naming %s:\n%s", code, seed.Hash, out)
	}
	if _, err := os.Stat(filepath.Join(root, "cas", "quarantine", seed.Hash)); err != nil {
		t.Fatalf("corrupt blob not quarantined: %v\n%s", err, out)
	}
	if out, code := runActiond(t, "cas", "verify", "--root", root); code != 0 {
		t.Errorf("second cas verify: exit %d:\n%s", code, out)
	}
	if out, code := runActiond(t, "stats", "--root", root); code != 0 || !strings.Contains(out, "ActionCache:") {
		t.Errorf("stats: exit %d:\n%s", code, out)
	}

	t.Run("reupload", func(t *testing.T) {
		addr := StartServer(t, "--root", root, "--no-exec")
		if !findMissing(t, addr, seed) {
			t.Fatal("FindMissingBlobs does not report the quarantined blob missing")
		}
		MustBazel(t, ws, our, "clean", "--expunge")
		MustBazel(t, ws, our, "build", "--remote_cache=grpc://"+addr, "--spawn_strategy=local", "//:agg")
		if findMissing(t, addr, seed) {
			t.Error("the build after verify did not upload the quarantined blob again")
		}
	})
}
