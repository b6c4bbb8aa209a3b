package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/actioncache"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/units"
)

// defaultRoot is under the user's cache directory (~/.cache/actiond).
func defaultRoot() string {
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "actiond")
	}
	return filepath.Join(os.TempDir(), "actiond")
}

type sizeFlag struct{ n *int64 }

func (f sizeFlag) String() string {
	if f.n == nil || *f.n == 0 {
		return "0"
	}
	return units.Format(*f.n)
}
func (f sizeFlag) Set(s string) error {
	n, err := units.ParseSize(s)
	if err != nil {
		return err
	}
	*f.n = n
	return nil
}

func newLogger(level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l})), nil
}

func runServe(args []string) error {
	fs := newFlagSet("serve")
	listen := fs.String("listen", "127.0.0.1:8980", "gRPC listen address (host:port)")
	root := fs.String("root", defaultRoot(), "directory for all state (CAS, action cache, staging)")
	maxSize := int64(50 << 30)
	fs.Var(sizeFlag{&maxSize}, "max-size", "CAS size limit; least recently used blobs are evicted beyond it (e.g. 20G; 0 = unlimited)")
	logLevel := fs.String("log-level", "info", "log level: debug, info, warn, error")
	durability := fs.String("durability", cas.WriteBack.String(), "what a blob waits for before it is acknowledged: writeback (the kernel has it; flushed every second, and after a power loss the blobs of the last second are hashed at the next start, damaged ones reported missing), group (on disk; concurrent uploads share syncfs calls), fsync (on disk; one fsync of the file and its directory per blob, for a store sharing its file system with heavy writers), none (never waits: a crash loses nothing, a power loss may lose recent blobs, which are then never served)")
	noFsync := fs.Bool("no-fsync", false, "the same as --durability=none")
	scrubRate := int64(cas.DefaultScrubRate)
	fs.Var(sizeFlag{&scrubRate}, "scrub-rate", "bytes per second the background scrubber re-hashes stored blobs at, quarantining any that no longer match their digest (e.g. 32M; 0 = off)")
	drain := fs.Duration("drain-timeout", 30*time.Second, "on SIGINT/SIGTERM, how long running calls and actions may take to finish before they are cancelled")
	maxUploads := fs.Int("max-uploads", cas.DefaultMaxUploads, "resumable ByteStream uploads kept in progress at once; beyond it the longest idle are dropped, then new ones refused (RESOURCE_EXHAUSTED)")
	maxUploadBytes := int64(cas.DefaultMaxUploadBytes)
	fs.Var(sizeFlag{&maxUploadBytes}, "max-upload-bytes", "total size of the blobs of resumable uploads in progress (their bytes on disk count against --max-size)")
	var acLimits actioncache.Limits
	fs.IntVar(&acLimits.MaxBlobs, "max-result-blobs", actioncache.DefaultLimits.MaxBlobs, "distinct blobs (output files, every file of output trees, stdout, stderr) an ActionCache entry may reference; larger results are refused at UpdateActionResult (INVALID_ARGUMENT) and treated as misses at lookup, because each lookup re-checks them all")
	acLimits.MaxTreeBytes = actioncache.DefaultLimits.MaxTreeBytes
	fs.Var(sizeFlag{&acLimits.MaxTreeBytes}, "max-result-tree-bytes", "total size of the distinct Tree blobs an ActionCache entry's output directories may take (e.g. 256M)")
	var web httpStatus
	fs.StringVar(&web.addr, "http", "", "HTTP listen address for the status page (/) and Prometheus metrics (/metrics), e.g. 127.0.0.1:8981 (empty: off)")
	var ex execFlags
	ex.register(fs)
	log, err := parseCommand(fs, args, logLevel)
	if err != nil {
		return err
	}
	slog.SetDefault(log)

	dur, err := cas.ParseDurability(*durability)
	if err != nil {
		return err
	}
	opts := actiond.Options{Root: *root, MaxSize: maxSize, Logger: log, Durability: dur, NoFsync: *noFsync, DrainTimeout: *drain, MaxUploads: *maxUploads, MaxUploadBytes: maxUploadBytes, ScrubRate: scrubRate, ActionCacheLimits: acLimits}
	if scrubRate == 0 {
		opts.ScrubRate = -1
	}
	closeExec, err := ex.apply(&opts, log)
	if err != nil {
		return err
	}
	defer closeExec()
	web.prepare(&opts)
	srv, err := actiond.New(opts)
	if err != nil {
		return err
	}
	defer srv.Close()
	stopWeb, err := web.start(srv, log)
	if err != nil {
		return err
	}
	defer stopWeb()
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", *listen, err)
	}
	st := srv.DiskStore.Stats()
	log.Info("actiond serving",
		"listen", l.Addr().String(),
		"root", *root,
		"cas_blobs", st.Blobs,
		"cas_bytes", units.Format(st.Bytes),
		"max_size", sizeFlag{&maxSize}.String(),
		"version", actiond.Version)
	if srv.Execution != nil {
		log.Info("execution enabled",
			"runtimes", opts.Sandbox.Runtimes(),
			"default_runtime", opts.DefaultRuntime,
			"input_root", srv.Executor.InputRootName(),
			"concurrency", srv.Execution.Concurrency())
		log.Info("use it from Bazel", "flags", "--remote_executor=grpc://"+l.Addr().String()+" --spawn_strategy=remote")
	} else {
		log.Info("use it from Bazel", "flags", "--remote_cache=grpc://"+l.Addr().String())
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.Info("draining", "timeout", *drain)
	dctx, cancel := context.WithTimeout(context.Background(), *drain)
	defer cancel()
	srv.Stop(dctx)
	if err := <-errc; err != nil && !errors.Is(err, net.ErrClosed) {
		return err
	}
	log.Info("stopped")
	return nil
}
