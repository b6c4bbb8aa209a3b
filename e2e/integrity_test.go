package e2e

// Issue 15 through a real Bazel: stored blobs go bad behind the server's
// back (a flipped byte, a truncation, other bytes of the same size); the
// next build still ends with the right outputs, and the build after it is
// all remote cache hits again, because the server quarantined what it found
// bad and Bazel uploaded it afresh.

import (
	"bytes"
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
	p := filepath.Join(root, "cas", "sha256", hash[:2], hash)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("blob %s (%s): %v", hash, kind, err)
	}
	switch kind {
	case "flip":
		b[len(b)/2] ^= 0x20
	case "truncate":
		b = b[:len(b)/2]
	case "same-size":
		b = bytes.Repeat([]byte{'#'}, len(b))
	}
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, b, 0o444); err != nil {
		t.Fatal(err)
	}
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
// stopped, a source file's blob and output blobs go bad (a disk that rots,
// a power loss). After the restart, a rebuild that executes everything
// (--noremote_accept_cached) gets MISSING for the source, uploads it again
// and ends with the right outputs; a normal rebuild after that is all remote
// cache hits; and a cached output that goes bad while the server runs is
// answered with DATA_LOSS, after which Bazel's next try executes it again.
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
	source := filepath.Join(ws, "srcdir", "data", "sub", "one.txt")
	sourceHash := sha256File(t, source)

	t.Run("cold", func(t *testing.T) {
		addr := StartServer(t, "--root", root)
		bazel(t, "clean")
		out := bazel(t, append(append([]string{"build"}, remoteExecFlags(addr)...), targets...)...)
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
		remote := remoteExecFlags(addr)
		bazel(t, "clean")
		out := bazel(t, append(append(append([]string{"build"}, remote...), "--noremote_accept_cached"), targets...)...)
		requireAllRemote(t, "remote rebuild after corruption", out)
		requireSameOutputs(t, "remote rebuild after corruption", local, OutputsHash(t, ws))
		if !strings.Contains(serverLog(), "corrupt blob quarantined") || !strings.Contains(serverLog(), sourceHash) {
			t.Errorf("the server log does not report the source blob %s quarantined", sourceHash[:12])
		}

		bazel(t, "clean")
		out = bazel(t, append(append([]string{"build"}, remote...), targets...)...)
		requireAllCacheHits(t, "the build after that", out)
		requireSameOutputs(t, "the build after that", local, OutputsHash(t, ws))

		// A cached output goes bad while the server runs. Bazel 4.2.3
		// fails the first build on the DATA_LOSS download (it only falls
		// back to execution on NOT_FOUND); by then the blob is quarantined
		// and the ActionCache entry no longer served, so the next build
		// executes the action again and is right.
		corruptCASBlob(t, root, local["big.bin"], "flip")
		bazel(t, "clean")
		out, err := Bazel(t, ws, our, append(append([]string{"build"}, remote...), targets...)...)
		t.Logf("build with a cached output gone bad: err %v, %v", err, ParseProcesses(out))
		if err != nil {
			out = bazel(t, append(append([]string{"build"}, remote...), targets...)...)
			t.Logf("the build after it: %v", ParseProcesses(out))
		}
		requireSameOutputs(t, "after a cached output went bad", local, OutputsHash(t, ws))
		bazel(t, "clean")
		out = bazel(t, append(append([]string{"build"}, remote...), targets...)...)
		requireAllCacheHits(t, "and the build after that", out)
	})
}
