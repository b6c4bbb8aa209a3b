package actioncache_test

import (
	"context"
	"strings"
	"testing"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/actioncache"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/actiondtest"
	"github.com/actiond/actiond/internal/grpctest"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	bolt "go.etcd.io/bbolt"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

var bg = context.Background()

type env struct {
	srv *actiond.Server
	ac  repb.ActionCacheClient
	cas repb.ContentAddressableStorageClient
}

func newEnv(t *testing.T, root string) *env {
	t.Helper()
	srv, conn, _ := actiondtest.Bufconn(t, actiond.Options{Root: root}, grpctest.BufSize)
	return &env{srv: srv, ac: repb.NewActionCacheClient(conn), cas: repb.NewContentAddressableStorageClient(conn)}
}

func (e *env) upload(t *testing.T, blobs ...[]byte) []*repb.Digest {
	t.Helper()
	var ds []*repb.Digest
	for _, d := range actiondtest.Upload(t, e.cas, blobs...) {
		ds = append(ds, d.Proto())
	}
	return ds
}

func (e *env) update(t *testing.T, action *repb.Digest, res *repb.ActionResult) {
	t.Helper()
	got, err := e.ac.UpdateActionResult(bg, &repb.UpdateActionResultRequest{ActionDigest: action, ActionResult: res})
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(got, res) {
		t.Fatalf("UpdateActionResult returned %v", got)
	}
}

func (e *env) get(action *repb.Digest) (*repb.ActionResult, error) {
	return e.ac.GetActionResult(bg, &repb.GetActionResultRequest{ActionDigest: action})
}

func wantCode(t *testing.T, err error, code codes.Code, contains ...string) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("got %v; want %v", err, code)
	}
	for _, c := range contains {
		if !strings.Contains(err.Error(), c) {
			t.Fatalf("%q does not mention %q", err, c)
		}
	}
}

func actionDigest(name string) *repb.Digest { return cas.DigestOf([]byte("action " + name)).Proto() }

func TestActionCacheRoundTrip(t *testing.T) {
	root := t.TempDir()
	e := newEnv(t, root)
	ds := e.upload(t, []byte("output one"), []byte("stdout text"), []byte("stderr text"))
	res := &repb.ActionResult{
		OutputFiles:       []*repb.OutputFile{{Path: "out/one", Digest: ds[0], IsExecutable: true}},
		OutputSymlinks:    []*repb.OutputSymlink{{Path: "out/link", Target: "one"}},
		ExitCode:          3,
		StdoutDigest:      ds[1],
		StderrDigest:      ds[2],
		ExecutionMetadata: &repb.ExecutedActionMetadata{Worker: "w"},
	}
	a := actionDigest("a")
	_, err := e.get(a)
	wantCode(t, err, codes.NotFound)
	e.update(t, a, res)
	got, err := e.get(a)
	if err != nil || !proto.Equal(got, res) {
		t.Fatalf("GetActionResult = %v, %v", got, err)
	}
	// Keyed by the whole digest: another size is another action.
	_, err = e.get(&repb.Digest{Hash: a.Hash, SizeBytes: a.SizeBytes + 1})
	wantCode(t, err, codes.NotFound)
	// Overwrite.
	res2 := proto.Clone(res).(*repb.ActionResult)
	res2.ExitCode = 0
	e.update(t, a, res2)
	if got, _ := e.get(a); got.ExitCode != 0 {
		t.Fatal("overwrite lost")
	}
	st := e.srv.Cache.Stats()
	if st.Entries != 1 || st.Hits != 2 || st.Misses != 2 {
		t.Fatalf("Stats = %+v", st)
	}

	// The result survives a restart (same root).
	e.srv.Close()
	e2 := newEnv(t, root)
	if got, err := e2.get(a); err != nil || !proto.Equal(got, res2) {
		t.Fatalf("after restart: %v, %v", got, err)
	}
}

func TestActionCacheCompleteness(t *testing.T) {
	e := newEnv(t, t.TempDir())
	file := []byte("file inside a tree")
	fd := cas.DigestOf(file).Proto()
	other := cas.DigestOf([]byte("another file")).Proto()

	t.Run("output file", func(t *testing.T) {
		out := []byte("out")
		od := cas.DigestOf(out).Proto()
		a := actionDigest("file")
		e.update(t, a, &repb.ActionResult{OutputFiles: []*repb.OutputFile{{Path: "o", Digest: od}}})
		_, err := e.get(a)
		wantCode(t, err, codes.NotFound, "no longer in the CAS")
		e.upload(t, out)
		if _, err := e.get(a); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("stdout", func(t *testing.T) {
		a := actionDigest("stdout")
		e.update(t, a, &repb.ActionResult{StdoutDigest: cas.DigestOf([]byte("missing stdout")).Proto()})
		_, err := e.get(a)
		wantCode(t, err, codes.NotFound)
	})
	t.Run("tree", func(t *testing.T) {
		tree := &repb.Tree{
			Root:     &repb.Directory{Files: []*repb.FileNode{{Name: "f", Digest: fd}}},
			Children: []*repb.Directory{{Files: []*repb.FileNode{{Name: "g", Digest: other}}}},
		}
		tb, _ := proto.Marshal(tree)
		td := e.upload(t, tb, file)[0]
		a := actionDigest("tree")
		e.update(t, a, &repb.ActionResult{OutputDirectories: []*repb.OutputDirectory{{Path: "d", TreeDigest: td}}})
		_, err := e.get(a) // "another file" (in a child) is missing
		wantCode(t, err, codes.NotFound)
		e.upload(t, []byte("another file"))
		if _, err := e.get(a); err != nil {
			t.Fatal(err)
		}
		// A tree blob that is not a Tree is as good as missing.
		bad := e.upload(t, []byte{0xff, 0xff})[0]
		a2 := actionDigest("bad tree")
		e.update(t, a2, &repb.ActionResult{OutputDirectories: []*repb.OutputDirectory{{Path: "d", TreeDigest: bad}}})
		_, err = e.get(a2)
		wantCode(t, err, codes.NotFound)
	})
	t.Run("root directory only", func(t *testing.T) {
		leafFile := []byte("leaf file")
		leaf := &repb.Directory{Files: []*repb.FileNode{{Name: "x", Digest: cas.DigestOf(leafFile).Proto()}}}
		lb, _ := proto.Marshal(leaf)
		root := &repb.Directory{
			Files:       []*repb.FileNode{{Name: "f", Digest: fd}},
			Directories: []*repb.DirectoryNode{{Name: "sub", Digest: cas.DigestOf(lb).Proto()}},
		}
		rb, _ := proto.Marshal(root)
		rd := e.upload(t, rb)[0]
		a := actionDigest("root dir")
		e.update(t, a, &repb.ActionResult{OutputDirectories: []*repb.OutputDirectory{{Path: "d", RootDirectoryDigest: rd}}})
		_, err := e.get(a) // the subdirectory blob is missing
		wantCode(t, err, codes.NotFound)
		e.upload(t, lb)
		_, err = e.get(a) // now the file inside it is
		wantCode(t, err, codes.NotFound)
		e.upload(t, leafFile)
		if _, err := e.get(a); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("evicted", func(t *testing.T) {
		out := []byte("soon evicted")
		od := e.upload(t, out)[0]
		a := actionDigest("evicted")
		e.update(t, a, &repb.ActionResult{OutputFiles: []*repb.OutputFile{{Path: "o", Digest: od}}})
		if _, err := e.get(a); err != nil {
			t.Fatal(err)
		}
		e.srv.DiskStore.Evict(1) // everything goes
		_, err := e.get(a)
		wantCode(t, err, codes.NotFound)
	})
}

func TestActionCacheInline(t *testing.T) {
	e := newEnv(t, t.TempDir())
	ds := e.upload(t, []byte("file a"), []byte("file b"), []byte("out"), []byte("err"))
	res := &repb.ActionResult{
		OutputFiles: []*repb.OutputFile{
			{Path: "a", Digest: ds[0]},
			{Path: "b", Digest: ds[1]},
			{Path: "empty", Digest: cas.EmptyDigest.Proto()},
		},
		StdoutDigest: ds[2],
		StderrDigest: ds[3],
	}
	a := actionDigest("inline")
	e.update(t, a, res)

	got, err := e.get(a)
	if err != nil {
		t.Fatal(err)
	}
	if got.StdoutRaw != nil || got.StderrRaw != nil || got.OutputFiles[0].Contents != nil {
		t.Fatal("inlined without being asked")
	}
	got, err = e.ac.GetActionResult(bg, &repb.GetActionResultRequest{ActionDigest: a, InlineStdout: true, InlineStderr: true, InlineOutputFiles: []string{"b", "empty", "nonexistent"}})
	if err != nil {
		t.Fatal(err)
	}
	if string(got.StdoutRaw) != "out" || string(got.StderrRaw) != "err" {
		t.Fatalf("stdout %q stderr %q", got.StdoutRaw, got.StderrRaw)
	}
	if got.OutputFiles[0].Contents != nil || string(got.OutputFiles[1].Contents) != "file b" || len(got.OutputFiles[2].Contents) != 0 {
		t.Fatalf("output files %v", got.OutputFiles)
	}
	// Only stdout.
	got, _ = e.ac.GetActionResult(bg, &repb.GetActionResultRequest{ActionDigest: a, InlineStdout: true})
	if string(got.StdoutRaw) != "out" || got.StderrRaw != nil {
		t.Fatalf("stdout %q stderr %q", got.StdoutRaw, got.StderrRaw)
	}
}

func TestActionCacheBadInput(t *testing.T) {
	e := newEnv(t, t.TempDir())
	good := actionDigest("x")
	for _, d := range []*repb.Digest{nil, {Hash: "abc", SizeBytes: 1}, {Hash: good.Hash, SizeBytes: -1}, {Hash: strings.ToUpper(good.Hash), SizeBytes: 1}} {
		_, err := e.get(d)
		wantCode(t, err, codes.InvalidArgument, "action_digest")
		_, err = e.ac.UpdateActionResult(bg, &repb.UpdateActionResultRequest{ActionDigest: d, ActionResult: &repb.ActionResult{}})
		wantCode(t, err, codes.InvalidArgument, "action_digest")
	}
	_, err := e.ac.GetActionResult(bg, &repb.GetActionResultRequest{ActionDigest: good, DigestFunction: repb.DigestFunction_SHA1})
	wantCode(t, err, codes.InvalidArgument, "digest function")
	_, err = e.ac.UpdateActionResult(bg, &repb.UpdateActionResultRequest{ActionDigest: good, ActionResult: &repb.ActionResult{}, DigestFunction: repb.DigestFunction_BLAKE3})
	wantCode(t, err, codes.InvalidArgument, "digest function")
	_, err = e.ac.UpdateActionResult(bg, &repb.UpdateActionResultRequest{ActionDigest: good})
	wantCode(t, err, codes.InvalidArgument, "action_result")
	for name, res := range map[string]*repb.ActionResult{
		"file without digest":      {OutputFiles: []*repb.OutputFile{{Path: "a"}}},
		"file with a bad digest":   {OutputFiles: []*repb.OutputFile{{Path: "a", Digest: &repb.Digest{Hash: "zz", SizeBytes: 1}}}},
		"directory without digest": {OutputDirectories: []*repb.OutputDirectory{{Path: "d"}}},
		"bad root directory":       {OutputDirectories: []*repb.OutputDirectory{{Path: "d", RootDirectoryDigest: &repb.Digest{Hash: "zz"}}}},
		"bad stdout":               {StdoutDigest: &repb.Digest{Hash: good.Hash, SizeBytes: -5}},
		"bad stderr":               {StderrDigest: &repb.Digest{Hash: "1"}},
	} {
		_, err := e.ac.UpdateActionResult(bg, &repb.UpdateActionResultRequest{ActionDigest: good, ActionResult: res})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, err := e.get(good); status.Code(err) != codes.NotFound {
		t.Fatalf("a refused update was stored: %v", err)
	}
}

func TestReadOnlyService(t *testing.T) {
	root := t.TempDir()
	store, err := cas.NewDiskStore(root + "/cas")
	if err != nil {
		t.Fatal(err)
	}
	cache, err := actioncache.Open(root+"/ac.db", store)
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	svc := actioncache.NewService(cache, store, actioncache.ServiceOptions{ReadOnly: true})
	_, err = svc.UpdateActionResult(bg, &repb.UpdateActionResultRequest{ActionDigest: actionDigest("x"), ActionResult: &repb.ActionResult{}})
	wantCode(t, err, codes.PermissionDenied)
}

func TestCorruptEntryIsAMiss(t *testing.T) {
	root := t.TempDir()
	store, err := cas.NewDiskStore(root + "/cas")
	if err != nil {
		t.Fatal(err)
	}
	a := cas.DigestOf([]byte("action"))
	db, err := bolt.Open(root+"/ac.db", 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists([]byte("ac"))
		if err != nil {
			return err
		}
		return b.Put([]byte(a.String()), []byte{0xff, 0xff, 0xff})
	})
	db.Close()
	cache, err := actioncache.Open(root+"/ac.db", store)
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	if _, err := cache.Get(bg, a); err == nil || !strings.Contains(err.Error(), "corrupt") {
		t.Fatalf("Get of a corrupt entry = %v", err)
	}
}
