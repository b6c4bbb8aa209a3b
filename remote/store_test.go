package remote_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/actioncache"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/cas/castest"
	"github.com/actiond/actiond/internal/actiondtest"
	"github.com/actiond/actiond/remote"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// farm is a real actiond server (cache only) on a loopback listener.
type farm struct {
	srv  *actiond.Server
	conn *grpc.ClientConn
}

func newFarm(t *testing.T) *farm {
	t.Helper()
	srv, addr := actiondtest.TCP(t, actiond.Options{NoFsync: true})
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(actiond.MaxMessageSize)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &farm{srv: srv, conn: conn}
}

func newRemoteStore(t *testing.T, f *farm) *cas.ReadThrough {
	t.Helper()
	local, err := cas.NewDiskStore(filepath.Join(t.TempDir(), "cache"), cas.WithFsync(false))
	if err != nil {
		t.Fatal(err)
	}
	return remote.NewCachedStore(f.conn, local, remote.Options{})
}

func TestStoreConformance(t *testing.T) {
	castest.TestStore(t, func(t *testing.T) cas.Store {
		return newRemoteStore(t, newFarm(t))
	})
}

// The remote CAS alone, without a local cache, is a whole cas.Store too.
func TestUncachedStoreConformance(t *testing.T) {
	castest.TestStore(t, func(t *testing.T) cas.Store {
		return remote.NewStore(newFarm(t).conn, remote.Options{})
	})
}

// TestStoreWritesReachTheFarm checks Put and PutFile upload (small blobs by
// batch, large by ByteStream) and that reads go through the local cache.
func TestStoreWritesReachTheFarm(t *testing.T) {
	ctx := context.Background()
	f := newFarm(t)
	s := newRemoteStore(t, f)
	for _, n := range []int{10, 6 << 20} {
		data := castest.Blob(n, n)
		d := cas.DigestOf(data)
		if err := s.Put(ctx, d, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		got, err := cas.ReadAll(ctx, f.srv.Store, d)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("farm copy of %d-byte blob: %v", n, err)
		}
	}
	// A blob only the farm has is fetched once, then served locally.
	for _, n := range []int{100, 5 << 20} {
		data := castest.Blob(n+1, n)
		d := cas.DigestOf(data)
		if err := f.srv.Store.Put(ctx, d, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		p, err := s.LocalPath(ctx, d, false)
		if err != nil {
			t.Fatalf("BlobPath of a farm-only blob: %v", err)
		}
		if filepath.Dir(filepath.Dir(filepath.Dir(p))) == "" {
			t.Fatalf("odd blob path %q", p)
		}
		if missing, _ := s.Cache().FindMissing(ctx, []cas.Digest{d}); len(missing) != 0 {
			t.Fatalf("blob %s not cached locally after BlobPath", d)
		}
	}
}

func TestActionCache(t *testing.T) {
	ctx := context.Background()
	f := newFarm(t)
	s := newRemoteStore(t, f)
	ac := remote.NewActionCache(f.conn, "")
	action := cas.DigestOf([]byte("action"))
	if _, err := ac.Get(ctx, action); !errors.Is(err, actioncache.ErrNotFound) {
		t.Fatalf("Get of unknown action: %v, want ErrNotFound", err)
	}
	out := []byte("stdout")
	od := cas.DigestOf(out)
	if err := s.Put(ctx, od, bytes.NewReader(out)); err != nil {
		t.Fatal(err)
	}
	res := &repb.ActionResult{ExitCode: 0, StdoutDigest: od.Proto()}
	if err := ac.Put(ctx, action, res); err != nil {
		t.Fatal(err)
	}
	got, err := ac.Get(ctx, action)
	if err != nil || got.StdoutDigest.GetHash() != od.Hash {
		t.Fatalf("Get after Put = %v, %v", got, err)
	}
	if _, err := f.srv.Cache.Get(ctx, action); err != nil {
		t.Fatalf("farm AC lacks the result: %v", err)
	}
}

// A worker's local copy that went bad is quarantined when it is verified
// before use and fetched again from the farm: the action never sees it,
// and the farm's good copy is never reported missing.
func TestStoreRefetchesCorruptLocalCopy(t *testing.T) {
	ctx := context.Background()
	f := newFarm(t)
	dir := filepath.Join(t.TempDir(), "cache")
	local, err := cas.NewDiskStore(dir, cas.WithFsync(false))
	if err != nil {
		t.Fatal(err)
	}
	data := castest.Blob(3, cas.PackMaxBlob+5000) // a file of its own, to corrupt
	d := cas.DigestOf(data)
	if err := remote.NewCachedStore(f.conn, local, remote.Options{}).Put(ctx, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "sha256", d.Hash[:2], d.Hash)
	os.Chmod(p, 0o644)
	if err := os.WriteFile(p, bytes.Repeat([]byte{'x'}, len(data)), 0o444); err != nil {
		t.Fatal(err)
	}
	// A worker restart: nothing local is trusted.
	local, err = cas.NewDiskStore(dir, cas.WithFsync(false))
	if err != nil {
		t.Fatal(err)
	}
	s := remote.NewCachedStore(f.conn, local, remote.Options{})
	if bad, err := s.VerifyBlobs(ctx, []cas.Digest{d}); err != nil || len(bad) != 0 {
		t.Fatalf("VerifyBlobs = %v, %v; want nothing reported (the farm has it)", bad, err)
	}
	bp, err := s.LocalPath(ctx, d, false)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(bp); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("staged copy after the refetch: %v, good %v", err, bytes.Equal(got, data))
	}
}
