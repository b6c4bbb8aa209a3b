package cas

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/zstd"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// readChunk is the size of ByteStream read responses: large enough for
// throughput, well under clients' 4 MiB default message limit.
const readChunk = 1 << 20

// BlobWriter is an upload in progress; see Uploader.
type BlobWriter interface {
	io.Writer
	Written() int64
	Commit() error
	Abort()
}

// Uploader is implemented by stores that can keep an upload open across
// ByteStream streams, which makes uploads resumable.
type Uploader interface {
	NewWriter(d Digest) (BlobWriter, error)
}

// ByteStream returns the ByteStream service over the same store.
func (s *Service) ByteStream() bspb.ByteStreamServer { return &byteStream{s} }

type byteStream struct{ *Service }

// Read implements ByteStream.Read.
func (b *byteStream) Read(req *bspb.ReadRequest, stream bspb.ByteStream_ReadServer) error {
	res, err := ParseReadResource(req.ResourceName)
	if err != nil {
		return ToStatus(err)
	}
	if err := validateRead(res, req.ReadOffset, req.ReadLimit); err != nil {
		return err
	}
	r, err := b.store.Get(stream.Context(), res.Digest, req.ReadOffset)
	if err != nil {
		return ToStatus(err)
	}
	defer r.Close()
	remaining := res.Digest.Size - req.ReadOffset
	if req.ReadLimit > 0 && req.ReadLimit < remaining {
		remaining = req.ReadLimit
	}
	src := io.LimitReader(r, remaining)
	var sent int64
	defer func() { b.stats.add(0, sent) }()
	if res.Compression == Zstd {
		pr, pw := io.Pipe()
		plain := src // src is replaced by the compressed stream below
		go func() {
			enc, err := zstd.NewWriter(pw, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
			if err == nil {
				_, err = io.Copy(enc, plain)
				if cerr := enc.Close(); err == nil {
					err = cerr
				}
			}
			pw.CloseWithError(err)
		}()
		defer pr.Close()
		src = pr
	}
	buf := make([]byte, min(remaining+1, readChunk))
	if res.Compression == Zstd {
		buf = make([]byte, readChunk)
	}
	for {
		n, err := io.ReadFull(src, buf)
		if err != nil && err != io.EOF && err != io.ErrUnexpectedEOF {
			// Nothing more of a blob that failed to read (or to verify).
			if errors.Is(err, ErrCorrupt) {
				return ToStatus(err) // names the blob already
			}
			return ToStatus(fmt.Errorf("read blob %s: %w", res.Digest, err))
		}
		if rv, ok := r.(RestVerifier); ok && res.Compression == Identity && (err != nil || sent+int64(n) >= remaining) {
			// A read that stops before the end (read_limit) still checks
			// the whole blob before its last bytes go out. (Compressed
			// reads have no limit: the encoder reads, and so verifies,
			// up to the end.)
			if verr := rv.VerifyRest(); verr != nil {
				return ToStatus(verr)
			}
		}
		if n > 0 {
			if serr := stream.Send(&bspb.ReadResponse{Data: buf[:n]}); serr != nil {
				return serr
			}
			sent += int64(n)
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			break
		}
		if err != nil {
			return ToStatus(fmt.Errorf("read blob %s: %w", res.Digest, err))
		}
	}
	if res.Compression == Identity && sent != remaining {
		return status.Errorf(codes.DataLoss, "blob %s ended after %d of %d bytes", res.Digest, sent, remaining)
	}
	return nil
}

// upload is a resumable upload kept between streams.
type upload struct {
	mu        sync.Mutex // held by the stream currently writing
	w         BlobWriter
	digest    Digest
	touched   time.Time    // guarded by mu
	committed atomic.Int64 // bytes received, readable without mu
}

// uploads are the resumable uploads kept between streams, within limits
// on their number and on the sum of their blobs' sizes: each holds a temp
// file (whose bytes count against the store's size limit) and, while a
// stream writes it, buffers.
type uploads struct {
	mu        sync.Mutex
	m         map[string]*upload
	lastSweep time.Time
	maxCount  int
	maxBytes  int64
	bytes     int64 // sum of the digests' sizes of the uploads in m
}

// uploadTTL is how long an interrupted upload waits for its client to resume.
const uploadTTL = 10 * time.Minute

// Defaults for the limits on resumable uploads in progress (see
// ServiceOptions.MaxUploads). Bazel opens at most --remote_max_connections
// (100) streams at once; the byte limit bounds the disk abandoned uploads
// can take before they expire.
const (
	DefaultMaxUploads     = 1000
	DefaultMaxUploadBytes = 16 << 30
)

func newUploads() *uploads {
	return &uploads{m: make(map[string]*upload), maxCount: DefaultMaxUploads, maxBytes: DefaultMaxUploadBytes}
}

// errUploadLimit is returned when a new upload does not fit.
func (u *uploads) limitErr(d Digest) error {
	return status.Errorf(codes.ResourceExhausted, "upload of %s: the server has %d resumable uploads of %d bytes in all in progress; its limits are %d uploads (--max-uploads) and %d bytes (--max-upload-bytes); retry later", d, len(u.m), u.bytes, u.maxCount, u.maxBytes)
}

func (u *uploads) get(name string) *upload {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.m[name]
}

// put registers up (whose mutex the caller holds), dropping expired
// uploads now and then. When up does not fit the limits, the idle uploads
// touched longest ago are dropped (their clients start again, as after an
// expiry); if that is not enough, up is refused with RESOURCE_EXHAUSTED.
func (u *uploads) put(name string, up *upload) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	now := time.Now()
	if now.Sub(u.lastSweep) >= time.Minute {
		u.lastSweep = now
		u.dropIdleLocked(func(v *upload) bool { return now.Sub(v.touched) > uploadTTL }, 0, 0)
	}
	if len(u.m)+1 > u.maxCount || u.bytes+up.digest.Size > u.maxBytes {
		u.dropIdleLocked(nil, 1, up.digest.Size)
		if len(u.m)+1 > u.maxCount || u.bytes+up.digest.Size > u.maxBytes {
			return u.limitErr(up.digest)
		}
	}
	u.m[name] = up
	u.bytes += up.digest.Size
	return nil
}

// dropIdleLocked aborts uploads no stream is writing: those expired says
// are expired, or (expired nil) the least recently touched until n more
// uploads of size more bytes fit.
func (u *uploads) dropIdleLocked(expired func(*upload) bool, n int, size int64) {
	type idle struct {
		name string
		up   *upload
	}
	var cands []idle
	for k, v := range u.m {
		if !v.mu.TryLock() {
			continue // being written
		}
		if expired != nil {
			if expired(v) {
				v.w.Abort()
				u.deleteLocked(k)
			}
			v.mu.Unlock()
			continue
		}
		cands = append(cands, idle{k, v})
	}
	if expired != nil {
		return
	}
	slices.SortFunc(cands, func(a, b idle) int { return a.up.touched.Compare(b.up.touched) })
	for _, c := range cands {
		if len(u.m)+n <= u.maxCount && u.bytes+size <= u.maxBytes {
			c.up.mu.Unlock()
			continue
		}
		c.up.w.Abort()
		u.deleteLocked(c.name)
		c.up.mu.Unlock()
	}
}

func (u *uploads) deleteLocked(name string) {
	if up, ok := u.m[name]; ok {
		u.bytes -= up.digest.Size
		delete(u.m, name)
	}
}

func (u *uploads) remove(name string, up *upload) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.m[name] == up {
		u.deleteLocked(name)
	}
}

// setLimits changes the limits for uploads started from now on.
func (u *uploads) setLimits(count int, bytes int64) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if count > 0 {
		u.maxCount = count
	}
	if bytes > 0 {
		u.maxBytes = bytes
	}
}

func (u *uploads) closeAll() {
	u.mu.Lock()
	defer u.mu.Unlock()
	for k, v := range u.m {
		if v.mu.TryLock() {
			v.w.Abort()
			v.mu.Unlock()
		}
		u.deleteLocked(k)
	}
}

// Write implements ByteStream.Write with resumable uncompressed uploads.
func (b *byteStream) Write(stream bspb.ByteStream_WriteServer) error {
	ctx := stream.Context()
	req, err := stream.Recv()
	if err != nil {
		if err == io.EOF {
			return badRequest("resource_name", "the stream ended before the first request")
		}
		return err
	}
	name := req.ResourceName
	res, err := ParseWriteResource(name)
	if err != nil {
		return ToStatus(err)
	}
	d := res.Digest
	done := func() error {
		committed := d.Size
		if res.Compression != Identity {
			committed = -1
		}
		return stream.SendAndClose(&bspb.WriteResponse{CommittedSize: committed})
	}
	// Already stored: finish at once, whatever the client still sends.
	if b.stored(ctx, d) {
		if up := b.uploads.get(name); up != nil && up.mu.TryLock() {
			up.w.Abort()
			b.uploads.remove(name, up)
			up.mu.Unlock()
		}
		return done()
	}
	if res.Compression != Identity {
		if req.WriteOffset != 0 {
			return badRequest("write_offset", "compressed uploads cannot be resumed; start at offset 0")
		}
		return b.writeCompressed(stream, req, d)
	}

	up, fresh, err := b.startUpload(name, d, req.WriteOffset)
	if err != nil {
		return err
	}
	defer up.mu.Unlock()
	// Between streams an upload keeps only its temp file: no buffers, no
	// goroutine, no descriptor (a no-op once committed or aborted).
	if iw, ok := up.w.(interface{ Idle() error }); ok {
		defer iw.Idle()
	}
	if fresh && req.WriteOffset != 0 {
		up.w.Abort()
		b.uploads.remove(name, up)
		return badRequest("write_offset", fmt.Sprintf("%d, but nothing of %s has been received; start at 0 (QueryWriteStatus reports what was committed)", req.WriteOffset, name))
	}
	for {
		if req.WriteOffset != up.w.Written() {
			return badRequest("write_offset", fmt.Sprintf("%d does not continue the upload at %d bytes", req.WriteOffset, up.w.Written()))
		}
		if len(req.Data) > 0 {
			if _, err := up.w.Write(req.Data); err != nil {
				up.w.Abort()
				b.uploads.remove(name, up)
				return ToStatus(err)
			}
			b.stats.add(int64(len(req.Data)), 0)
			up.committed.Store(up.w.Written())
		}
		up.touched = time.Now()
		if req.FinishWrite {
			b.uploads.remove(name, up)
			if err := up.w.Commit(); err != nil {
				return ToStatus(err)
			}
			return done()
		}
		req, err = stream.Recv()
		if err == io.EOF {
			// The client half-closed without finish_write: keep the data
			// for a resume.
			return badRequest("finish_write", fmt.Sprintf("the stream ended at %d of %d bytes without finish_write; resume with write_offset %d", up.w.Written(), d.Size, up.w.Written()))
		}
		if err != nil {
			// Interrupted: the upload stays registered for a resume.
			return err
		}
		if req.ResourceName != "" && req.ResourceName != name {
			return badRequest("resource_name", fmt.Sprintf("changed mid-stream from %q to %q", name, req.ResourceName))
		}
	}
}

// startUpload returns the upload for name locked, creating it if needed.
func (b *byteStream) startUpload(name string, d Digest, offset int64) (*upload, bool, error) {
	if up := b.uploads.get(name); up != nil {
		if !up.mu.TryLock() {
			return nil, false, status.Errorf(codes.Aborted, "upload %s is being written by another stream", name)
		}
		if up.digest == d && offset != 0 {
			return up, false, nil
		}
		// A restart from zero (or a different blob under the same name)
		// replaces the old upload.
		up.w.Abort()
		b.uploads.remove(name, up)
		up.mu.Unlock()
	}
	w, err := b.newWriter(d)
	if err != nil {
		return nil, false, ToStatus(err)
	}
	up := &upload{w: w, digest: d, touched: time.Now()}
	up.mu.Lock()
	if err := b.uploads.put(name, up); err != nil {
		up.mu.Unlock()
		w.Abort()
		return nil, false, err
	}
	return up, true, nil
}

// stored reports whether an upload of d can be skipped: never on the
// strength of the index alone when the store can check its file.
func (b *byteStream) stored(ctx context.Context, d Digest) bool {
	if ds, ok := b.store.(interface{ Intact(Digest) bool }); ok {
		return ds.Intact(d)
	}
	missing, err := b.store.FindMissing(ctx, []Digest{d})
	return err == nil && len(missing) == 0
}

func (b *byteStream) newWriter(d Digest) (BlobWriter, error) {
	if u, ok := b.store.(Uploader); ok {
		return u.NewWriter(d)
	}
	return newPipeWriter(b.store, d), nil
}

// writeCompressed receives a zstd stream and stores what it decodes to.
// Compressed uploads are not resumable: a client that resumes one is told
// (by QueryWriteStatus) to start again at 0.
func (b *byteStream) writeCompressed(stream bspb.ByteStream_WriteServer, req *bspb.WriteRequest, d Digest) error {
	ctx := stream.Context()
	pr, pw := io.Pipe()
	result := make(chan error, 1)
	go func() {
		dec, err := zstd.NewReader(pr, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(uint64(d.Size)+64<<20))
		if err != nil {
			pr.CloseWithError(err)
			result <- err
			return
		}
		defer dec.Close()
		err = b.store.Put(ctx, d, decodeErrReader{io.LimitReader(dec, d.Size+1)})
		pr.CloseWithError(err)
		result <- err
	}()
	var offset = req.WriteOffset
	for {
		if len(req.Data) > 0 {
			if _, err := pw.Write(req.Data); err != nil {
				return ToStatus(<-result)
			}
			b.stats.add(int64(len(req.Data)), 0)
			offset += int64(len(req.Data))
		}
		if req.FinishWrite {
			pw.Close()
			if err := <-result; err != nil {
				return ToStatus(err)
			}
			// The client checks this against the compressed bytes it sent.
			return stream.SendAndClose(&bspb.WriteResponse{CommittedSize: offset})
		}
		var err error
		req, err = stream.Recv()
		if err != nil {
			pw.CloseWithError(errors.New("upload interrupted"))
			<-result
			if err == io.EOF {
				return badRequest("finish_write", "the stream ended without finish_write")
			}
			return err
		}
		if req.WriteOffset != offset {
			pw.CloseWithError(errors.New("bad offset"))
			<-result
			return badRequest("write_offset", fmt.Sprintf("%d does not continue the compressed upload at %d", req.WriteOffset, offset))
		}
	}
}

// QueryWriteStatus implements ByteStream.QueryWriteStatus.
func (b *byteStream) QueryWriteStatus(ctx context.Context, req *bspb.QueryWriteStatusRequest) (*bspb.QueryWriteStatusResponse, error) {
	res, err := ParseWriteResource(req.ResourceName)
	if err != nil {
		return nil, ToStatus(err)
	}
	if missing, err := b.store.FindMissing(ctx, []Digest{res.Digest}); err == nil && len(missing) == 0 {
		return &bspb.QueryWriteStatusResponse{CommittedSize: res.Digest.Size, Complete: true}, nil
	}
	if res.Compression == Identity {
		if up := b.uploads.get(req.ResourceName); up != nil && up.digest == res.Digest {
			return &bspb.QueryWriteStatusResponse{CommittedSize: up.committed.Load()}, nil
		}
	}
	// Unknown (never started, expired, lost in a restart, or compressed):
	// the bytestream API would say NOT_FOUND, but Bazel treats that as a
	// permanent failure of the upload, while committed_size 0 makes every
	// client simply start again.
	return &bspb.QueryWriteStatusResponse{CommittedSize: 0}, nil
}

// decodeErrReader marks errors reading the decoded stream (corrupt zstd
// data) as the client's fault.
type decodeErrReader struct{ r io.Reader }

func (r decodeErrReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if err != nil && err != io.EOF {
		err = fmt.Errorf("%w: decode zstd upload: %w", ErrDigestMismatch, err)
	}
	return n, err
}

// pipeWriter adapts a plain Store to BlobWriter; it cannot outlive a stream
// usefully but keeps the Write path uniform.
type pipeWriter struct {
	pw      *io.PipeWriter
	written int64
	result  chan error
}

func newPipeWriter(s Store, d Digest) *pipeWriter {
	pr, pw := io.Pipe()
	w := &pipeWriter{pw: pw, result: make(chan error, 1)}
	go func() {
		err := s.Put(context.Background(), d, pr)
		pr.CloseWithError(err)
		w.result <- err
	}()
	return w
}

func (w *pipeWriter) Write(p []byte) (int, error) {
	n, err := w.pw.Write(p)
	w.written += int64(n)
	return n, err
}
func (w *pipeWriter) Written() int64 { return w.written }
func (w *pipeWriter) Commit() error  { w.pw.Close(); return <-w.result }
func (w *pipeWriter) Abort() {
	if w.pw.CloseWithError(errors.New("upload aborted")) == nil {
		select {
		case <-w.result:
		default:
		}
	}
}
