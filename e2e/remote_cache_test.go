package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// topLevel are the outputs of //:agg that exist locally after a build with
// --remote_download_toplevel (paths relative to bazel-bin).
var topLevel = []string{
	"big.bin", "big_digest.txt", "joined.txt", "numbered.txt", "rot13.txt", "seed.txt", "upper.txt",
	"multi/a.txt", "multi/nested/b.txt", "multi/nested/deeper/c.txt", "multi/empty.txt",
	"cc/libgreet.a", "cc/libgreet.so", "cc/greet_test", "cc/hello", "cc/hello_out.txt",
	"many/many.txt", "srcdir/srcdir_digest.txt",
	"tree/tree", "tree/tree_listing.txt", "tree/tree_manifest.txt", "tree/tree_upper",
}

// requireAllCacheHits fails unless the build's process summary says every
// non-internal process was a remote cache hit (and there was at least one).
func requireAllCacheHits(t *testing.T, what, out string) {
	t.Helper()
	p := ParseProcesses(out)
	if p == nil {
		t.Fatalf("%s: no process summary in the output:\n%s", what, out)
	}
	hits := p["remote cache hit"]
	if hits == 0 || hits != p["total"]-p["internal"] {
		t.Fatalf("%s: want every non-internal process to be a remote cache hit, got %v (%s)", what, p, strings.TrimSpace(lines(out, " processes")))
	}
	t.Logf("%s: %v", what, p)
}

func requireSameOutputs(t *testing.T, what string, want, got map[string]string) {
	t.Helper()
	if d := DiffHashes(want, got, 20); len(d) > 0 {
		t.Fatalf("%s: outputs differ from the cold build:\n  %s", what, strings.Join(d, "\n  "))
	}
}

// TestBazelRemoteCache: Bazel with --remote_cache pointed at actiond. A cold
// build uploads everything; after `clean --expunge` every action is a
// remote cache hit and the outputs are byte-identical; the same with
// --remote_download_minimal and --remote_download_toplevel; and `bazel test`
// results come from the cache the second time.
func TestBazelRemoteCache(t *testing.T) {
	RequireBazel(t)
	addr := StartServer(t)
	ws := CopyWorkspace(t, WorkspaceDir(t))
	our := t.TempDir()
	remote := []string{"--remote_cache=grpc://" + addr, "--spawn_strategy=local"}
	build := func(extra ...string) string {
		t.Helper()
		args := append(append([]string{"build"}, remote...), extra...)
		return MustBazel(t, ws, our, append(args, "//:agg")...)
	}
	clean := func() {
		t.Helper()
		MustBazel(t, ws, our, "clean", "--expunge")
	}

	// 1. Cold: everything runs locally and is uploaded.
	out := build()
	p := ParseProcesses(out)
	if p == nil || p["local"] == 0 || p["remote cache hit"] != 0 {
		t.Fatalf("cold build: want only local (and internal) processes, got %v (%s)", p, strings.TrimSpace(lines(out, " processes")))
	}
	t.Logf("cold build: %v", p)
	cold := OutputsHash(t, ws)
	for _, f := range topLevel {
		if _, ok := cold[f]; !ok && !strings.HasPrefix(f, "tree/tree") {
			t.Fatalf("cold build: %s missing from bazel-bin", f)
		}
	}

	// 2. Warm, after clean --expunge: all remote cache hits, identical bytes.
	clean()
	out = build()
	requireAllCacheHits(t, "rebuild after clean --expunge", out)
	requireSameOutputs(t, "rebuild after clean --expunge", cold, OutputsHash(t, ws))

	// 3. --remote_download_minimal: all hits, outputs stay remote.
	clean()
	out = build("--remote_download_minimal")
	requireAllCacheHits(t, "--remote_download_minimal", out)
	if _, err := os.Stat(filepath.Join(ws, "bazel-bin", "big.bin")); err == nil {
		t.Errorf("--remote_download_minimal: bazel-bin/big.bin was downloaded")
	}

	// 4. --remote_download_toplevel: all hits, and the top-level outputs
	// are fetched and identical.
	clean()
	out = build("--remote_download_toplevel")
	requireAllCacheHits(t, "--remote_download_toplevel", out)
	requireSameOutputs(t, "--remote_download_toplevel (top-level outputs)",
		subset(cold, topLevel), OutputsHash(t, ws, topLevel...))

	// 5. Switching to --remote_download_outputs=all in the same Bazel server
	// fetches the rest (Bazel re-runs the actions whose outputs it lacks, as
	// cache hits): all of bazel-bin is identical to the cold build.
	out = build("--remote_download_outputs=all")
	t.Logf("--remote_download_outputs=all after toplevel: %v", ParseProcesses(out))
	requireSameOutputs(t, "--remote_download_outputs=all after toplevel", cold, OutputsHash(t, ws))

	// 6. bazel test: the first run executes the test and uploads its
	// result; after clean --expunge the result is a remote cache hit.
	test := func() string {
		t.Helper()
		args := append(append([]string{"test"}, remote...), "//cc:greet_test")
		return MustBazel(t, ws, our, args...)
	}
	clean()
	out = test()
	if !strings.Contains(out, "//cc:greet_test") || !strings.Contains(out, "PASSED") {
		t.Fatalf("bazel test: no PASSED line:\n%s", out)
	}
	clean()
	out = test()
	requireAllCacheHits(t, "bazel test after clean --expunge", out)
	if !strings.Contains(out, "PASSED") {
		t.Fatalf("bazel test (cached): no PASSED line:\n%s", out)
	}
}

// subset returns the entries of hashes under the given paths (files, or
// directories for tree artifacts).
func subset(hashes map[string]string, paths []string) map[string]string {
	res := map[string]string{}
	for k, v := range hashes {
		for _, p := range paths {
			if k == p || strings.HasPrefix(k, p+"/") {
				res[k] = v
				break
			}
		}
	}
	return res
}
