// Package remote reaches a build farm's REAPI services (CAS, ByteStream,
// ActionCache) as a cas.Store and an actioncache.Cache, so the executor runs
// against a farm exactly as it runs against the local disk: it never knows
// the difference. A worker puts a local store in front of the remote CAS as
// a read-through cache (NewCachedStore, a cas.ReadThrough): blobs are
// fetched once, input roots hardlink from the local copies, and everything
// written goes to both.
package remote

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"os"
	"syscall"

	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Defaults for Options.
const (
	// DefaultMaxBatchSize keeps batch requests below the 4 MiB gRPC default
	// message size with room for the request framing.
	DefaultMaxBatchSize = 4<<20 - 64<<10
	// chunkSize is the ByteStream write chunk.
	chunkSize = 1 << 20
	// maxFindMissing bounds the digests of one FindMissingBlobs request.
	maxFindMissing = 10000
)

// Options configure a Store.
type Options struct {
	// InstanceName is the REAPI instance name of every request.
	InstanceName string
	// MaxBatchSize is the largest total of blob bytes sent or read in one
	// batch request; bigger blobs go through ByteStream (default
	// DefaultMaxBatchSize).
	MaxBatchSize int64
	// Logger receives structured logs (default slog.Default()).
	Logger *slog.Logger
}

// Store is a cas.Store over a remote CAS alone: it keeps no local files
// and pins nothing (cas.Base). Small blobs travel in batch requests, larger
// ones through ByteStream; what is read from offset 0 and what is written
// is verified against its digest on this side too.
type Store struct {
	cas.Base
	cas  repb.ContentAddressableStorageClient
	bs   bytestream.ByteStreamClient
	opts Options
}

// NewStore returns a Store reaching the CAS over conn.
func NewStore(conn grpc.ClientConnInterface, opts Options) *Store {
	if opts.MaxBatchSize <= 0 {
		opts.MaxBatchSize = DefaultMaxBatchSize
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	return &Store{
		cas:  repb.NewContentAddressableStorageClient(conn),
		bs:   bytestream.NewByteStreamClient(conn),
		opts: opts,
	}
}

// NewCachedStore returns the remote CAS over conn behind local as its
// read-through cache: what a farm worker uses.
func NewCachedStore(conn grpc.ClientConnInterface, local cas.Store, opts Options) *cas.ReadThrough {
	return cas.NewReadThrough(local, NewStore(conn, opts))
}

// FindMissing implements cas.Store.
func (s *Store) FindMissing(ctx context.Context, ds []cas.Digest) ([]cas.Digest, error) {
	var missing []cas.Digest
	for start := 0; start < len(ds); start += maxFindMissing {
		part := ds[start:min(start+maxFindMissing, len(ds))]
		req := &repb.FindMissingBlobsRequest{InstanceName: s.opts.InstanceName}
		seen := make(map[cas.Digest]bool, len(part))
		for _, d := range part {
			if err := d.Validate(); err != nil {
				return nil, err
			}
			if d.IsEmpty() || seen[d] {
				continue
			}
			seen[d] = true
			req.BlobDigests = append(req.BlobDigests, d.Proto())
		}
		if len(req.BlobDigests) == 0 {
			continue
		}
		resp, err := s.cas.FindMissingBlobs(ctx, req)
		if err != nil {
			return nil, fmt.Errorf("remote FindMissingBlobs: %w", err)
		}
		gone := make(map[cas.Digest]bool, len(resp.MissingBlobDigests))
		for _, pd := range resp.MissingBlobDigests {
			if d, err := cas.FromProto(pd); err == nil {
				gone[d] = true
			}
		}
		for _, d := range part {
			if gone[d] {
				missing = append(missing, d)
			}
		}
	}
	return missing, nil
}

// Get implements cas.Store. A read from offset 0 is verified: a blob
// that does not hash to d fails with cas.ErrDigestMismatch at its end.
func (s *Store) Get(ctx context.Context, d cas.Digest, offset int64) (io.ReadCloser, error) {
	if err := cas.ValidateRead(d, offset); err != nil {
		return nil, err
	}
	if d.IsEmpty() {
		return io.NopCloser(bytes.NewReader(nil)), nil
	}
	if d.Size <= s.opts.MaxBatchSize {
		data, err := s.readBatch(ctx, d)
		if err != nil {
			return nil, err
		}
		return io.NopCloser(bytes.NewReader(data[offset:])), nil
	}
	return s.readStream(ctx, d, offset)
}

func (s *Store) readBatch(ctx context.Context, d cas.Digest) ([]byte, error) {
	resp, err := s.cas.BatchReadBlobs(ctx, &repb.BatchReadBlobsRequest{
		InstanceName: s.opts.InstanceName,
		Digests:      []*repb.Digest{d.Proto()},
	})
	if err != nil {
		return nil, remoteErr(d, "BatchReadBlobs", err)
	}
	if len(resp.Responses) != 1 {
		return nil, fmt.Errorf("remote BatchReadBlobs of %s: got %d responses, want 1", d, len(resp.Responses))
	}
	r := resp.Responses[0]
	if err := status.FromProto(r.Status).Err(); err != nil {
		return nil, remoteErr(d, "BatchReadBlobs", err)
	}
	if got := cas.DigestOf(r.Data); got != d {
		return nil, fmt.Errorf("blob %s from the remote CAS hashes to %s: %w", d, got, cas.ErrDigestMismatch)
	}
	return r.Data, nil
}

func (s *Store) readStream(ctx context.Context, d cas.Digest, offset int64) (io.ReadCloser, error) {
	ctx, cancel := context.WithCancel(ctx)
	stream, err := s.bs.Read(ctx, &bytestream.ReadRequest{
		ResourceName: cas.Resource{InstanceName: s.opts.InstanceName, Digest: d}.String(),
		ReadOffset:   offset,
	})
	if err != nil {
		cancel()
		return nil, remoteErr(d, "ByteStream.Read", err)
	}
	r := &streamReader{d: d, stream: stream, cancel: cancel, off: offset}
	if offset == 0 {
		r.h = sha256.New()
	}
	return r, nil
}

// streamReader reads a ByteStream.Read stream, hashing what it reads from
// offset 0 and checking it at the end.
type streamReader struct {
	d      cas.Digest
	stream bytestream.ByteStream_ReadClient
	cancel context.CancelFunc
	buf    []byte
	off    int64
	h      hash.Hash // nil: not verified (read from an offset)
}

func (r *streamReader) Read(p []byte) (int, error) {
	for len(r.buf) == 0 {
		msg, err := r.stream.Recv()
		if errors.Is(err, io.EOF) {
			return 0, r.end()
		}
		if err != nil {
			return 0, remoteErr(r.d, "ByteStream.Read", err)
		}
		r.buf = msg.Data
	}
	n := copy(p, r.buf)
	if r.off+int64(n) > r.d.Size {
		return 0, fmt.Errorf("blob %s: the remote CAS sent more than %d bytes: %w", r.d, r.d.Size, cas.ErrDigestMismatch)
	}
	if r.h != nil {
		r.h.Write(p[:n])
	}
	r.buf = r.buf[n:]
	r.off += int64(n)
	return n, nil
}

// end checks a complete read.
func (r *streamReader) end() error {
	if r.off != r.d.Size {
		return fmt.Errorf("blob %s: the remote CAS sent %d bytes, want %d: %w", r.d, r.off, r.d.Size, cas.ErrDigestMismatch)
	}
	if r.h != nil {
		if got := hex.EncodeToString(r.h.Sum(nil)); got != r.d.Hash {
			return fmt.Errorf("blob %s from the remote CAS hashes to %s: %w", r.d, got, cas.ErrDigestMismatch)
		}
	}
	return io.EOF
}

func (r *streamReader) Close() error { r.cancel(); return nil }

// Put implements cas.Store: the blob is written to the remote CAS (which
// may already have it).
func (s *Store) Put(ctx context.Context, d cas.Digest, r io.Reader) error {
	if err := d.Validate(); err != nil {
		return err
	}
	if d.Size <= s.opts.MaxBatchSize {
		data, err := io.ReadAll(io.LimitReader(r, d.Size+1))
		if err != nil {
			return fmt.Errorf("upload %s: %w", d, err)
		}
		if got := cas.DigestOf(data); got != d {
			return fmt.Errorf("blob %s: data hashes to %s: %w", d, got, cas.ErrDigestMismatch)
		}
		if d.IsEmpty() {
			return nil
		}
		return s.writeBatch(ctx, d, data)
	}
	return s.uploadStream(ctx, d, r)
}

// PutFile implements cas.Store: the file is written to the remote CAS and
// removed.
func (s *Store) PutFile(ctx context.Context, path string) (cas.Digest, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return cas.Digest{}, fmt.Errorf("open %s: %w", path, err)
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		return cas.Digest{}, fmt.Errorf("%s is not a regular file (%v)", path, err)
	}
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return cas.Digest{}, fmt.Errorf("hash %s: %w", path, err)
	}
	d := cas.Digest{Hash: hex.EncodeToString(h.Sum(nil)), Size: n}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return cas.Digest{}, fmt.Errorf("read %s: %w", path, err)
	}
	if err := s.Put(ctx, d, f); err != nil {
		return cas.Digest{}, fmt.Errorf("store %s: %w", path, err)
	}
	os.Remove(path)
	return d, nil
}

func (s *Store) writeBatch(ctx context.Context, d cas.Digest, data []byte) error {
	resp, err := s.cas.BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{
		InstanceName: s.opts.InstanceName,
		Requests:     []*repb.BatchUpdateBlobsRequest_Request{{Digest: d.Proto(), Data: data}},
	})
	if err != nil {
		return remoteErr(d, "BatchUpdateBlobs", err)
	}
	for _, r := range resp.Responses {
		if err := status.FromProto(r.Status).Err(); err != nil {
			return remoteErr(d, "BatchUpdateBlobs", err)
		}
	}
	return nil
}

// uploadStream writes the content r yields as d through ByteStream; the
// stream is abandoned before its last chunk if r does not hash to d.
func (s *Store) uploadStream(ctx context.Context, d cas.Digest, r io.Reader) error {
	h := sha256.New()
	r = io.TeeReader(r, h)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := s.bs.Write(ctx)
	if err != nil {
		return remoteErr(d, "ByteStream.Write", err)
	}
	name := cas.Resource{InstanceName: s.opts.InstanceName, UploadID: newUploadID(), Digest: d}.String()
	buf := make([]byte, chunkSize)
	var off int64
	for {
		n, rerr := io.ReadFull(r, buf)
		if rerr != nil && !errors.Is(rerr, io.ErrUnexpectedEOF) && !errors.Is(rerr, io.EOF) {
			return fmt.Errorf("upload %s: read: %w", d, rerr)
		}
		last := off+int64(n) >= d.Size
		if last {
			if got := hex.EncodeToString(h.Sum(nil)); got != d.Hash || off+int64(n) != d.Size {
				return fmt.Errorf("blob %s: data hashes to %s: %w", d, got, cas.ErrDigestMismatch)
			}
		}
		req := &bytestream.WriteRequest{WriteOffset: off, Data: buf[:n], FinishWrite: last}
		if off == 0 {
			req.ResourceName = name
		}
		if err := stream.Send(req); err != nil {
			if errors.Is(err, io.EOF) {
				// The server ended the stream early (e.g. it already has
				// the blob); its status comes with CloseAndRecv.
				break
			}
			return remoteErr(d, "ByteStream.Write", err)
		}
		off += int64(n)
		if last {
			break
		}
		if n == 0 {
			return fmt.Errorf("upload %s: data ended at %d of %d bytes: %w", d, off, d.Size, cas.ErrDigestMismatch)
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return remoteErr(d, "ByteStream.Write", err)
	}
	if resp.CommittedSize != d.Size && resp.CommittedSize != -1 {
		return fmt.Errorf("upload %s: remote committed %d bytes, want %d", d, resp.CommittedSize, d.Size)
	}
	return nil
}

// remoteErr wraps a remote failure with context, mapping NOT_FOUND to
// cas.ErrNotFound and INVALID_ARGUMENT about data to ErrDigestMismatch.
func remoteErr(d cas.Digest, op string, err error) error {
	switch status.Code(err) {
	case codes.NotFound:
		return fmt.Errorf("blob %s: remote %s: %w: %w", d, op, cas.ErrNotFound, err)
	case codes.ResourceExhausted:
		return fmt.Errorf("blob %s: remote %s: %w: %w", d, op, cas.ErrNoSpace, err)
	}
	return fmt.Errorf("blob %s: remote %s: %w", d, op, err)
}
