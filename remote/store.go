// Package remote reaches a build farm's REAPI services (CAS, ByteStream,
// ActionCache) as a cas.Store and an actioncache.Cache, so the executor runs
// against a farm exactly as it runs against the local disk: it never knows
// the difference. The Store keeps a local cas.DiskStore in front of the
// remote CAS as a read-through cache (blobs are fetched once, and input
// roots hardlink from it); everything written goes to both.
package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"

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

// Store is a cas.Store over a remote CAS with a local read-through DiskStore.
// It implements cas.LocalStore (blobs are fetched into the local store
// first) and cas.Pinner (pins apply to the local copies).
type Store struct {
	local *cas.DiskStore
	cas   repb.ContentAddressableStorageClient
	bs    bytestream.ByteStreamClient
	opts  Options
	log   *slog.Logger

	mu       sync.Mutex
	fetching map[cas.Digest]*fetch // in-flight downloads, shared by callers
}

// fetch is one download of a blob into the local store that every caller
// wanting the blob meanwhile waits for.
type fetch struct {
	done chan struct{}
	err  error
}

var (
	_ cas.LocalStore = (*Store)(nil)
	_ cas.Pinner     = (*Store)(nil)
)

// NewStore returns a Store reaching the CAS over conn, caching in local.
func NewStore(conn grpc.ClientConnInterface, local *cas.DiskStore, opts Options) *Store {
	if opts.MaxBatchSize <= 0 {
		opts.MaxBatchSize = DefaultMaxBatchSize
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	return &Store{
		local:    local,
		cas:      repb.NewContentAddressableStorageClient(conn),
		bs:       bytestream.NewByteStreamClient(conn),
		opts:     opts,
		log:      opts.Logger,
		fetching: make(map[cas.Digest]*fetch),
	}
}

// Local is the read-through cache.
func (s *Store) Local() *cas.DiskStore { return s.local }

// FindMissing implements cas.Store by asking the remote CAS, the source of
// truth: a blob only in the local cache is missing for the farm.
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

// Get implements cas.Store: from the local cache, fetching the blob from
// the remote CAS first when it is not there.
func (s *Store) Get(ctx context.Context, d cas.Digest, offset int64) (io.ReadCloser, error) {
	if err := s.ensureLocal(ctx, d); err != nil {
		return nil, err
	}
	return s.local.Get(ctx, d, offset)
}

// BlobPath implements cas.LocalStore, fetching the blob first if needed.
func (s *Store) BlobPath(d cas.Digest, executable bool) (string, error) {
	if err := s.ensureLocal(context.Background(), d); err != nil {
		return "", err
	}
	return s.local.BlobPath(d, executable)
}

// Pin implements cas.Pinner on the local copies.
func (s *Store) Pin(ds []cas.Digest) func() { return s.local.Pin(ds) }

// VerifyBlobs implements cas.Verifier on the local copies: one that went
// bad is quarantined locally and fetched again from the farm when staging
// asks for it (BlobPath), so it is never reported corrupt: the farm's copy
// is the one that counts.
func (s *Store) VerifyBlobs(ctx context.Context, ds []cas.Digest) ([]cas.Digest, error) {
	_, err := s.local.VerifyBlobs(ctx, ds)
	return nil, err
}

// Put implements cas.Store: the blob is verified and stored locally, then
// uploaded unless the remote CAS has it.
func (s *Store) Put(ctx context.Context, d cas.Digest, r io.Reader) error {
	if err := s.local.Put(ctx, d, r); err != nil {
		return err
	}
	return s.upload(ctx, d)
}

// PutFile implements cas.Store: the file moves into the local store by
// rename and is then uploaded.
func (s *Store) PutFile(ctx context.Context, path string) (cas.Digest, error) {
	d, err := s.local.PutFile(ctx, path)
	if err != nil {
		return d, err
	}
	return d, s.upload(ctx, d)
}

// ensureLocal fetches d into the local store unless it is there.
func (s *Store) ensureLocal(ctx context.Context, d cas.Digest) error {
	if err := d.Validate(); err != nil {
		return err
	}
	if d.IsEmpty() {
		return nil
	}
	missing, err := s.local.FindMissing(ctx, []cas.Digest{d})
	if err != nil {
		return err
	}
	if len(missing) == 0 {
		return nil
	}
	// Runners staging the same inputs download each blob once.
	s.mu.Lock()
	f, ok := s.fetching[d]
	if !ok {
		f = &fetch{done: make(chan struct{})}
		s.fetching[d] = f
	}
	s.mu.Unlock()
	if ok {
		select {
		case <-f.done:
		case <-ctx.Done():
			return fmt.Errorf("wait for download of %s: %w", d, ctx.Err())
		}
		if f.err == nil {
			return nil
		}
		// The other download may have failed for its own reasons (its
		// context ended): try ourselves.
	}
	if d.Size <= s.opts.MaxBatchSize {
		err = s.fetchBatch(ctx, d)
	} else {
		err = s.fetchStream(ctx, d)
	}
	if !ok {
		f.err = err
		s.mu.Lock()
		delete(s.fetching, d)
		s.mu.Unlock()
		close(f.done)
	}
	return err
}

func (s *Store) fetchBatch(ctx context.Context, d cas.Digest) error {
	resp, err := s.cas.BatchReadBlobs(ctx, &repb.BatchReadBlobsRequest{
		InstanceName: s.opts.InstanceName,
		Digests:      []*repb.Digest{d.Proto()},
	})
	if err != nil {
		return remoteErr(d, "BatchReadBlobs", err)
	}
	if len(resp.Responses) != 1 {
		return fmt.Errorf("remote BatchReadBlobs of %s: got %d responses, want 1", d, len(resp.Responses))
	}
	r := resp.Responses[0]
	if err := status.FromProto(r.Status).Err(); err != nil {
		return remoteErr(d, "BatchReadBlobs", err)
	}
	if err := s.local.Put(ctx, d, bytes.NewReader(r.Data)); err != nil {
		return fmt.Errorf("cache blob %s fetched from the remote CAS: %w", d, err)
	}
	return nil
}

func (s *Store) fetchStream(ctx context.Context, d cas.Digest) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := s.bs.Read(ctx, &bytestream.ReadRequest{
		ResourceName: cas.Resource{InstanceName: s.opts.InstanceName, Digest: d}.String(),
	})
	if err != nil {
		return remoteErr(d, "ByteStream.Read", err)
	}
	w, err := s.local.NewWriter(d)
	if err != nil {
		return fmt.Errorf("cache blob %s: %w", d, err)
	}
	defer w.Abort()
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return remoteErr(d, "ByteStream.Read", err)
		}
		if _, err := w.Write(msg.Data); err != nil {
			return fmt.Errorf("cache blob %s: %w", d, err)
		}
	}
	if err := w.Commit(); err != nil {
		return fmt.Errorf("cache blob %s fetched from the remote CAS: %w", d, err)
	}
	return nil
}

// upload sends the locally stored d to the remote CAS unless it has it.
func (s *Store) upload(ctx context.Context, d cas.Digest) error {
	if d.IsEmpty() {
		return nil
	}
	missing, err := s.FindMissing(ctx, []cas.Digest{d})
	if err != nil {
		return err
	}
	if !slices.Contains(missing, d) {
		return nil
	}
	if d.Size <= s.opts.MaxBatchSize {
		data, err := cas.ReadAll(ctx, s.local, d)
		if err != nil {
			return fmt.Errorf("upload %s: %w", d, err)
		}
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
	return s.uploadStream(ctx, d)
}

func (s *Store) uploadStream(ctx context.Context, d cas.Digest) error {
	r, err := s.local.Get(ctx, d, 0)
	if err != nil {
		return fmt.Errorf("upload %s: %w", d, err)
	}
	defer r.Close()
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
			return fmt.Errorf("upload %s: read local copy: %w", d, rerr)
		}
		last := off+int64(n) >= d.Size
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
			return fmt.Errorf("upload %s: local copy ended at %d of %d bytes", d, off, d.Size)
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
