package actiond_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/actioncache"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/actiondtest"
	"github.com/actiond/actiond/internal/grpctest"
	"github.com/actiond/actiond/internal/testutil"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	"google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

var bg = context.Background()

// clients are the generated clients on one connection.
type clients struct {
	conn   *grpc.ClientConn
	cas    repb.ContentAddressableStorageClient
	bs     bytestream.ByteStreamClient
	ac     repb.ActionCacheClient
	caps   repb.CapabilitiesClient
	health healthpb.HealthClient
}

func newClients(conn *grpc.ClientConn) *clients {
	return &clients{
		conn:   conn,
		cas:    repb.NewContentAddressableStorageClient(conn),
		bs:     bytestream.NewByteStreamClient(conn),
		ac:     repb.NewActionCacheClient(conn),
		caps:   repb.NewCapabilitiesClient(conn),
		health: healthpb.NewHealthClient(conn),
	}
}

func quiet() *slog.Logger { return actiondtest.Quiet() }

// inProcess serves a fresh actiond.Server over bufconn; Cleanup stops it.
func inProcess(t *testing.T, opts actiond.Options) (*actiond.Server, *clients) {
	t.Helper()
	srv, conn, _ := actiondtest.Bufconn(t, opts, grpctest.BufSize)
	return srv, newClients(conn)
}

// restartable is inProcess with a stop function, for a restart on the same
// root (Cleanup stops it otherwise, once).
func restartable(t *testing.T, opts actiond.Options) (func(), *clients) {
	t.Helper()
	_, conn, stop := actiondtest.Bufconn(t, opts, grpctest.BufSize)
	return stop, newClients(conn)
}

func blobData(seed, n int) []byte { return testutil.Data(seed, n) }

func writeBlob(ctx context.Context, c *clients, name string, data []byte, chunk int, pause time.Duration) (*bytestream.WriteResponse, error) {
	return actiondtest.WriteBlob(ctx, c.bs, name, data, chunk, pause)
}

func readBlob(ctx context.Context, c *clients, d cas.Digest) ([]byte, error) {
	return actiondtest.ReadBlob(ctx, c.bs, "blobs/"+d.String(), 0, 0)
}

func TestCapabilities(t *testing.T) {
	_, c := inProcess(t, actiond.Options{})
	caps, err := c.caps.GetCapabilities(bg, &repb.GetCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	cc := caps.CacheCapabilities
	if len(cc.GetDigestFunctions()) != 1 || cc.DigestFunctions[0] != repb.DigestFunction_SHA256 {
		t.Errorf("digest functions %v", cc.GetDigestFunctions())
	}
	if cc.MaxBatchTotalSizeBytes != cas.DefaultMaxBatchSize {
		t.Errorf("max batch size %d", cc.MaxBatchTotalSizeBytes)
	}
	hasZstd := func(cs []repb.Compressor_Value) bool {
		for _, c := range cs {
			if c == repb.Compressor_ZSTD {
				return true
			}
		}
		return false
	}
	if !hasZstd(cc.SupportedCompressors) || !hasZstd(cc.SupportedBatchUpdateCompressors) {
		t.Errorf("compressors %v / %v", cc.SupportedCompressors, cc.SupportedBatchUpdateCompressors)
	}
	if cc.SymlinkAbsolutePathStrategy == repb.SymlinkAbsolutePathStrategy_UNKNOWN {
		t.Error("no symlink strategy")
	}
	if !cc.GetActionCacheUpdateCapabilities().GetUpdateEnabled() {
		t.Error("action cache updates disabled")
	}
	// No sandbox configured: no execution.
	if caps.GetExecutionCapabilities().GetExecEnabled() {
		t.Error("exec_enabled without an executor")
	}
	if lo, hi := caps.LowApiVersion, caps.HighApiVersion; lo.GetMajor() != 2 || lo.GetMinor() != 0 || hi.GetMajor() != 2 || hi.GetMinor() < lo.GetMinor() {
		t.Errorf("API versions %v..%v", lo, hi)
	}
}

func TestHealth(t *testing.T) {
	_, c := inProcess(t, actiond.Options{})
	resp, err := c.health.Check(bg, &healthpb.HealthCheckRequest{})
	if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health = %v, %v", resp, err)
	}
	_, err = c.health.Check(bg, &healthpb.HealthCheckRequest{Service: "no.such.Service"})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("health of an unknown service = %v", err)
	}
}

// TestServeLoopback runs Serve on a real TCP listener, uses it, and stops
// it gracefully while an upload is in flight.
func TestServeLoopback(t *testing.T) {
	srv, err := actiond.New(actiond.Options{Root: t.TempDir(), Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := newClients(conn)
	if resp, err := c.health.Check(bg, &healthpb.HealthCheckRequest{}); err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health = %v, %v", resp, err)
	}
	data := blobData(1, 3<<20)
	d := cas.DigestOf(data)
	if _, err := writeBlob(bg, c, "uploads/1/blobs/"+d.String(), data, 1<<20, 0); err != nil {
		t.Fatal(err)
	}
	if got, err := readBlob(bg, c, d); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v", err)
	}
	// A graceful stop lets the running upload finish.
	data2 := blobData(2, 2<<20)
	d2 := cas.DigestOf(data2)
	done := make(chan error, 1)
	go func() {
		_, err := writeBlob(bg, c, "uploads/2/blobs/"+d2.String(), data2, 256<<10, 20*time.Millisecond)
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	ctx, cancel := context.WithTimeout(bg, 10*time.Second)
	defer cancel()
	srv.Stop(ctx)
	if err := <-done; err != nil {
		t.Fatalf("upload during graceful stop: %v", err)
	}
	if err := <-errc; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		t.Fatalf("Serve = %v", err)
	}
	if m, _ := srv.Store.FindMissing(bg, []cas.Digest{d2}); len(m) != 0 {
		t.Fatal("upload finished during the stop is missing")
	}
}

// buildActiond builds the command once per test binary.
var buildOnce struct {
	sync.Once
	path string
	err  error
	out  []byte
}

func buildActiond(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "actiond-bin-")
		if err != nil {
			buildOnce.err = err
			return
		}
		buildOnce.path = filepath.Join(dir, "actiond")
		cmd := exec.Command("go", "build", "-o", buildOnce.path, "./cmd/actiond")
		buildOnce.out, buildOnce.err = cmd.CombinedOutput()
	})
	if buildOnce.err != nil {
		t.Fatalf("go build ./cmd/actiond: %v\n%s", buildOnce.err, buildOnce.out)
	}
	return buildOnce.path
}

func TestMain(m *testing.M) {
	code := m.Run()
	if buildOnce.path != "" {
		os.RemoveAll(filepath.Dir(buildOnce.path))
	}
	os.Exit(code)
}

type process struct {
	cmd    *exec.Cmd
	stderr *bytes.Buffer
	c      *clients
}

// startActiond runs `actiond serve` on root and waits until it is healthy.
func startActiond(t *testing.T, bin, root string) *process {
	t.Helper()
	addr := freeAddr(t)
	p := &process{stderr: &bytes.Buffer{}}
	// --no-exec: this is about storage; execution would mount runtimes.
	p.cmd = exec.Command(bin, "serve", "--listen", addr, "--root", root, "--log-level", "warn", "--no-exec")
	p.cmd.Stderr = p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		p.cmd.Wait()
	})
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	p.c = newClients(conn)
	waitHealthy(t, p.c, p.stderr)
	return p
}

// freeAddr returns a loopback address with a port nothing listens on.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// waitHealthy waits until the server behind c reports SERVING; log is the
// server's output, shown if it never does.
func waitHealthy(t *testing.T, c *clients, log fmt.Stringer) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(bg, time.Second)
		resp, err := c.health.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
		cancel()
		if err == nil && resp.Status == healthpb.HealthCheckResponse_SERVING {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("actiond did not become healthy: %v\n%s", err, log)
		}
	}
}

// openTempFiles counts the files under dir that process pid has open,
// named or unnamed ("dir/#123 (deleted)").
func openTempFiles(t *testing.T, pid int, dir string) int {
	t.Helper()
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, fd := range fds {
		if target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name())); err == nil && strings.HasPrefix(target, dir+"/") {
			n++
		}
	}
	return n
}

// TestKill9DuringUploads kills the server with SIGKILL while small batches,
// large chunked ByteStream uploads, compressed uploads and an unfinished
// resumable upload are in flight, restarts it on the same root, and checks
// that every blob it reports present reads back with the right hash, that
// every upload it acknowledged survived, and that tmp/ was cleaned up.
func TestKill9DuringUploads(t *testing.T) {
	testutil.SkipIfShort(t, "builds and runs the actiond binary")
	bin := buildActiond(t)
	root := t.TempDir()
	p := startActiond(t, bin, root)

	var (
		mu        sync.Mutex
		attempted = map[cas.Digest]bool{}
		acked     = map[cas.Digest]bool{}
		sent      atomic.Int64
		batches   atomic.Int64
	)
	try := func(d cas.Digest) { mu.Lock(); attempted[d] = true; mu.Unlock() }
	ack := func(d cas.Digest) { mu.Lock(); acked[d] = true; mu.Unlock() }
	ctx, cancel := context.WithCancel(bg)
	defer cancel()
	var wg sync.WaitGroup

	// Large blobs in many chunks, throttled so some are mid-way at the kill.
	for g := 0; g < 3; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ctx.Err() == nil; i++ {
				data := blobData(1000+g*100+i, 16<<20+g)
				d := cas.DigestOf(data)
				try(d)
				st, err := p.c.bs.Write(ctx)
				if err != nil {
					return
				}
				const chunk = 256 << 10
				for off := 0; off < len(data); off += chunk {
					req := &bytestream.WriteRequest{WriteOffset: int64(off), Data: data[off : off+min(chunk, len(data)-off)], FinishWrite: off+chunk >= len(data)}
					if off == 0 {
						req.ResourceName = fmt.Sprintf("uploads/big-%d-%d/blobs/%s", g, i, d)
					}
					if st.Send(req) != nil {
						return
					}
					sent.Add(int64(len(req.Data)))
					time.Sleep(2 * time.Millisecond)
				}
				if resp, err := st.CloseAndRecv(); err == nil && resp.CommittedSize == d.Size {
					ack(d)
				} else {
					return
				}
			}
		}()
	}
	// Small blobs in batches.
	for g := 0; g < 2; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ctx.Err() == nil; i++ {
				req := &repb.BatchUpdateBlobsRequest{}
				var ds []cas.Digest
				for j := 0; j < 100; j++ {
					data := blobData(1<<20+g<<16+i*100+j, 500+j*20)
					d := cas.DigestOf(data)
					try(d)
					ds = append(ds, d)
					req.Requests = append(req.Requests, &repb.BatchUpdateBlobsRequest_Request{Digest: d.Proto(), Data: data})
				}
				resp, err := p.c.cas.BatchUpdateBlobs(ctx, req)
				if err != nil {
					return
				}
				for k, r := range resp.Responses {
					if r.Status.GetCode() == 0 {
						ack(ds[k])
					}
				}
				batches.Add(1)
			}
		}()
	}
	// Compressed uploads.
	wg.Add(1)
	go func() {
		defer wg.Done()
		enc, _ := zstd.NewWriter(nil)
		for i := 0; ctx.Err() == nil; i++ {
			data := append(blobData(5000+i, 1<<20), bytes.Repeat([]byte{byte(i)}, 1<<20)...)
			d := cas.DigestOf(data)
			try(d)
			if _, err := writeBlob(ctx, p.c, fmt.Sprintf("uploads/z-%d/compressed-blobs/zstd/%s", i, d), enc.EncodeAll(data, nil), 64<<10, time.Millisecond); err != nil {
				return
			}
			ack(d)
		}
	}()
	// An upload that stops half way and waits to be resumed.
	half := blobData(9999, 4<<20)
	hd := cas.DigestOf(half)
	try(hd)
	hst, err := p.c.bs.Write(ctx)
	if err != nil {
		t.Fatal(err)
	}
	hst.Send(&bytestream.WriteRequest{ResourceName: "uploads/half/blobs/" + hd.String(), Data: half[:2<<20]})

	// Kill once large uploads are well under way and batches have landed.
	for deadline := time.Now().Add(60 * time.Second); sent.Load() < 40<<20 || batches.Load() < 5; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("uploads too slow: %d bytes, %d batches\n%s", sent.Load(), batches.Load(), p.stderr)
		}
	}
	// Uploads write to temp files, unnamed (O_TMPFILE) where the file
	// system allows: count those the server holds open at the kill.
	tmp := filepath.Join(root, "cas", "tmp")
	open := openTempFiles(t, p.cmd.Process.Pid, tmp)
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	p.cmd.Wait()
	cancel()
	wg.Wait()
	left, _ := os.ReadDir(tmp)
	if open == 0 && len(left) == 0 {
		t.Fatal("no upload was in flight at the kill; the test did not test anything")
	}
	t.Logf("at the kill: %d temp files open, %d named in tmp/", open, len(left))

	p2 := startActiond(t, bin, root)
	if left, err := os.ReadDir(tmp); err != nil || len(left) != 0 {
		t.Fatalf("after restart tmp/ holds %d files (%v)", len(left), err)
	}
	var all []*repb.Digest
	for d := range attempted {
		all = append(all, d.Proto())
	}
	resp, err := p2.c.cas.FindMissingBlobs(bg, &repb.FindMissingBlobsRequest{BlobDigests: all})
	if err != nil {
		t.Fatal(err)
	}
	missing := map[cas.Digest]bool{}
	for _, pd := range resp.MissingBlobDigests {
		missing[cas.Digest{Hash: pd.Hash, Size: pd.SizeBytes}] = true
	}
	var present, interrupted int
	for d := range attempted {
		if missing[d] {
			if acked[d] {
				t.Errorf("acknowledged blob %s lost", d)
			}
			interrupted++
			continue
		}
		present++
		got, err := readBlob(bg, p2.c, d)
		if err != nil {
			t.Errorf("read %s: %v", d, err)
			continue
		}
		if cas.DigestOf(got) != d {
			t.Errorf("blob %s reads back as %s", d, cas.DigestOf(got))
		}
	}
	if !missing[hd] {
		t.Error("the half-finished upload is present")
	}
	// Nothing but blobs in the shards.
	filepath.WalkDir(filepath.Join(root, "cas", "sha256"), func(p string, de os.DirEntry, err error) error {
		if err == nil && !de.IsDir() {
			if _, err := cas.NewDigest(de.Name(), 0); err != nil {
				t.Errorf("stray file %s", p)
			}
		}
		return nil
	})
	// The resumed upload restarts cleanly after the restart.
	qs, err := p2.c.bs.QueryWriteStatus(bg, &bytestream.QueryWriteStatusRequest{ResourceName: "uploads/half/blobs/" + hd.String()})
	if err != nil || qs.CommittedSize != 0 || qs.Complete {
		t.Fatalf("QueryWriteStatus after restart = %v, %v", qs, err)
	}
	if _, err := writeBlob(bg, p2.c, "uploads/half/blobs/"+hd.String(), half, 1<<20, 0); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d blobs attempted, %d acknowledged, %d present after restart, %d interrupted; %d temp files open and %d named at the kill",
		len(attempted), len(acked), present, interrupted, open, len(left))
	if interrupted == 0 {
		t.Error("no upload was interrupted")
	}
}

// TestFullDisk runs the server on an 8 MiB tmpfs, fills it, and checks that
// writes fail with RESOURCE_EXHAUSTED (storing nothing) while reads, lookups
// and the action cache keep working.
func TestFullDisk(t *testing.T) {
	testutil.RequireRoot(t)
	root := t.TempDir()
	if err := syscall.Mount("tmpfs", root, "tmpfs", 0, "size=8m"); err != nil {
		testutil.Require(t, false, fmt.Sprintf("mount tmpfs: %v", err))
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(root, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", root, err)
		}
	})
	srv, c := inProcess(t, actiond.Options{Root: root})

	// Some blobs and an action result before the disk fills.
	early := [][]byte{blobData(1, 1000), blobData(2, 300<<10)}
	var earlyDs []cas.Digest
	req := &repb.BatchUpdateBlobsRequest{}
	for _, b := range early {
		d := cas.DigestOf(b)
		earlyDs = append(earlyDs, d)
		req.Requests = append(req.Requests, &repb.BatchUpdateBlobsRequest_Request{Digest: d.Proto(), Data: b})
	}
	if resp, err := c.cas.BatchUpdateBlobs(bg, req); err != nil || resp.Responses[1].Status.GetCode() != 0 {
		t.Fatalf("early upload: %v %v", resp, err)
	}
	action := cas.DigestOf([]byte("action")).Proto()
	result := &repb.ActionResult{OutputFiles: []*repb.OutputFile{{Path: "o", Digest: earlyDs[0].Proto()}}}
	if _, err := c.ac.UpdateActionResult(bg, &repb.UpdateActionResultRequest{ActionDigest: action, ActionResult: result}); err != nil {
		t.Fatal(err)
	}

	// Fill it with ByteStream writes until one is refused.
	var err error
	var failed cas.Digest
	for i := 0; i < 20; i++ {
		// 3 MiB uploads are pipelined (the file is written by another
		// goroutine), 1 MiB ones are not: both paths must report ENOSPC.
		size := 1 << 20
		if i%2 == 0 {
			size = 3 << 20
		}
		data := blobData(100+i, size)
		failed = cas.DigestOf(data)
		if _, err = writeBlob(bg, c, fmt.Sprintf("uploads/%d/blobs/%s", i, failed), data, 256<<10, 0); err != nil {
			break
		}
	}
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "no space left") {
		t.Fatalf("write to a full disk = %v; want RESOURCE_EXHAUSTED (no space left)", err)
	}
	t.Logf("a %d-byte upload was refused: %v", failed.Size, err)
	// Both sizes again, whichever failed first.
	for _, size := range []int{1 << 20, 3 << 20} {
		b := blobData(150+size, size)
		_, err = writeBlob(bg, c, "uploads/again/blobs/"+cas.DigestOf(b).String(), b, 256<<10, 0)
		if status.Code(err) != codes.ResourceExhausted {
			t.Fatalf("%d-byte write to a full disk = %v; want RESOURCE_EXHAUSTED", size, err)
		}
	}
	// Top it up with small blobs: the batch reports RESOURCE_EXHAUSTED per blob.
	req = &repb.BatchUpdateBlobsRequest{}
	for i := 0; i < 60; i++ {
		b := blobData(200+i, 64<<10)
		req.Requests = append(req.Requests, &repb.BatchUpdateBlobsRequest_Request{Digest: cas.DigestOf(b).Proto(), Data: b})
	}
	resp, err := c.cas.BatchUpdateBlobs(bg, req)
	if err != nil {
		t.Fatal(err)
	}
	var exhausted int
	for i, r := range resp.Responses {
		switch codes.Code(r.Status.GetCode()) {
		case codes.OK:
		case codes.ResourceExhausted:
			exhausted++
		default:
			t.Errorf("batch entry %d: %v", i, r.Status)
		}
	}
	if exhausted == 0 {
		t.Fatal("no batch entry was refused on a full disk")
	}
	// Again with a compressed upload.
	enc, _ := zstd.NewWriter(nil)
	big := blobData(300, 2<<20)
	bd := cas.DigestOf(big)
	_, err = writeBlob(bg, c, "uploads/z/compressed-blobs/zstd/"+bd.String(), enc.EncodeAll(big, nil), 256<<10, 0)
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("compressed write to a full disk = %v", err)
	}
	// The action cache may refuse updates, but clearly.
	_, err = c.ac.UpdateActionResult(bg, &repb.UpdateActionResultRequest{ActionDigest: cas.DigestOf(blobData(7, 64<<10)).Proto(), ActionResult: &repb.ActionResult{StdoutRaw: blobData(8, 1<<20)}})
	if err != nil && status.Code(err) != codes.ResourceExhausted {
		t.Errorf("action cache update on a full disk = %v", err)
	}

	// Nothing partial was stored, and the server still serves reads.
	if m, _ := srv.Store.FindMissing(bg, []cas.Digest{failed, bd}); len(m) != 2 {
		t.Fatal("a refused blob is present")
	}
	if left, _ := os.ReadDir(srv.DiskStore.TempDir()); len(left) != 0 {
		t.Fatalf("%d files left in tmp/", len(left))
	}
	for i, d := range earlyDs {
		got, err := readBlob(bg, c, d)
		if err != nil || !bytes.Equal(got, early[i]) {
			t.Fatalf("read of an existing blob on a full disk: %v", err)
		}
	}
	br, err := c.cas.BatchReadBlobs(bg, &repb.BatchReadBlobsRequest{Digests: []*repb.Digest{earlyDs[0].Proto()}})
	if err != nil || br.Responses[0].Status.GetCode() != 0 || !bytes.Equal(br.Responses[0].Data, early[0]) {
		t.Fatalf("BatchReadBlobs on a full disk: %v %v", br, err)
	}
	if fm, err := c.cas.FindMissingBlobs(bg, &repb.FindMissingBlobsRequest{BlobDigests: []*repb.Digest{earlyDs[0].Proto()}}); err != nil || len(fm.MissingBlobDigests) != 0 {
		t.Fatalf("FindMissingBlobs on a full disk: %v %v", fm, err)
	}
	if got, err := c.ac.GetActionResult(bg, &repb.GetActionResultRequest{ActionDigest: action}); err != nil || got.OutputFiles[0].Path != "o" {
		t.Fatalf("GetActionResult on a full disk: %v %v", got, err)
	}
	if h, err := c.health.Check(bg, &healthpb.HealthCheckRequest{}); err != nil || h.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health on a full disk: %v %v", h, err)
	}
	// Once space is freed, writes work again.
	srv.DiskStore.Evict(1 << 20)
	again := blobData(400, 1<<20)
	if _, err := writeBlob(bg, c, "uploads/again/blobs/"+cas.DigestOf(again).String(), again, 256<<10, 0); err != nil {
		t.Fatalf("write after freeing space: %v", err)
	}
}

// TestActionCacheLimitsOption: Options.ActionCacheLimits reach the
// ActionCache service; a result over them is refused with a message
// naming the limit, one within them is stored.
func TestActionCacheLimitsOption(t *testing.T) {
	_, c := inProcess(t, actiond.Options{ActionCacheLimits: actioncache.Limits{MaxBlobs: 2}})
	result := func(n int) *repb.ActionResult {
		res := &repb.ActionResult{}
		for i := range n {
			data := blobData(100+i, 10)
			res.OutputFiles = append(res.OutputFiles, &repb.OutputFile{Path: fmt.Sprintf("out%d", i), Digest: cas.DigestOf(data).Proto()})
		}
		return res
	}
	action := cas.DigestOf([]byte("action")).Proto()
	_, err := c.ac.UpdateActionResult(bg, &repb.UpdateActionResultRequest{ActionDigest: action, ActionResult: result(3)})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "more than 2 distinct blobs") {
		t.Fatalf("a result with 3 blobs over a limit of 2: %v, want INVALID_ARGUMENT naming the limit", err)
	}
	if _, err := c.ac.UpdateActionResult(bg, &repb.UpdateActionResultRequest{ActionDigest: action, ActionResult: result(2)}); err != nil {
		t.Fatalf("a result with 2 blobs within a limit of 2: %v", err)
	}
}
