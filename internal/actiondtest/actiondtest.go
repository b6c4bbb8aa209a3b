// Package actiondtest serves a real actiond.Server in process for tests and
// drives it as clients do (ByteStream uploads and reads), so the packages'
// tests share one set-up instead of each building its own.
package actiondtest

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/grpctest"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
)

// Quiet is a logger that drops everything.
func Quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// newServer makes a server from opts, with a fresh root and a quiet logger
// where they are unset.
func newServer(t testing.TB, opts actiond.Options) *actiond.Server {
	t.Helper()
	if opts.Root == "" {
		opts.Root = t.TempDir()
	}
	if opts.Logger == nil {
		opts.Logger = Quiet()
	}
	srv, err := actiond.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return srv
}

// Bufconn serves a server made from opts (a fresh root and a quiet logger
// where unset) on a bufconn listener of bufSize bytes and returns it with a
// client connection dialled with dial. stop closes the connection, the gRPC
// server and the server, in that order, once (for a restart on the same
// root); the test's cleanup calls it too.
func Bufconn(t testing.TB, opts actiond.Options, bufSize int, dial ...grpc.DialOption) (srv *actiond.Server, conn *grpc.ClientConn, stop func()) {
	t.Helper()
	srv = newServer(t, opts)
	g := srv.GRPCServer()
	conn = grpctest.Dial(t, g, bufSize, dial...)
	var once sync.Once
	stop = func() {
		once.Do(func() {
			conn.Close()
			g.Stop()
			srv.Close()
		})
	}
	t.Cleanup(stop)
	return srv, conn, stop
}

// TCP serves a server made from opts (a fresh root and a quiet logger where
// unset) on a free port of 127.0.0.1 and returns it with its address, for
// clients that dial for themselves (a farm for the remote store, a worker,
// benchmarks over a real socket). The test's cleanup stops and closes it.
func TCP(t testing.TB, opts actiond.Options) (*actiond.Server, string) {
	t.Helper()
	srv := newServer(t, opts)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		srv.Close()
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(func() {
		srv.Stop(context.Background())
		srv.Close()
	})
	return srv, l.Addr().String()
}

// WriteBlob uploads data under the resource name name in chunks of chunk
// bytes, the last one finishing the write, sleeping pause after each chunk.
// A server that finishes early (the blob is already there) ends the stream;
// its answer is returned then.
func WriteBlob(ctx context.Context, bs bytestream.ByteStreamClient, name string, data []byte, chunk int, pause time.Duration) (*bytestream.WriteResponse, error) {
	st, err := bs.Write(ctx)
	if err != nil {
		return nil, err
	}
	off := 0
	for first := true; first || off < len(data); first = false {
		end := min(off+chunk, len(data))
		req := &bytestream.WriteRequest{WriteOffset: int64(off), Data: data[off:end], FinishWrite: end == len(data)}
		if first {
			req.ResourceName = name
		}
		if err := st.Send(req); err != nil {
			if err == io.EOF {
				break // the server finished early; CloseAndRecv has its answer
			}
			return nil, err
		}
		off = end
		if pause > 0 {
			time.Sleep(pause)
		}
	}
	return st.CloseAndRecv()
}

// ReadBlob reads the resource name from offset, at most limit bytes (0: to
// the end). It fails a response over 1 MiB, which the server must never
// send. On an error it returns what it had read.
func ReadBlob(ctx context.Context, bs bytestream.ByteStreamClient, name string, offset, limit int64) ([]byte, error) {
	st, err := bs.Read(ctx, &bytestream.ReadRequest{ResourceName: name, ReadOffset: offset, ReadLimit: limit})
	if err != nil {
		return nil, err
	}
	var out []byte
	for {
		resp, err := st.Recv()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		if len(resp.Data) > 1<<20 {
			return nil, fmt.Errorf("read response of %d bytes, over 1 MiB", len(resp.Data))
		}
		out = append(out, resp.Data...)
	}
}

// Upload stores blobs with one BatchUpdateBlobs call, failing the test on
// any error, and returns their digests in order.
func Upload(t testing.TB, c repb.ContentAddressableStorageClient, blobs ...[]byte) []cas.Digest {
	t.Helper()
	req := &repb.BatchUpdateBlobsRequest{}
	var ds []cas.Digest
	for _, b := range blobs {
		d := cas.DigestOf(b)
		ds = append(ds, d)
		req.Requests = append(req.Requests, &repb.BatchUpdateBlobsRequest_Request{Digest: d.Proto(), Data: b})
	}
	resp, err := c.BatchUpdateBlobs(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range resp.Responses {
		if r.Status.GetCode() != 0 {
			t.Fatalf("upload %d: %v", i, r.Status)
		}
	}
	return ds
}
