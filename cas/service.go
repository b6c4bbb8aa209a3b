package cas

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"sync"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// DefaultMaxBatchSize is the max_batch_total_size_bytes advertised to
// clients; larger blobs go through ByteStream.
const DefaultMaxBatchSize = 4 << 20

// Service implements the REAPI ContentAddressableStorage and the ByteStream
// services over a Store.
type Service struct {
	repb.UnimplementedContentAddressableStorageServer
	store        Store
	maxBatchSize int64
	log          *slog.Logger
	uploads      *uploads
	stats        *Counters
	walks        treeWalks // GetTree walks a page token can resume
}

// Counters are cumulative byte counts, for metrics.
type Counters struct {
	mu       sync.Mutex
	BytesIn  int64
	BytesOut int64
}

func (c *Counters) add(in, out int64) {
	c.mu.Lock()
	c.BytesIn += in
	c.BytesOut += out
	c.mu.Unlock()
}

// Snapshot returns the current counts.
func (c *Counters) Snapshot() (in, out int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.BytesIn, c.BytesOut
}

// ServiceOptions configure a Service; a zero field is its default.
type ServiceOptions struct {
	// MaxBatchSize is the advertised limit of batch requests
	// (DefaultMaxBatchSize when <= 0).
	MaxBatchSize int64
	// Logger receives structured logs (default slog.Default()).
	Logger *slog.Logger
	// MaxUploads and MaxUploadBytes bound the resumable uploads kept in
	// progress: at most MaxUploads of them, for blobs of at most
	// MaxUploadBytes in all (DefaultMaxUploads and DefaultMaxUploadBytes
	// when <= 0). Beyond them the idle uploads touched longest ago are
	// dropped, then new uploads are refused with RESOURCE_EXHAUSTED.
	MaxUploads     int
	MaxUploadBytes int64
}

// NewService serves store.
func NewService(store Store, o ServiceOptions) *Service {
	if o.MaxBatchSize <= 0 {
		o.MaxBatchSize = DefaultMaxBatchSize
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	s := &Service{store: store, maxBatchSize: o.MaxBatchSize, log: o.Logger, uploads: newUploads(), stats: &Counters{}}
	s.uploads.setLimits(o.MaxUploads, o.MaxUploadBytes)
	return s
}

// MaxBatchSize is the advertised batch limit.
func (s *Service) MaxBatchSize() int64 { return s.maxBatchSize }

// Counters returns the service's byte counters.
func (s *Service) Counters() *Counters { return s.stats }

// Close releases unfinished resumable uploads.
func (s *Service) Close() { s.uploads.closeAll() }

var zstdEncoder, _ = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))

// CheckDigestFunction accepts the digest functions this server implements.
func CheckDigestFunction(f repb.DigestFunction_Value) error {
	if f == repb.DigestFunction_UNKNOWN || f == repb.DigestFunction_SHA256 {
		return nil
	}
	return status.Errorf(codes.InvalidArgument, "digest function %s is not supported; this server only supports SHA256", f)
}

// ToStatus translates a store error into a gRPC status; the one place the
// CAS services do so.
func ToStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	switch {
	case errors.Is(err, ErrCorrupt): // before ErrNotFound, which it also wraps
		return status.Error(codes.DataLoss, err.Error())
	case errors.Is(err, ErrNotFound):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, ErrDigestMismatch), errors.Is(err, ErrInvalidDigest), errors.Is(err, ErrInvalidResource):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, ErrNoSpace):
		return status.Error(codes.ResourceExhausted, err.Error())
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}

func protoStatus(err error) *rpcstatus.Status {
	if err == nil {
		return &rpcstatus.Status{}
	}
	return status.Convert(ToStatus(err)).Proto()
}

func badRequest(field, desc string) error {
	st := status.New(codes.InvalidArgument, field+": "+desc)
	if d, err := st.WithDetails(&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: field, Description: desc}}}); err == nil {
		return d.Err()
	}
	return st.Err()
}

// FindMissingBlobs implements the REAPI method.
func (s *Service) FindMissingBlobs(ctx context.Context, req *repb.FindMissingBlobsRequest) (*repb.FindMissingBlobsResponse, error) {
	if err := CheckDigestFunction(req.DigestFunction); err != nil {
		return nil, err
	}
	ds := make([]Digest, 0, len(req.BlobDigests))
	for i, pd := range req.BlobDigests {
		d, err := FromProto(pd)
		if err != nil {
			return nil, badRequest(fmt.Sprintf("blob_digests[%d]", i), err.Error())
		}
		ds = append(ds, d)
	}
	missing, err := s.store.FindMissing(ctx, ds)
	if err != nil {
		return nil, ToStatus(err)
	}
	// Answer with the request's own messages: the store returns the
	// missing digests in request order, so one pass pairs them up.
	resp := &repb.FindMissingBlobsResponse{MissingBlobDigests: make([]*repb.Digest, len(missing))}
	j := 0
	for i, d := range missing {
		for j < len(ds) && ds[j] != d {
			j++
		}
		if j < len(ds) {
			resp.MissingBlobDigests[i] = req.BlobDigests[j]
			j++
		} else {
			resp.MissingBlobDigests[i] = d.Proto()
		}
	}
	return resp, nil
}

// maxBatchEntry bounds the uncompressed size of one compressed blob in a
// batch (the buffer it is decoded into); batchFlushBytes is how much decoded
// data a batch holds in memory before it is written out.
const (
	maxBatchEntry   = 64 << 20
	batchFlushBytes = 16 << 20
)

// BatchUpdateBlobs implements the REAPI method.
func (s *Service) BatchUpdateBlobs(ctx context.Context, req *repb.BatchUpdateBlobsRequest) (*repb.BatchUpdateBlobsResponse, error) {
	if err := CheckDigestFunction(req.DigestFunction); err != nil {
		return nil, err
	}
	var total int64
	for _, r := range req.Requests {
		total += int64(len(r.Data))
	}
	if total > s.maxBatchSize {
		return nil, badRequest("requests", fmt.Sprintf("batch carries %d bytes, over the limit of %d bytes (max_batch_total_size_bytes); upload large blobs with ByteStream.Write", total, s.maxBatchSize))
	}
	resp := &repb.BatchUpdateBlobsResponse{Responses: make([]*repb.BatchUpdateBlobsResponse_Response, len(req.Requests))}
	var (
		blobs   []Blob
		idx     []int
		pending int64
		in      int64
	)
	flush := func() {
		for k, err := range putMany(ctx, s.store, blobs) {
			resp.Responses[idx[k]].Status = protoStatus(err)
			if err == nil {
				in += blobs[k].Digest.Size
			}
		}
		blobs, idx, pending = blobs[:0], idx[:0], 0
	}
	for i, r := range req.Requests {
		out := &repb.BatchUpdateBlobsResponse_Response{Digest: r.Digest}
		resp.Responses[i] = out
		d, err := FromProto(r.Digest)
		if err != nil {
			out.Status = protoStatus(err)
			continue
		}
		data := r.Data
		switch r.Compressor {
		case repb.Compressor_IDENTITY:
		case repb.Compressor_ZSTD:
			if d.Size > maxBatchEntry {
				out.Status = protoStatus(fmt.Errorf("%w: blob %s is too large to decompress in a batch (limit %d bytes); upload it with ByteStream.Write", ErrInvalidDigest, d, int64(maxBatchEntry)))
				continue
			}
			data, err = decodeBatchEntry(r.Data, d.Size)
			if err != nil {
				out.Status = protoStatus(fmt.Errorf("%w: decompress zstd data for %s: %v", ErrDigestMismatch, d, err))
				continue
			}
		default:
			out.Status = status.Convert(status.Errorf(codes.InvalidArgument, "compressor %s is not supported (supported: IDENTITY, ZSTD)", r.Compressor)).Proto()
			continue
		}
		if int64(len(data)) != d.Size {
			out.Status = protoStatus(fmt.Errorf("blob %s: got %d bytes: %w", d, len(data), ErrDigestMismatch))
			continue
		}
		blobs = append(blobs, Blob{Digest: d, Data: data})
		idx = append(idx, i)
		if pending += d.Size; pending >= batchFlushBytes {
			flush()
		}
	}
	flush()
	s.stats.add(in, 0)
	return resp, nil
}

// batchDecoders are streaming zstd decoders for batch entries, reused.
var batchDecoders = sync.Pool{New: func() any {
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true), zstd.WithDecoderMaxMemory(maxBatchEntry))
	if err != nil {
		return err
	}
	return dec
}}

// decodeBatchEntry decodes one zstd batch entry of at most size bytes
// (more is an error). The buffer grows with the data actually decoded: an
// entry that declares 64 MiB and decodes to 10 bytes costs 10 bytes, not
// a 64 MiB allocation made before decoding.
func decodeBatchEntry(compressed []byte, size int64) ([]byte, error) {
	v := batchDecoders.Get()
	dec, ok := v.(*zstd.Decoder)
	if !ok {
		return nil, v.(error)
	}
	defer batchDecoders.Put(dec)
	if err := dec.Reset(bytes.NewReader(compressed)); err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	// Start small; bytes.Buffer doubles as the data arrives.
	buf.Grow(int(min(size+1, 64<<10)))
	_, err := buf.ReadFrom(io.LimitReader(dec, size+1))
	// Drop the reference to the caller's data before pooling.
	dec.Reset(bytes.NewReader(nil))
	if err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// putMany stores blobs, in one batch when the store can.
func putMany(ctx context.Context, st Store, blobs []Blob) []error {
	if len(blobs) == 0 {
		return nil
	}
	if bp, ok := st.(BatchPutter); ok {
		return bp.PutBatch(ctx, blobs)
	}
	errs := make([]error, len(blobs))
	for i, b := range blobs {
		errs[i] = putBytes(ctx, st, b.Digest, b.Data)
	}
	return errs
}

// putBytes stores a small blob, skipping it when already present.
func putBytes(ctx context.Context, st Store, d Digest, data []byte) error {
	if got := DigestOf(data); got != d {
		return fmt.Errorf("blob %s: data hashes to %s: %w", d, got.Hash, ErrDigestMismatch)
	}
	if missing, err := st.FindMissing(ctx, []Digest{d}); err == nil && len(missing) == 0 {
		return nil
	}
	return st.Put(ctx, d, bytes.NewReader(data))
}

// BatchReadBlobs implements the REAPI method.
func (s *Service) BatchReadBlobs(ctx context.Context, req *repb.BatchReadBlobsRequest) (*repb.BatchReadBlobsResponse, error) {
	if err := CheckDigestFunction(req.DigestFunction); err != nil {
		return nil, err
	}
	ds := make([]Digest, len(req.Digests))
	var total int64
	for i, pd := range req.Digests {
		d, err := FromProto(pd)
		if err != nil {
			return nil, badRequest(fmt.Sprintf("digests[%d]", i), err.Error())
		}
		ds[i] = d
		if d.Size > s.maxBatchSize-total {
			total = s.maxBatchSize + 1 // and no overflow
			break
		}
		total += d.Size
	}
	if total > s.maxBatchSize {
		return nil, badRequest("digests", fmt.Sprintf("blobs total %d bytes, over the limit of %d bytes (max_batch_total_size_bytes); read large blobs with ByteStream.Read", total, s.maxBatchSize))
	}
	useZstd := false
	for _, c := range req.AcceptableCompressors {
		if c == repb.Compressor_ZSTD {
			useZstd = true
		}
	}
	resp := &repb.BatchReadBlobsResponse{Responses: make([]*repb.BatchReadBlobsResponse_Response, len(ds))}
	var out int64
	for i, d := range ds {
		r := &repb.BatchReadBlobsResponse_Response{Digest: req.Digests[i]}
		resp.Responses[i] = r
		data, err := ReadAll(ctx, s.store, d)
		if err != nil {
			r.Status = protoStatus(err)
			continue
		}
		out += int64(len(data))
		if useZstd && len(data) > 0 {
			r.Data = zstdEncoder.EncodeAll(data, nil)
			r.Compressor = repb.Compressor_ZSTD
		} else {
			r.Data = data
		}
		r.Status = &rpcstatus.Status{}
	}
	s.stats.add(0, out)
	return resp, nil
}

// maxTreePageBytes keeps each GetTree response under the 4 MiB default
// message limit of gRPC clients; maxDirectorySize bounds what GetTree
// reads into memory for one Directory.
const (
	maxTreePageBytes = 3 << 20
	maxDirectorySize = 16 << 20
	treePageToken    = "offset:"
)

// GetTree implements the REAPI method: the directories below root_digest in
// breadth-first order, streamed in pages of at most page_size directories;
// every page but the last carries a next_page_token from which a new
// request resumes. Parts of the tree that are missing are left out, as the
// API allows; a missing root is NOT_FOUND.
func (s *Service) GetTree(req *repb.GetTreeRequest, stream repb.ContentAddressableStorage_GetTreeServer) error {
	ctx := stream.Context()
	if err := CheckDigestFunction(req.DigestFunction); err != nil {
		return err
	}
	root, err := FromProto(req.RootDigest)
	if err != nil {
		return badRequest("root_digest", err.Error())
	}
	if req.PageSize < 0 {
		return badRequest("page_size", "must not be negative")
	}
	start := 0
	if req.PageToken != "" {
		n, err := strconv.Atoi(strings.TrimPrefix(req.PageToken, treePageToken))
		if err != nil || n < 0 || !strings.HasPrefix(req.PageToken, treePageToken) {
			return badRequest("page_token", fmt.Sprintf("%q is not a token this server issued", truncate(req.PageToken)))
		}
		start = n
	}
	pageSize := int(req.PageSize)
	if pageSize == 0 || pageSize > 10000 {
		pageSize = 10000
	}
	// Walk breadth first; directories already seen are listed once. A
	// page token is a position in the walk's order; a walk kept from an
	// earlier request resumes there without reading what came before.
	walk := s.walks.resume(root, start)
	if walk == nil {
		walk = &treeWalk{root: root, order: []Digest{root}}
	}
	seen := make(map[Digest]bool, len(walk.order))
	for _, d := range walk.order {
		seen[d] = true
	}
	idx := 0
	if start <= walk.read {
		idx = start
	}
	paged := false
	defer func() {
		if paged {
			s.walks.keep(walk)
		}
	}()
	var page []*repb.Directory
	var pageBytes int
	for ; idx < len(walk.order); idx++ {
		d := walk.order[idx]
		if d.Size > maxDirectorySize {
			return status.Errorf(codes.InvalidArgument, "directory %s is larger than %d bytes; it cannot be a Directory message this server serves", d, maxDirectorySize)
		}
		data, err := ReadAll(ctx, s.store, d)
		if err != nil {
			if errors.Is(err, ErrNotFound) {
				if d == root {
					return status.Errorf(codes.NotFound, "root directory %s is not in the CAS", d)
				}
				walk.read = max(walk.read, idx+1)
				continue
			}
			return ToStatus(err)
		}
		dir := &repb.Directory{}
		if err := proto.Unmarshal(data, dir); err != nil {
			return status.Errorf(codes.InvalidArgument, "blob %s is not a Directory message: %v", d, err)
		}
		for _, sub := range dir.Directories {
			sd, err := FromProto(sub.Digest)
			if err != nil {
				return status.Errorf(codes.InvalidArgument, "directory %s entry %q: %v", d, sub.Name, err)
			}
			if !seen[sd] {
				seen[sd] = true
				walk.order = append(walk.order, sd)
			}
		}
		walk.read = max(walk.read, idx+1)
		if idx >= start {
			if len(page) > 0 && (len(page) >= pageSize || pageBytes+len(data) > maxTreePageBytes) {
				paged = true
				if err := stream.Send(&repb.GetTreeResponse{Directories: page, NextPageToken: treePageToken + strconv.Itoa(idx)}); err != nil {
					return err
				}
				page, pageBytes = nil, 0
			}
			page = append(page, dir)
			pageBytes += len(data) + 8
		}
	}
	return stream.Send(&repb.GetTreeResponse{Directories: page})
}

// ValidateRead rejects nonsensical ByteStream read arguments.
func validateRead(res Resource, offset, limit int64) error {
	if offset < 0 {
		return badRequest("read_offset", fmt.Sprintf("%d is negative", offset))
	}
	if limit < 0 {
		return badRequest("read_limit", fmt.Sprintf("%d is negative", limit))
	}
	if offset > res.Digest.Size {
		return status.Errorf(codes.OutOfRange, "read_offset %d is past the end of blob %s", offset, res.Digest)
	}
	if res.Compression != Identity && limit != 0 {
		return badRequest("read_limit", "must be zero for compressed-blobs reads")
	}
	return nil
}
