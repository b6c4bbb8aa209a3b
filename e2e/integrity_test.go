package e2e

// Issue 15 through a real Bazel: stored blobs go bad behind the server's
// back (a flipped byte, a truncation, other bytes of the same size); the
// next build still ends with the right outputs, and the build after it is
// all remote cache hits again, because the server quarantined what it found
// bad and Bazel uploaded it afresh.

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/actiond/actiond/internal/testutil"
)

// corruptCASBlob changes the stored file of the blob with the given hash
// under the server root root.
func corruptCASBlob(t *testing.T, root, hash, kind string) {
	t.Helper()
	testutil.CorruptBlob(t, root, hash, kind)
	t.Logf("corrupted blob %s (%s)", hash[:12], kind)
}

func sha256File(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// corruptOutputs corrupts the stored blobs of three outputs of the cold
// build, one each way.
func corruptOutputs(t *testing.T, root string, cold map[string]string) {
	t.Helper()
	for out, kind := range map[string]string{"big.bin": "flip", "upper.txt": "same-size", "numbered.txt": "truncate"} {
		h, ok := cold[out]
		if !ok {
			t.Fatalf("cold build made no %s", out)
		}
		corruptCASBlob(t, root, h, kind)
	}
}

func requireQuarantined(t *testing.T, root string, min int) {
	t.Helper()
	ents, _ := os.ReadDir(filepath.Join(root, "cas", "quarantine"))
	if len(ents) < min {
		t.Fatalf("%d blobs in %s/cas/quarantine, want at least %d", len(ents), root, min)
	}
}

// TestBazelCachedRebuildAfterCorruption: --remote_cache, local execution.
// Cached outputs go bad while the server runs; the rebuild after `clean
// --expunge` gets DATA_LOSS for them (never the bad bytes), rebuilds them
// locally and uploads them again; the next rebuild is all cache hits.
func TestBazelCachedRebuildAfterCorruption(t *testing.T) {
	RequireBazel(t)
	root := filepath.Join(t.TempDir(), "root")
	addr, serverLog := StartServerWithLog(t, "--root", root)
	ws := CopyWorkspace(t, WorkspaceDir(t))
	our := t.TempDir()
	build := func() string {
		t.Helper()
		return MustBazel(t, ws, our, "build", "--remote_cache=grpc://"+addr, "--spawn_strategy=local", "//:agg_shell")
	}
	build()
	cold := OutputsHash(t, ws)
	corruptOutputs(t, root, cold)

	MustBazel(t, ws, our, "clean", "--expunge")
	out := build()
	t.Logf("rebuild after corruption: %v", ParseProcesses(out))
	requireSameOutputs(t, "rebuild after corruption", cold, OutputsHash(t, ws))
	if !strings.Contains(serverLog(), "corrupt blob quarantined") {
		t.Errorf("the server log does not report a quarantined blob")
	}
	requireQuarantined(t, root, 2) // the truncated one may just be missing

	MustBazel(t, ws, our, "clean", "--expunge")
	out = build()
	requireAllCacheHits(t, "the build after that", out)
	requireSameOutputs(t, "the build after that", cold, OutputsHash(t, ws))
}

// TestBazelRemoteExecAfterCorruption: remote execution. While the server is
// stopped, output blobs and a source file's blob go bad (a disk that rots,
// a power loss). After the restart:
//   - a normal rebuild ends with the right outputs: the ActionCache lookups
//     hash the outputs they would serve (once, nothing is trusted after a
//     restart), find the bad ones and answer NOT_FOUND, so those actions run
//     again;
//   - a rebuild that executes everything (--noremote_accept_cached) gets
//     MISSING for the source, uploads it again and ends with the right
//     outputs;
//   - the build after that is all remote cache hits.
//
// A cached output that goes bad while the server runs (after it was last
// verified) is only found when it is read: the download gets DATA_LOSS,
// which Bazel 4.2.3 treats as an error of that build (it falls back to
// execution only on NOT_FOUND); the blob is quarantined by then, so the
// next build runs the action and is right, and the one after is all hits.
func TestBazelRemoteExecAfterCorruption(t *testing.T) {
	RequireBazel(t)
	testutil.RequireRoot(t)
	root := filepath.Join(t.TempDir(), "root")
	ws := CopyWorkspace(t, WorkspaceDir(t))
	our := t.TempDir()
	bazel := func(t *testing.T, args ...string) string { t.Helper(); return MustBazel(t, ws, our, args...) }
	targets := []string{"//:agg_shell"}

	MustBazel(t, ws, our, append([]string{"build", "--spawn_strategy=local"}, targets...)...)
	local := OutputsHash(t, ws)
	sourceHash := sha256File(t, filepath.Join(ws, "srcdir", "data", "sub", "one.txt"))

	t.Run("cold", func(t *testing.T) {
		addr := StartServer(t, "--root", root)
		bazel(t, "clean")
		out := bazel(t, append(append([]string{"build"}, remoteExecFlags(addr, remoteTimeout)...), targets...)...)
		requireAllRemote(t, "cold remote build", out)
		requireSameOutputs(t, "cold remote build", local, OutputsHash(t, ws))
	}) // the server stops here
	if t.Failed() {
		return
	}
	corruptCASBlob(t, root, sourceHash, "same-size")
	corruptOutputs(t, root, local)

	t.Run("after-restart", func(t *testing.T) {
		addr, serverLog := StartServerWithLog(t, "--root", root)
		remote := remoteExecFlags(addr, remoteTimeout)
		build := func(extra ...string) string {
			t.Helper()
			return bazel(t, append(append(append([]string{"build"}, remote...), extra...), targets...)...)
		}
		bazel(t, "clean")
		out := build()
		p := ParseProcesses(out)
		t.Logf("rebuild after corruption: %v", p)
		if p["remote"] < 3 {
			t.Errorf("rebuild after corruption: %d actions executed, want at least the 3 whose outputs went bad", p["remote"])
		}
		requireSameOutputs(t, "rebuild after corruption", local, OutputsHash(t, ws))

		bazel(t, "clean")
		out = build("--noremote_accept_cached")
		requireAllRemote(t, "rebuild executing everything", out)
		requireSameOutputs(t, "rebuild executing everything", local, OutputsHash(t, ws))
		if !strings.Contains(serverLog(), "corrupt blob quarantined") || !strings.Contains(serverLog(), sourceHash) {
			t.Errorf("the server log does not report the source blob %s quarantined", sourceHash[:12])
		}
		requireQuarantined(t, root, 3)

		bazel(t, "clean")
		out = build()
		requireAllCacheHits(t, "the build after that", out)
		requireSameOutputs(t, "the build after that", local, OutputsHash(t, ws))

		// Gone bad while the server runs (see above).
		corruptCASBlob(t, root, local["big.bin"], "flip")
		bazel(t, "clean")
		out, err := Bazel(t, ws, our, append(append([]string{"build"}, remote...), targets...)...)
		t.Logf("build with a cached output gone bad while serving: err %v, %v", err, ParseProcesses(out))
		if err != nil && !strings.Contains(out, "DATA_LOSS") {
			t.Fatalf("that build failed, but not with DATA_LOSS")
		}
		build()
		requireSameOutputs(t, "the build after it", local, OutputsHash(t, ws))
		bazel(t, "clean")
		out = build()
		requireAllCacheHits(t, "and the build after that", out)
	})
}
