//go:build linux

package vmtest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/actiond/actiond/cas"
)

// Client is the REAPI side of a VM test: the calls the tests make on a
// guest's server, each failing the test when the call itself fails.
type Client struct {
	CAS         repb.ContentAddressableStorageClient
	ByteStream  bspb.ByteStreamClient
	Execution   repb.ExecutionClient
	ActionCache repb.ActionCacheClient

	t testing.TB
}

// NewClient returns a Client on cc (a connection to the guest's server).
func NewClient(t testing.TB, cc grpc.ClientConnInterface) *Client {
	return &Client{
		CAS:         repb.NewContentAddressableStorageClient(cc),
		ByteStream:  bspb.NewByteStreamClient(cc),
		Execution:   repb.NewExecutionClient(cc),
		ActionCache: repb.NewActionCacheClient(cc),
		t:           t,
	}
}

// Put uploads m's wire form with BatchUpdateBlobs and returns its digest.
func (c *Client) Put(ctx context.Context, m proto.Message) *repb.Digest {
	c.t.Helper()
	data, err := proto.Marshal(m)
	if err != nil {
		c.t.Fatal(err)
	}
	d := cas.DigestOf(data).Proto()
	resp, err := c.CAS.BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{
		Requests: []*repb.BatchUpdateBlobsRequest_Request{{Digest: d, Data: data}}})
	if err != nil {
		c.t.Fatal(err)
	}
	if code := resp.Responses[0].GetStatus().GetCode(); code != 0 {
		c.t.Fatalf("BatchUpdateBlobs: %v", resp.Responses[0].Status)
	}
	return d
}

// Write uploads data through ByteStream (in 256 KiB chunks) and returns
// its digest.
func (c *Client) Write(ctx context.Context, data []byte) *repb.Digest {
	c.t.Helper()
	d := cas.DigestOf(data).Proto()
	stream, err := c.ByteStream.Write(ctx)
	if err != nil {
		c.t.Fatal(err)
	}
	name := fmt.Sprintf("uploads/%x/blobs/%s/%d", time.Now().UnixNano(), d.Hash, d.SizeBytes)
	const chunk = 256 << 10
	for off := 0; ; off += chunk {
		end := min(off+chunk, len(data))
		req := &bspb.WriteRequest{WriteOffset: int64(off), Data: data[off:end], FinishWrite: end == len(data)}
		if off == 0 {
			req.ResourceName = name
		}
		if err := stream.Send(req); err != nil {
			c.t.Fatalf("bytestream write: %v", err)
		}
		if end == len(data) {
			break
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		c.t.Fatalf("bytestream write: %v", err)
	}
	if resp.CommittedSize != d.SizeBytes {
		c.t.Fatalf("committed %d bytes, want %d", resp.CommittedSize, d.SizeBytes)
	}
	return d
}

// Read reads the blob d through ByteStream; a nil or empty digest reads
// nothing.
func (c *Client) Read(ctx context.Context, d *repb.Digest) []byte {
	c.t.Helper()
	if d.GetSizeBytes() == 0 {
		return nil
	}
	stream, err := c.ByteStream.Read(ctx, &bspb.ReadRequest{ResourceName: fmt.Sprintf("blobs/%s/%d", d.Hash, d.SizeBytes)})
	if err != nil {
		c.t.Fatal(err)
	}
	var out bytes.Buffer
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			return out.Bytes()
		}
		if err != nil {
			c.t.Fatalf("bytestream read: %v", err)
		}
		out.Write(resp.Data)
	}
}

// Execute runs action, skipping the cache lookup, and returns the finished
// operation's response, or the operation's error (a gRPC status error).
// A failing Execute stream fails the test.
func (c *Client) Execute(ctx context.Context, action *repb.Digest) (*repb.ExecuteResponse, error) {
	c.t.Helper()
	stream, err := c.Execution.Execute(ctx, &repb.ExecuteRequest{ActionDigest: action, SkipCacheLookup: true})
	if err != nil {
		c.t.Fatal(err)
	}
	for {
		op, err := stream.Recv()
		if err != nil {
			c.t.Fatalf("execute: %v", err)
		}
		if !op.Done {
			continue
		}
		if e := op.GetError(); e != nil {
			return nil, status.ErrorProto(e)
		}
		resp := new(repb.ExecuteResponse)
		if err := op.GetResponse().UnmarshalTo(resp); err != nil {
			c.t.Fatal(err)
		}
		return resp, nil
	}
}
