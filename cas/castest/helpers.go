package castest

import (
	"bytes"
	"context"
	"testing"

	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"
)

// The helpers below store and read blobs for the tests of the packages
// above cas (executor, fs, worker, the server), failing the test on any
// error.

// Put stores data in s and returns its digest.
func Put(t testing.TB, s cas.Store, data []byte) cas.Digest {
	t.Helper()
	d := cas.DigestOf(data)
	if err := s.Put(context.Background(), d, bytes.NewReader(data)); err != nil {
		t.Fatalf("put %s: %v", d, err)
	}
	return d
}

// PutProto stores m in s, marshalled deterministically, and returns its
// digest.
func PutProto(t testing.TB, s cas.Store, m proto.Message) cas.Digest {
	t.Helper()
	data, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return Put(t, s, data)
}

// ReadString reads the blob d from s whole.
func ReadString(t testing.TB, s cas.Store, d *repb.Digest) string {
	t.Helper()
	dd, err := cas.FromProto(d)
	if err != nil {
		t.Fatal(err)
	}
	b, err := cas.ReadAll(context.Background(), s, dd)
	if err != nil {
		t.Fatalf("read %s: %v", dd, err)
	}
	return string(b)
}
